"""What being served costs a request, apart from its model: a null handler, a stage split, the CPU.

    scripts/bench_fixed_cost                          # 10 s per load, about a minute
    scripts/bench_fixed_cost --duration 3 --clients 8 # a quick look

It archives the classifier's handler with a model that does nothing
(scripts/bench/null_handler.py: the same request parser, size check, per-item errors, metrics
and answer shape; no decode, no inference), one worker, batch 1, no batch delay, and measures
with the same 32 px PNG digit the demo's model serves:

- bare:        the null handler's whole handle() in-process (median, to the microsecond);
- fixed cost:  the served p50 at one client less bare: HTTP, TorchServe's frontend, the hand-off
               to the Python worker and back, the answer;
- stages:      the mean per request at one client, each from its own clock, then their sum
               against the client's mean (what no clock covers is `unaccounted`):
    HTTP + auth:      the client's mean on POST /ping with the same PNG body over the same kind of
                      keep-alive connection, with the token (Netty reading the body, the token
                      check, an answer; no model, no worker);
    frontend queue:   TorchServe's ts_queue_latency_microseconds (receipt to a worker taking it);
    worker hand-off:  ts_inference_latency_microseconds less the queue and the handler's batch
                      (handler_batch_seconds): the frontend-to-worker socket, the worker's
                      decoding of it, and the answer's way back;
    handler parse / model / answer / other: the handler's own histograms (handlers/metrics.py):
                      preprocess, inference, postprocess, and the rest of handle();
- saturation:  --clients connections in a closed loop: requests/s (the served path's ceiling
               on this machine) and the server's CPU time per request (the frontend's java and
               its worker processes, from /proc), beside the load generator's own.

The counters are TorchServe's own, read from /metrics (the bundle runs metrics_mode=prometheus,
so ts_metrics.log carries none of them). It writes fixed_cost.json and fixed_cost.png (the
stages as a stacked bar beside the client's total) to --out and the record --record under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from scripts.bench.harness import digit_png, random_weights_run, request_context, unpack_handler
from scripts.bench.loadgen import GENERATORS, Load, LoadError, fallback_note
from scripts.bench.record import write_record
from scripts.ops.catalog import Catalog, sha256_file
from scripts.ops.packaging import build_archive
from scripts.ops.serve import ROOT, ServeError, TorchServe
from scripts.ops.top import scrape, total

NULL_HANDLER = Path(__file__).with_name("null_handler.py")


def rounds(duration: float) -> int:
    """How many times the one-client load and the ping take turns: one per second of
    --duration (wrk runs whole seconds), at least 4."""
    return max(4, round(duration))


STAGES = (
    "HTTP + auth",
    "frontend queue",
    "worker hand-off",
    "handler parse",
    "handler model",
    "handler answer",
    "handler other",
)


def null_archive(store: Path, work: Path, name: str = "null") -> Path:
    """<store>/<name>.mar: the digits CNN's archive (random weights, 1 worker, batch 1, no
    delay, 1 torch thread) with null_handler.py as its handler; catalogued with its new sha256."""
    run = random_weights_run("small_cnn", work / "null_run")
    entry = build_archive(
        run, name, store, {"workers": 1, "batch_size": 1, "max_batch_delay": 0, "torch_threads": 1}, force=True
    )
    mar = store / f"{name}.mar"
    swapped = mar.with_suffix(".swap")
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(swapped, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["handler"] = NULL_HANDLER.name
                data = json.dumps(manifest, indent=2).encode()
            dst.writestr(item, data)
        dst.write(NULL_HANDLER, NULL_HANDLER.name)
    swapped.replace(mar)
    Catalog(store).record({**entry, "sha256": sha256_file(mar), "size": mar.stat().st_size})
    return mar


def bare_null(mar: Path, work: Path, image: bytes, seconds: float) -> dict:
    """The null handler's handle() on one request in-process: median and mean in ms."""
    from scripts.bench.null_handler import NullClassifier

    handler, _ = unpack_handler(mar, work / "null_unpacked", torch_threads=1, handler_class=NullClassifier)
    rows, ctx = [{"body": image}], request_context(1)
    answer = handler.handle(rows, ctx)[0]
    times, stop = [], time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t = time.perf_counter()
        handler.handle(rows, ctx)
        times.append(time.perf_counter() - t)
    return {
        "p50_ms": round(statistics.median(times) * 1000, 4),
        "mean_ms": round(statistics.fmean(times) * 1000, 4),
        "calls": len(times),
        "answer": answer,
    }


