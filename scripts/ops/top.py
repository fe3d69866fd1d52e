"""What each served version is doing now, refreshing like top: read from /metrics and the
management API only, so it shows what a Prometheus scraping the server would see.

    scripts/top                    # refreshes every 2 s; Ctrl-C to leave
    scripts/top --interval 5
    scripts/top --json             # one snapshot (two scrapes --interval apart), for machines

Per served version, over the last interval:
- req/s and err%: items the handler answered and refused (handler_items_*_total), so
  requests the frontend turned away before any worker saw them are not in them;
- p50 and p99 ms: of the handler's time per batch (handler_batch_seconds), interpolated in
  the histogram's buckets the way Prometheus's histogram_quantile does;
- workers: READY / all, from the management API; restarts: worker starts
  (handler_worker_starts_total) beyond the workers there are now (a scale-down counts too);
- queue ms: mean time requests waited for a worker (the frontend's
  ts_queue_latency_microseconds / ts_inference_requests_total; requests that name no version
  count for the default version).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from handlers.metrics import ANSWERED, BATCH_SECONDS, REFUSED, WORKER_STARTS
from scripts.ops.serve import ROOT, ServeError, TorchServe

Samples = dict[tuple[str, tuple], float]


def scrape(ts: TorchServe) -> Samples:
    """/metrics as {(sample name, sorted labels without the host): value}."""
    try:
        text = requests.get(f"{ts.url('metrics')}/metrics", timeout=10).text
    except requests.ConnectionError:
        raise ServeError(f"TorchServe's metrics API is not answering at {ts.url('metrics')}") from None
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k.lower() != "hostname"))
            out[(s.name, labels)] = out.get((s.name, labels), 0.0) + s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile on cumulative counts {upper bound: count}: linear
    interpolation inside the bucket that holds the rank; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if upper == float("inf"):
                return lower  # as Prometheus: the highest finite bound
            return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper
        lower, below = upper, count
    return lower


def served_versions(ts: TorchServe) -> list[dict]:
    """Each registered version with its workers and whether it is the default."""
    out = []
    for name in ts.models():
        default = ts.describe(name)[0]["modelVersion"]
        for v in ts.versions(name):
            workers = v.get("workers", [])
            out.append(
                {
                    "model": name,
                    "version": v["modelVersion"],
                    "default": v["modelVersion"] == default,
                    "workers_ready": sum(w.get("status") == "READY" for w in workers),
                    "workers": len(workers),
                }
            )
    return out


def report(served: list[dict], before: Samples, after: Samples, seconds: float) -> list[dict]:
    """Per version, what happened between two scrapes `seconds` apart."""

    def delta(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    rows = []
    for v in served:
        labels = {"model_name": v["model"], "model_version": v["version"]}
        answered, refused = delta(ANSWERED, **labels), delta(REFUSED, **labels)
        items = answered + refused
        buckets = {}
        for (n, ls), _ in after.items():
            ls = dict(ls)
            if n == BATCH_SECONDS + "_bucket" and all(ls.get(k) == x for k, x in labels.items()):
                le = float(ls["le"])
                buckets[le] = delta(n, **labels, le=ls["le"])
        p50, p99 = histogram_quantile(0.5, buckets), histogram_quantile(0.99, buckets)
        # The frontend labels a request by the version it named, "default" when it named none.
        asked = [v["version"]] + (["default"] if v["default"] else [])
        queued_us = sum(delta("ts_queue_latency_microseconds", model_name=v["model"], model_version=a) for a in asked)
        requests_in = sum(delta("ts_inference_requests_total", model_name=v["model"], model_version=a) for a in asked)
        starts = total(after, WORKER_STARTS, **labels)
        rows.append(
            {
                **v,
                "requests_per_s": round(items / seconds, 2),
                "error_ratio": round(refused / items, 4) if items else None,
                "p50_ms": None if p50 is None else round(p50 * 1000, 1),
                "p99_ms": None if p99 is None else round(p99 * 1000, 1),
                "worker_starts": int(starts),
                "restarts": max(0, int(starts) - v["workers"]),
                "queue_ms": round(queued_us / requests_in / 1000, 1) if requests_in else None,
            }
        )
    return rows


def snapshot(ts: TorchServe, last: tuple[Samples, float] | None, interval: float) -> tuple[dict, tuple[Samples, float]]:
    """One report since the `last` scrape (or over `interval` seconds); returns it and this scrape."""
    if last is None:
        last = scrape(ts), time.monotonic()
        time.sleep(interval)
    now = scrape(ts), time.monotonic()
    seconds = now[1] - last[1]
    report_ = {
        "time": round(time.time(), 3),
        "seconds": round(seconds, 3),
        "versions": report(served_versions(ts), last[0], now[0], seconds),
    }
    return report_, now


def table(snap: dict) -> str:
    def show(x, fmt="{}"):
        return "-" if x is None else fmt.format(x)

    rows = [("model", "version", "req/s", "err%", "p50 ms", "p99 ms", "workers", "restarts", "queue ms")]
    for r in snap["versions"]:
        rows.append(
            (
                r["model"],
                r["version"] + ("*" if r["default"] else ""),
                f"{r['requests_per_s']:.1f}",
                show(None if r["error_ratio"] is None else r["error_ratio"] * 100, "{:.1f}"),
                show(r["p50_ms"]),
                show(r["p99_ms"]),
                f"{r['workers_ready']}/{r['workers']}",
                str(r["restarts"]),
                show(r["queue_ms"]),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
    ]
    stamp = time.strftime("%H:%M:%S", time.localtime(snap["time"]))
    return f"scripts/top  {stamp}  over {snap['seconds']:.1f} s  (* default version)\n" + "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=str(ROOT / ".serve"), help="the server's run folder (default: .serve/)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default: 2)")
    p.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit (default: off)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.interval <= 0:
        print(f"error: --interval must be a positive number of seconds, got {args.interval:g}", file=sys.stderr)
        return 2
    ts = TorchServe(run_dir=Path(args.run_dir))
    last = None
    try:
        if not ts.is_running():
            raise ServeError(f"TorchServe is not running from {ts.run_dir}; start it with scripts/serve start")
        while True:
            snap, last = snapshot(ts, last, args.interval)
            if args.json:
                print(json.dumps(snap, indent=2))
                return 0
            print("\033[H\033[2J" + table(snap), flush=True)
            time.sleep(args.interval)
    except (ServeError, requests.RequestException) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
