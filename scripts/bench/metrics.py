"""What the handler metrics cost: the same archive served with and without them, in one run.

    scripts/bench_metrics                         # ResNet-18 (random weights), ~4 minutes
    scripts/bench_metrics --model small_cnn       # a tiny model, where a per-batch cost shows most

Two archives of the same weights and model configuration, one with the handler option
`metrics: false`, are served by one TorchServe (started with the bundle's config.properties
and so its metrics_config). After an unmeasured warm-up, closed-loop load of the same JPEG
is sent to each in interleaved rounds (A B, B A, ...), so a noisy neighbour slows both
alike. Each round also records the server's CPU time per request (frontend and workers,
from psutil; requests counted by the frontend), which a busy neighbour disturbs far less
than throughput. It prints a table, writes bench_metrics.json and bench_metrics.png to
--out, and its last line is `with/without=R overhead=P%`, the ratio of the total
throughputs (the per-round ratios and their median are printed above it: on a busy
machine they say how far to trust it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from scripts.bench.harness import cat_jpeg, closed_loop, random_weights_run
from scripts.bench.serving import machine
from scripts.ops.client import Client
from scripts.ops.packaging import ArchiveError, build_archive
from scripts.ops.serve import ServeError, TorchServe
from scripts.ops.top import scrape, total

ROOT = Path(__file__).resolve().parents[2]

SIDES = {"with": {}, "without": {"metrics": False}}  # handler options of each side


def run_bench(args, server: TorchServe | None = None) -> dict:
    """Both sides, measured on `server` (a running TorchServe; the archives are built into its
    model store and unregistered at the end), else on one started with config.properties."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-metrics-", dir=out))
    try:
        ts = server or TorchServe(run_dir=work / "serve", model_store=work / "model_store", ports={})
        store = ts.model_store
        store.mkdir(exist_ok=True)
        run = random_weights_run(args.model, work / "run")
        for side, handler in SIDES.items():
            options = {
                "workers": args.workers or os.cpu_count() or 1,
                "batch_size": args.batch_size,
                "max_batch_delay": 5,
                "device": "cpu",
                "handler": handler,
            }
            build_archive(run, side, store, options, force=True)
        image = cat_jpeg()
        if server is None:
            ts.start([], timeout=300)
        versions = {}
        try:
            for side in SIDES:
                versions[side] = ts.register(side, f"{side}.mar", timeout=300)
            headers = ts.headers("inference")
            urls = {side: f"{ts.url('inference')}/predictions/{side}" for side in SIDES}
            for side, url in urls.items():
                ok, answer = Client(url, headers).post(image)
                if not ok:
                    raise ServeError(f"{side} did not answer the benchmark image: {answer}")
            for side in SIDES:  # the JVM and the workers warm up: not measured
                print(f"  warm-up: {side} metrics, {args.warmup:g} s", flush=True)
                closed_loop(urls[side], headers, image, args.clients, args.warmup)
            rounds = {side: [] for side in SIDES}
            for r in range(args.rounds):
                for side in list(SIDES) if r % 2 == 0 else list(SIDES)[::-1]:
                    print(
                        f"  round {r + 1}/{args.rounds}: {side} metrics, {args.clients} clients, {args.duration:g} s",
                        flush=True,
                    )
                    cpu, served = server_cpu_seconds(ts), requests_served(ts, side)
                    m = closed_loop(urls[side], headers, image, args.clients, args.duration)
                    cpu, served = server_cpu_seconds(ts) - cpu, requests_served(ts, side) - served
                    rounds[side].append(m | {"server_cpu_ms_per_request": round(cpu * 1000 / served, 3)})
        finally:
            if server is None:
                ts.stop()
            else:
                for side, version in versions.items():
                    ts.unregister(side, version)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = {side: sum(m["throughput"] for m in ms) for side, ms in rounds.items()}
    ratio = total["with"] / total["without"]
    per_round = [w["throughput"] / wo["throughput"] for w, wo in zip(rounds["with"], rounds["without"])]
    cpu = {side: statistics.median(m["server_cpu_ms_per_request"] for m in ms) for side, ms in rounds.items()}
    return {
        "model": args.model,
        "machine": machine(),
        "clients": args.clients,
        "duration_s": args.duration,
        "batch_size": args.batch_size,
        "rounds": rounds,
        "with_over_without": round(ratio, 4),
        "overhead_percent": round((1 - ratio) * 100, 2),
        "round_ratios": [round(r, 3) for r in per_round],
        "median_round_ratio": round(statistics.median(per_round), 3),
        "server_cpu_ms_per_request": {side: round(v, 3) for side, v in cpu.items()},
        "cpu_overhead_percent": round((cpu["with"] / cpu["without"] - 1) * 100, 2),
    }