def pooled(rounds: list[dict]) -> dict:
    """One load's rounds as one: requests and errors summed, means weighted by requests,
    percentiles the median of the rounds' (the tools report no raw latencies)."""
    n = sum(r["requests"] for r in rounds)
    out = dict(rounds[0])
    out["requests"], out["errors"] = n, sum(r["errors"] for r in rounds)
    for k in ("p50", "p90", "p99"):
        values = [r[k] for r in rounds if r[k] is not None]
        out[k] = statistics.median(values) if values else None
    means = [(r["mean_ms"], r["requests"]) for r in rounds if r["mean_ms"] is not None]
    out["mean_ms"] = round(sum(m * k for m, k in means) / sum(k for _, k in means), 4) if means else None
    out["throughput"] = round(statistics.fmean(r["throughput"] for r in rounds), 2)
    out["rounds"] = len(rounds)
    return out


def split(deltas: list[tuple[dict, dict]], model: str, client_mean: float, ping_mean: float) -> dict:
    """Each stage's mean ms per request from the counters' deltas over the measured rounds
    (see the module's note)."""

    def delta(name: str) -> float:
        names = (name, f"{name}_total") if not name.endswith("_total") else (name,)
        return sum(
            total(after, n, model_name=model) - total(before, n, model_name=model)
            for before, after in deltas
            for n in names
        )

    n = delta("ts_inference_requests_total")
    if not n or not delta("handler_batch_seconds_count"):
        raise ServeError("TorchServe's /metrics counted no requests or no handler batches for the null model")
    queue = delta("ts_queue_latency_microseconds") / n / 1000
    inside = delta("ts_inference_latency_microseconds") / n / 1000
    steps = {s: delta(f"handler_{s}_seconds_sum") / n * 1000 for s in ("preprocess", "inference", "postprocess")}
    batch = delta("handler_batch_seconds_sum") / n * 1000
    ms = {
        "HTTP + auth": ping_mean,
        "frontend queue": queue,
        "worker hand-off": inside - queue - batch,
        "handler parse": steps["preprocess"],
        "handler model": steps["inference"],
        "handler answer": steps["postprocess"],
        "handler other": batch - sum(steps.values()),
    }
    accounted = sum(ms.values())
    return {
        "requests": int(n),
        "stages_ms": {k: round(v, 4) for k, v in ms.items()},
        "sum_ms": round(accounted, 4),
        "client_mean_ms": round(client_mean, 4),
        "unaccounted_ms": round(client_mean - accounted, 4),
        "frontend_ms": round(inside, 4),
    }


