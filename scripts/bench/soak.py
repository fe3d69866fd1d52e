"""Soak test: keep a served model busy for a while with good and bad requests mixed.

    scripts/soak                                   # 180 s, 8 clients, 25% bad requests
    scripts/soak --duration 600 --clients 8        # ten minutes (docs/reliability.md)

Why it exists: one request at a time proves little about a server that must stay up.
A long, concurrent run shows whether good requests keep getting 200 while bad ones
(garbage bytes, truncated PNGs, text, JSON without `data`, empty bodies) are mixed in,
whether latency stays steady, and whether the model's worker processes leak memory.

Each client is a thread with its own requests.Session that sends its next request as
soon as the last one is answered (closed loop). What it sends is drawn by a seeded RNG:
a real image from --data, or one of the bad payloads. The worker processes' RSS is read
with psutil (pids from TorchServe's management API) before the load, after a short
warm-up, every ~30 s, and at the end. Growth is measured from the post-warm-up sample,
so that one-off allocations on the first batches do not count as a leak.

Prints a table and a last line
    soak: N requests, good 5xx=X, bad 4xx=Y/Z, p50=..ms p99=..ms, RSS growth=..%
and writes every figure to --out as JSON, with the RSS growth of each process (the
frontend and every worker) on its own. Exit code 1 if any good request was not answered
200, if a worker was restarted (its pid changed: it died under the load), or (for runs of
600 s or more) any process's RSS grew by 10% or more; 2 if the server cannot be reached;
else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import requests

from scripts.ops.client import Client, percentile_ms
from scripts.ops.serve import ROOT, ServeError, TorchServe

BAD_KINDS = ("garbage", "truncated_png", "text", "json_without_data", "empty")
RSS_LIMIT_PERCENT = 10.0
RSS_CHECK_MIN_SECONDS = 600


def bad_payload(kind: str, rng: random.Random, good: bytes) -> tuple[bytes, dict]:
    """A payload the handler must refuse with a 4xx, and its extra headers."""
    if kind == "garbage":
        return rng.randbytes(rng.randint(16, 4096)), {}
    if kind == "truncated_png":
        return good[: rng.randint(8, max(9, len(good) // 2))], {}
    if kind == "text":
        return b"this is plain text, not an image " * rng.randint(1, 20), {"Content-Type": "text/plain"}
    if kind == "json_without_data":
        return json.dumps({"image": "no data field", "n": rng.randint(0, 99)}).encode(), {
            "Content-Type": "application/json"
        }
    if kind == "empty":
        return b"", {}
    raise ValueError(kind)


def worker_pids(ts: TorchServe, model: str) -> list[int]:
    return sorted(int(w["pid"]) for d in ts.describe(model) for w in d.get("workers", []) if w.get("pid"))


def rss_sample(ts: TorchServe, model: str, t0: float) -> dict:
    """RSS (bytes) of the model's workers and of the frontend now; pids re-read so a
    restarted worker shows."""
    pids = worker_pids(ts, model)
    rss = {}
    for pid in [*pids, ts.pid()]:
        try:
            rss[pid] = psutil.Process(pid).memory_info().rss
        except (psutil.Error, TypeError, ValueError):
            rss[pid] = 0
    return {
        "t": round(time.monotonic() - t0, 1),
        "pids": pids,
        "frontend_pid": ts.pid(),
        "rss_bytes": sum(rss[p] for p in pids),
        "per_pid": {str(k): v for k, v in rss.items()},
    }


def restarts(samples: list[dict]) -> list[str]:
    """One line per change of the worker pids between samples: a worker that died and was
    started again by TorchServe."""
    return [
        f"at {b['t']:g} s worker pid(s) {a['pids']} became {b['pids']}"
        for a, b in zip(samples, samples[1:])
        if a["pids"] != b["pids"]
    ]


def growth_by_process(samples: list[dict]) -> dict[str, float]:
    """RSS growth (%) of each process from the first sample to the last, for the processes
    present in both: "frontend" and "worker <pid>"."""
    first, last = samples[0], samples[-1]
    roles = {str(first.get("frontend_pid")): "frontend", **{str(p): f"worker {p}" for p in first["pids"]}}
    return {
        role: round(100.0 * (last["per_pid"][pid] - first["per_pid"][pid]) / first["per_pid"][pid], 2)
        for pid, role in roles.items()
        if first["per_pid"].get(pid) and last["per_pid"].get(pid)
    }


class LoadThread(threading.Thread):
    """One closed-loop client: sends, waits for the answer, records it, sends again."""

    def __init__(
        self,
        index: int,
        url: str,
        headers: dict,
        goods: list[Path],
        bad_share: float,
        seed: int,
        stop_at: float,
        timeout: float,
        sink: list,
        lock: threading.Lock,
    ):
        super().__init__(name=f"soak-client-{index}", daemon=True)
        self.rng = random.Random(seed * 1000 + index)
        self.url, self.headers, self.goods = url, headers, goods
        self.bad_share, self.stop_at, self.timeout = bad_share, stop_at, timeout
        self.sink, self.lock = sink, lock
        self.cache: dict[Path, bytes] = {}

    def good_bytes(self) -> bytes:
        path = self.rng.choice(self.goods)
        if path not in self.cache:
            self.cache[path] = path.read_bytes()
        return self.cache[path]

    def run(self) -> None:
        client = Client(self.url, self.headers, timeout=self.timeout, content_type=None)
        while time.monotonic() < self.stop_at:
            good = self.good_bytes()
            if self.rng.random() < self.bad_share:
                kind, sub = "bad", self.rng.choice(BAD_KINDS)
                data, extra = bad_payload(sub, self.rng, good)
            else:
                kind, sub, data, extra = "good", "image", good, {}
            start = time.perf_counter()
            status, _ = client.send(data, extra)  # 0: no HTTP answer at all (refused, reset, timed out)
            record = (kind, sub, status, time.perf_counter() - start)
            with self.lock:
                self.sink.append(record)
        client.close()


def summarize(records: list, seconds: float) -> dict:
    by_kind = {k: Counter() for k in ("good", "bad")}
    by_bad_type = {b: Counter() for b in BAD_KINDS}
    for kind, sub, status, _ in records:
        by_kind[kind][status] += 1
        if kind == "bad":
            by_bad_type[sub][status] += 1
    good_lat = [lat for kind, _, status, lat in records if kind == "good" and status == 200]
    bad_lat = [lat for kind, _, _, lat in records if kind == "bad"]
    return {
        "requests": len(records),
        "seconds": round(seconds, 1),
        "throughput_rps": round(len(records) / seconds, 1) if seconds else None,
        "status_counts": {k: {str(s): n for s, n in sorted(c.items())} for k, c in by_kind.items()},
        "bad_status_by_payload": {b: {str(s): n for s, n in sorted(c.items())} for b, c in by_bad_type.items()},
        "good_total": sum(by_kind["good"].values()),
        "good_200": by_kind["good"][200],
        "good_5xx": sum(n for s, n in by_kind["good"].items() if s >= 500),
        "good_not_200": sum(n for s, n in by_kind["good"].items() if s != 200),
        "bad_total": sum(by_kind["bad"].values()),
        "bad_4xx": sum(n for s, n in by_kind["bad"].items() if 400 <= s < 500),
        "bad_5xx": sum(n for s, n in by_kind["bad"].items() if s >= 500),
        "latency_ms": {
            "good_p50": percentile_ms(good_lat, 50),
            "good_p99": percentile_ms(good_lat, 99),
            "good_max": percentile_ms(good_lat, 100),
            "bad_p50": percentile_ms(bad_lat, 50),
            "bad_p99": percentile_ms(bad_lat, 99),
        },
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="digits", help="served model to load (default: digits)")
    p.add_argument(
        "--duration",
        type=float,
        default=180,
        help="seconds of load, after the warm-up (default: 180); the RSS growth limit "
        f"is enforced only from {RSS_CHECK_MIN_SECONDS} s",
    )
    p.add_argument("--clients", type=int, default=8, help="concurrent closed-loop client threads (default: 8)")
    p.add_argument(
        "--bad-share",
        type=float,
        default=0.25,
        help="fraction of requests that carry a bad payload, 0..1 (default: 0.25)",
    )
    p.add_argument(
        "--run-dir",
        default=str(ROOT / ".serve"),
        help="the server's run folder, for its address and token (default: .serve/)",
    )
    p.add_argument(
        "--data",
        default=str(ROOT / "data" / "digits" / "test"),
        help="folder of good images, searched recursively (default: data/digits/test)",
    )
    p.add_argument(
        "--out",
        default=str(ROOT / "runs" / "soak.json"),
        help="where to write the results as JSON (default: runs/soak.json)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the clients' RNGs (default: 0)")
    p.add_argument(
        "--warmup", type=int, default=50, help="good requests sent before the RSS baseline is taken (default: 50)"
    )
    p.add_argument("--rss-every", type=float, default=30, help="seconds between RSS samples (default: 30)")
    p.add_argument("--timeout", type=float, default=30, help="per-request timeout in seconds (default: 30)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not 0 <= args.bad_share <= 1 or args.clients < 1 or args.duration <= 0:
        print("error: need --clients >= 1, --duration > 0 and 0 <= --bad-share <= 1", file=sys.stderr)
        return 2
    goods = sorted(
        p
        for p in Path(args.data).rglob("*")
        if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
    )
    if not goods:
        print(f"error: no images under {args.data}", file=sys.stderr)
        return 2
    ts = TorchServe(run_dir=Path(args.run_dir))
    try:
        headers = ts.headers("inference")
        url = f"{ts.url('inference')}/predictions/{args.model}"
        t0 = time.monotonic()
        before = rss_sample(ts, args.model, t0)
        if not before["pids"]:
            raise ServeError(f"model {args.model} has no workers")
        info = ts.describe(args.model)[0]
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # Warm-up: the first batches allocate once (torch, allocator arenas); not a leak.
    with requests.Session() as s:
        for path in goods[: args.warmup]:
            with contextlib.suppress(requests.RequestException):
                s.post(url, data=path.read_bytes(), headers=headers, timeout=args.timeout)
    t0 = time.monotonic()
    samples = [rss_sample(ts, args.model, t0)]
    print(
        f"soak: {args.model} (batchSize {info.get('batchSize')}, {len(samples[0]['pids'])} worker(s), "
        f"RSS {samples[0]['rss_bytes'] / 2**20:.1f} MiB) at {url}: {args.clients} clients for {args.duration:g} s, "
        f"{args.bad_share:.0%} bad requests",
        flush=True,
    )

    records: list = []
    lock = threading.Lock()
    stop_at = t0 + args.duration
    clients = [
        LoadThread(i, url, headers, goods, args.bad_share, args.seed, stop_at, args.timeout, records, lock)
        for i in range(args.clients)
    ]
    for c in clients:
        c.start()
    next_line, next_rss = 10.0, args.rss_every
    while any(c.is_alive() for c in clients):
        time.sleep(0.5)
        elapsed = time.monotonic() - t0
        if elapsed >= next_rss and elapsed < args.duration:
            try:
                samples.append(rss_sample(ts, args.model, t0))
            except ServeError as e:
                print(f"  warning: RSS sample failed: {e}", flush=True)
            next_rss += args.rss_every
        if elapsed >= next_line:
            with lock:
                n = len(records)
                bad_good = sum(1 for k, _, s, _ in records if k == "good" and s != 200)
            print(
                f"  [{min(elapsed, args.duration):5.0f}/{args.duration:g} s] {n} requests, "
                f"{n / elapsed:.1f}/s, good non-200: {bad_good}",
                flush=True,
            )
            next_line += 10
    seconds = time.monotonic() - t0
    try:
        samples.append(rss_sample(ts, args.model, t0))
    except ServeError as e:
        print(f"error: the server stopped answering the management API: {e}", file=sys.stderr)
        return 1

    summary = summarize(records, seconds)
    start_rss, end_rss = samples[0]["rss_bytes"], samples[-1]["rss_bytes"]
    growth = 100.0 * (end_rss - start_rss) / start_rss if start_rss else float("nan")
    restarted = restarts(samples)
    per_process = growth_by_process(samples)
    rss_checked = args.duration >= RSS_CHECK_MIN_SECONDS
    failures = []
    if summary["good_not_200"]:
        failures.append(f"{summary['good_not_200']} good request(s) not answered 200")
    failures += [f"worker restarted: {line}" for line in restarted]
    if rss_checked:
        failures += [
            f"{role} RSS grew {pct:.1f}% (limit {RSS_LIMIT_PERCENT:g}%)"
            for role, pct in per_process.items()
            if not pct < RSS_LIMIT_PERCENT
        ]
    result = {
        "config": {
            "model": args.model,
            "duration": args.duration,
            "clients": args.clients,
            "bad_share": args.bad_share,
            "seed": args.seed,
            "warmup": args.warmup,
            "data": str(args.data),
            "url": url,
            "batch_size": info.get("batchSize"),
            "max_batch_delay": info.get("maxBatchDelay"),
            "cpu_count": psutil.cpu_count(),
        },
        **summary,
        "rss": {
            "before_warmup_bytes": before["rss_bytes"],
            "start_bytes": start_rss,
            "end_bytes": end_rss,
            "growth_percent": round(growth, 2),
            "growth_percent_by_process": per_process,
            "checked": rss_checked,
            "workers_restarted": bool(restarted),
            "restarts": restarted,
            "samples": samples,
        },
        "failures": failures,
        "passed": not failures,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    lat = summary["latency_ms"]
    rows = [
        ("requests", summary["requests"]),
        ("seconds", summary["seconds"]),
        ("throughput", f"{summary['throughput_rps']} req/s"),
    ]
    rows += [(f"good HTTP {s}", n) for s, n in summary["status_counts"]["good"].items()]
    rows += [(f"bad HTTP {s}", n) for s, n in summary["status_counts"]["bad"].items()]
    rows += [
        (f"  bad {b}", ", ".join(f"{s}: {n}" for s, n in c.items()) or "-")
        for b, c in summary["bad_status_by_payload"].items()
    ]
    rows += [
        ("good p50 / p99 / max", f"{lat['good_p50']} / {lat['good_p99']} / {lat['good_max']} ms"),
        ("bad p50 / p99", f"{lat['bad_p50']} / {lat['bad_p99']} ms"),
        ("worker RSS start", f"{start_rss / 2**20:.1f} MiB (before warm-up {before['rss_bytes'] / 2**20:.1f} MiB)"),
        ("worker RSS end", f"{end_rss / 2**20:.1f} MiB"),
        (
            "worker RSS growth",
            f"{growth:+.2f}%" + ("" if rss_checked else f" (limit checked from {RSS_CHECK_MIN_SECONDS} s)"),
        ),
    ]
    rows += [(f"  {role} RSS growth", f"{pct:+.2f}%") for role, pct in per_process.items()]
    rows += [("workers restarted", "; ".join(restarted) if restarted else "no")]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    print(f"results: {out}")
    print(
        f"soak: {summary['requests']} requests, good 5xx={summary['good_5xx']}, "
        f"bad 4xx={summary['bad_4xx']}/{summary['bad_total']}, p50={lat['good_p50']}ms p99={lat['good_p99']}ms, "
        f"RSS growth={growth:.1f}%"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