def server_cpu_seconds(ts: TorchServe) -> float:
    """CPU time used so far by the frontend and its workers (user + system)."""
    import psutil

    total = 0.0
    root = psutil.Process(ts.pid())
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def requests_served(ts: TorchServe, name: str) -> float:
    """The frontend's count of requests for `name` (on whether or not the handler reports metrics)."""
    return total(scrape(ts), "ts_inference_requests_total", model_name=name)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for side, ms in result["rounds"].items():
        ax.plot(range(1, len(ms) + 1), [m["throughput"] for m in ms], marker="o", label=f"{side} metrics")
    ax.set_xlabel("round")
    ax.set_ylabel("requests/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{result['model']}, {result['clients']} clients: overhead {result['overhead_percent']:.1f}%")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench_metrics", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default="resnet18", help="registered classifier, built with random weights (default: resnet18)"
    )
    p.add_argument("--workers", type=int, default=None, help="workers per archive (default: one per core)")
    p.add_argument("--batch-size", type=int, default=2, help="batchSize of both archives (default: 2)")
    p.add_argument("--clients", type=int, default=4, help="closed-loop clients (default: 4)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per round and side (default: 10)")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds per side (default: 6)")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds of unmeasured load per side first (default: 20)")
    p.add_argument(
        "--out", default=str(ROOT / "runs" / "bench"), help="where bench_metrics.json and .png go (default: runs/bench)"
    )
    p.add_argument("--keep", action="store_true", help="keep the archives and server logs under --out (default: off)")
    return p


def main(argv: list[str] | None = None, *, server: TorchServe | None = None) -> int:
    """The command line; `server` (from Python only): a running TorchServe to measure on
    instead of starting one (see run_bench)."""
    args = get_args_parser().parse_args(argv)
    if args.clients < 1 or args.rounds < 1 or args.duration <= 0 or args.batch_size < 1 or args.warmup <= 0:
        print(
            "error: --clients, --rounds and --batch-size need at least 1, --duration and --warmup a positive number",
            file=sys.stderr,
        )
        return 2
    try:
        result = run_bench(args, server)
    except (ServeError, ArchiveError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    (out / "bench_metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "bench_metrics.png")
    print(f"\n{result['model']} on {result['machine']}, {args.clients} clients, batch size {args.batch_size}")
    print(
        f"{'round':<6} {'with req/s':>10} {'without req/s':>13} {'with p99 ms':>11} {'without p99 ms':>14} "
        f"{'with CPU ms/req':>15} {'without CPU ms/req':>18}"
    )
    for i, (w, wo) in enumerate(zip(result["rounds"]["with"], result["rounds"]["without"]), 1):
        print(
            f"{i:<6} {w['throughput']:>10.2f} {wo['throughput']:>13.2f} {w['p99']:>11} {wo['p99']:>14} "
            f"{w['server_cpu_ms_per_request']:>15.3f} {wo['server_cpu_ms_per_request']:>18.3f}"
        )
    print(f"wrote {out / 'bench_metrics.json'} and {out / 'bench_metrics.png'}")
    print(
        f"round ratios (with/without): {' '.join(f'{r:.3f}' for r in result['round_ratios'])}, "
        f"median {result['median_round_ratio']:.3f}"
    )
    cpu = result["server_cpu_ms_per_request"]
    print(
        f"server CPU per request (median of rounds): with {cpu['with']:.3f} ms, without {cpu['without']:.3f} ms, "
        f"{result['cpu_overhead_percent']:+.1f}%"
    )
    print(f"with/without={result['with_over_without']:.3f} overhead={result['overhead_percent']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