def measure(ts: TorchServe, args, work: Path) -> dict:
    image = digit_png()
    null_archive(ts.model_store, work)
    bare = bare_null(ts.model_store / "null.mar", work, image, min(args.duration, 5.0))
    version = ts.register("null", "null.mar", timeout=300)
    try:
        url, headers = f"{ts.url('inference')}/predictions/null", ts.headers("inference")
        pid = ts.pid()
        with (
            Load(url, headers, image, content_type="image/png", generator=args.load_generator, server_pid=pid) as load,
            Load(
                f"{ts.url('inference')}/ping", headers, image, content_type="image/png", generator=args.load_generator
            ) as ping,
        ):
            print(f"null handler: 1 client, {args.duration:g} s ({load.generator})", flush=True)
            load.closed(1, 1.0)  # warm: the JVM's request path compiled, the connection open
            ping.closed(1, 0.5)
            # Ping and the model take turns, so that the host's drift and stalls fall on both.
            pings, ones, deltas = [], [], []
            turns = rounds(args.duration)
            for _ in range(turns):
                pings.append(ping.closed(1, args.duration / turns / 2, warm=False))
                before = scrape(ts)
                ones.append(load.closed(1, args.duration / turns, warm=False))
                deltas.append((before, scrape(ts)))
            print(f"null handler: {args.clients} clients, {args.duration:g} s", flush=True)
            saturated = load.closed(args.clients, args.duration)
        generator = load.generator
    finally:
        ts.unregister("null", version)
    one, ping_one = pooled(ones), pooled(pings)
    if one["errors"] or saturated["errors"] or one["mean_ms"] is None or ping_one["mean_ms"] is None:
        raise ServeError(
            f"the null model's loads had errors: 1 client {one['errors']}, saturated {saturated['errors']}"
        )
    stages = split(deltas, "null", one["mean_ms"], ping_one["mean_ms"])
    return {
        "model": "null handler over small_cnn (random weights), 1 worker x 1 thread, batch 1, delay 0",
        "image": "scikit-learn digit 32x32 PNG",
        "generator": generator,
        "bare": bare,
        "one_client": one,
        "ping": ping_one,
        "fixed_cost_p50_ms": round(one["p50"] - bare["p50_ms"], 3) if one["p50"] is not None else None,
        "stages": stages,
        "saturated": saturated,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = result["stages"]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    left = 0.0
    colors = plt.get_cmap("tab10").colors
    for i, name in enumerate(STAGES):
        v = max(0.0, stages["stages_ms"][name])
        ax.barh(1, v, left=left, color=colors[i % 10], label=f"{name} {stages['stages_ms'][name]:.2f}")
        left += v
    ax.barh(0, stages["client_mean_ms"], color="grey", label=f"client mean {stages['client_mean_ms']:.2f}")
    ax.set_yticks([0, 1], ["client", "stages"])
    ax.set_xlabel("ms per request, mean at 1 client")
    ax.set_title(
        f"fixed cost of a served request (null handler): p50 {result['one_client']['p50']:.3f} ms served, "
        f"{result['bare']['p50_ms']:.3f} ms in-process"
    )
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(result: dict) -> str:
    s, sat = result["stages"], result["saturated"]
    lines = [f"{'stage':18} {'ms':>8} {'share':>6}"]
    for name in STAGES:
        v = s["stages_ms"][name]
        lines.append(f"{name:18} {v:8.3f} {v / s['client_mean_ms']:6.0%}")
    lines += [
        f"{'sum of stages':18} {s['sum_ms']:8.3f}",
        f"{'client mean':18} {s['client_mean_ms']:8.3f} (unaccounted {s['unaccounted_ms']:+.3f})",
        "",
        f"served p50 at 1 client {result['one_client']['p50']:.3f} ms, null handler in-process "
        f"{result['bare']['p50_ms']:.3f} ms: fixed cost {result['fixed_cost_p50_ms']} ms",
        f"saturated at {sat['clients']} clients: {sat['throughput']} req/s, server CPU "
        f"{sat.get('server_cpu_ms_per_request', '-')} ms/request, load generator ({sat['generator']}) CPU "
        f"{sat['generator_cpu_ms_per_request']} ms/request",
    ]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench_fixed_cost", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load (default: 10)")
    p.add_argument("--clients", type=int, default=16, help="connections of the saturating load (default: 16)")
    p.add_argument(
        "--load-generator",
        default="auto",
        help=f"{', '.join(GENERATORS)}: auto = native (wrk and hey) where installed, else the Python client "
        "(default: auto)",
    )
    p.add_argument(
        "--out", default=str(ROOT / "runs" / "bench"), help="where fixed_cost.json/.png go (default: runs/bench)"
    )
    p.add_argument(
        "--record",
        default="fixed_cost",
        help="record name under benchmarks/results/; '' for none (default: fixed_cost)",
    )
    return p


def main(argv: list[str] | None = None, *, server: TorchServe | None = None) -> int:
    """The command line; `server` (from Python only): a running TorchServe to register on."""
    args = get_args_parser().parse_args(argv)
    if args.duration <= 0 or args.clients < 1:
        print("error: --duration needs a positive number of seconds and --clients at least 1", file=sys.stderr)
        return 2
    if args.load_generator not in GENERATORS:
        choices = ", ".join(GENERATORS)
        print(f"error: --load-generator {args.load_generator!r}: choose one of {choices}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fixed-cost-", dir=out) as tmp:
        work = Path(tmp)
        ts = server or TorchServe(
            run_dir=work / "serve", model_store=work / "store", config=ROOT / "config.properties", ports={}
        )
        ts.model_store.mkdir(parents=True, exist_ok=True)
        try:
            if server is None:
                ts.start([], timeout=300)
            try:
                result = measure(ts, args, work)
            finally:
                if server is None:
                    ts.stop()
        except (ServeError, LoadError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    (out / "fixed_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "fixed_cost.png")
    note = fallback_note(result["generator"])
    if note:
        print(note)
    print(report(result))
    if args.record:
        print(f"record: {write_record(args.record, result)}")
    print(f"wrote {out / 'fixed_cost.json'} and {out / 'fixed_cost.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
