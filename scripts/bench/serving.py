"""Serving speed, side by side in one run: bare handler, our archive served, the stock handler.

    scripts/bench_serving                      # ResNet-18 int8 (runs/digits_resnet18), 20 s per load, ~5 minutes
    scripts/bench_serving --runtime eager      # our fp32 path
    scripts/bench_serving --duration 5 --clients 1,4 --no-detector   # a quick look
    scripts/bench_serving --device gpu --runtime eager --autocast fp16 --gpu-decode   # on a GPU host
    python -m scripts.bench.serving            # no --run: ResNet-18 with random weights, eager

On this machine, with the same weights and the same real JPEG bytes (scikit-image's
451x300 cat), it measures:
- bare:   our handler's preprocess + inference + postprocess called in-process, no server,
          with torch on every core, at batch 1 and at the archive's batch size;
- served: our .mar behind TorchServe REST, closed loop at each --clients count, and one
          open-loop run at --rate requests/s (latency from the scheduled send time, so a
          server that falls behind is not flattered);
- stock:  the same weights archived with TorchServe's stock `image_classifier` handler and
          no model configuration: one worker (the archive declares none), batch size 1;
- detector: the light detector's per-image latency at its input size, bare vs served;
- presets (--presets, which scripts/bench_serving passes): the classifier under each runtime of
          --preset-runtimes and the detector, archived with each serving preset and
          measured at 1 and 4 clients against their bare handler (scripts/bench/presets.py).
The served sides take turns on one TorchServe, never side by side. It prints a table,
writes bench.json and bench.png to --out, and its last line is `served/bare=X.XX
served/stock=Y.YY`, both throughput ratios at 4 clients (or the largest --clients count
under 4 if 4 is not run).
Weights do not change speed: without --run a model of --model is built with random weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import yaml

from scripts.bench.harness import (
    bare,
    cat_jpeg,
    closed_loop,
    open_loop,
    preprocessing_ms,
    random_weights_run,
    request_context,
    unpack_handler,
)
from scripts.bench.presets import report as presets_report
from scripts.bench.presets import run_presets
from scripts.ops.client import Client
from scripts.ops.packaging import build_archive
from scripts.ops.serve import ServeError, TorchServe

ROOT = Path(__file__).resolve().parents[2]

STOCK_MODEL_FILE = '''"""{arch} as TorchServe's stock handlers want it: one class, built with no arguments."""
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck


class Stock(torchvision.models.ResNet):
    def __init__(self):
        super().__init__({block}, {layers}, num_classes={num_classes})
'''
STOCK_LAYOUTS = {"resnet18": ("BasicBlock", [2, 2, 2, 2]), "resnet50": ("Bottleneck", [3, 4, 6, 3])}


# -- inputs -----------------------------------------------------------------------------


# -- measuring --------------------------------------------------------------------------


def serve_and_load(ts: TorchServe, name: str, image: bytes, args, expect_top1: str | None) -> dict:
    """Register one archive of the server's store, run every load against it, unregister it."""
    version = ts.register(name, f"{name}.mar", timeout=300)
    try:
        url, headers = f"{ts.url('inference')}/predictions/{name}", ts.headers("inference")
        ok, answer = Client(url, headers).post(image)
        if not ok:
            raise ServeError(f"{name} did not answer the benchmark image: {answer}\n{ts.log_tail('model_log.log')}")
        top1 = next(iter(answer)) if isinstance(answer, dict) else None
        if expect_top1 is not None and top1 != expect_top1:
            raise ServeError(f"{name} served answers {top1!r}, the bare handler {expect_top1!r}: not the same model")
        results = {"answer": answer, "closed": []}
        for clients in args.clients:
            print(f"  {name}: {clients} client(s), {args.duration:.0f} s", flush=True)
            results["closed"].append(closed_loop(url, headers, image, clients, args.duration))
        if args.rate:
            print(f"  {name}: open loop at {args.rate:g} req/s, {args.duration:.0f} s", flush=True)
            results["open"] = open_loop(url, headers, image, args.rate, args.duration)
        return results
    finally:
        ts.unregister(name, version)


# -- the archives -----------------------------------------------------------------------


def stock_archive(run: Path, store: Path, work: Path, name: str = "stock") -> None:
    """The same weights with TorchServe's stock image_classifier handler and no model config."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    meta = json.loads((run / "model.json").read_text())
    if meta["arch"] not in STOCK_LAYOUTS:
        raise ValueError(
            f"the stock comparison needs a run of {' or '.join(STOCK_LAYOUTS)} (torchvision's layout), "
            f"got {meta['arch']}"
        )
    block, layers = STOCK_LAYOUTS[meta["arch"]]
    stage = work / name
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "model.py").write_text(
        STOCK_MODEL_FILE.format(arch=meta["arch"], block=block, layers=layers, num_classes=len(meta["classes"]))
    )
    (stage / "index_to_name.json").write_text(json.dumps({str(i): c for i, c in enumerate(meta["classes"])}))
    generate_model_archive(
        ModelArchiverConfig(
            model_name=name,
            handler="image_classifier",
            version="1.0",
            model_file=str(stage / "model.py"),
            serialized_file=str(run / "model.pt"),
            extra_files=str(stage / "index_to_name.json"),
            export_path=str(store),
            force=True,
        )
    )


def stock_config(work: Path) -> Path:
    """config.properties without our per-model worker default: TorchServe's own (one per core)."""
    text = (ROOT / "config.properties").read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith("default_workers_per_model")]
    path = work / "stock.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- report -----------------------------------------------------------------------------


def table(rows: list[tuple]) -> str:
    head = ("what", "load", "img/s", "p50 ms", "p90 ms", "p99 ms", "errors")
    cells = [head] + [tuple("-" if v is None else str(v) for v in row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells
    )


def report_rows(result: dict) -> list[tuple]:
    def row(what, load, s):
        return (what, load, s["throughput"], s["p50"], s["p90"], s["p99"], s["errors"])

    rows = [row("bare", f"batch {b['batch']}", b) for b in result["bare"]]
    for what in ("served", "stock"):
        if what in result:
            rows += [row(what, f"{c['clients']} client(s)", c) for c in result[what]["closed"]]
            if "open" in result[what]:
                rows.append(row(what, f"open {result[what]['open']['rate']:g}/s", result[what]["open"]))
    if "detector" in result:
        d = result["detector"]
        rows += [row("detector bare", "batch 1", d["bare"]), row("detector served", "1 client", d["served"])]
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    clients = [c["clients"] for c in result["served"]["closed"]]
    x = np.arange(len(clients))
    kinds = [k for k in ("served", "stock") if k in result]
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        ax1.bar(x + i * width, [c["throughput"] for c in result[kind]["closed"]], width, label=kind)
        ax2.bar(x + i * width, [c["p99"] or 0 for c in result[kind]["closed"]], width, label=f"{kind} p99")
        ax2.plot(x + i * width, [c["p50"] or 0 for c in result[kind]["closed"]], "k_", markersize=14)
    best_bare = max(b["throughput"] for b in result["bare"])
    ax1.axhline(best_bare, color="grey", linestyle="--", label=f"bare handler ({best_bare:g} img/s)")
    for ax, ylabel in ((ax1, "images / s"), (ax2, "latency ms (bar p99, tick p50)")):
        ax.set_xticks(x + width * (len(kinds) - 1) / 2, [f"{c} client(s)" for c in clients])
        ax.set_ylabel(ylabel)
        ax.legend()
    ax2.set_yscale("log")
    fig.suptitle(f"{result['model']} ({result['runtime']}), {result['image']}, {result['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the run ----------------------------------------------------------------------------


def detector_run(args, work: Path) -> tuple[Path, str]:
    """(--detector's run, or runs/shapes_det, or FCOS with random weights; "trained" or "random")."""
    run = Path(args.detector) if args.detector != "auto" else ROOT / "runs" / "shapes_det"
    if (run / "model.json").is_file() and json.loads((run / "model.json").read_text())["task"] == "detection":
        return run, "trained"
    return random_weights_run("fcos_regnet_x_400mf", work / "detector_run", num_classes=3), "random"


def bench_detector(args, image: bytes, work: Path, ts: TorchServe) -> dict:
    run, weights = detector_run(args, work)
    build_archive(run, "detector", ts.model_store, {"batch_size": 1, "max_batch_delay": 0}, force=True)
    handler, _ = unpack_handler(
        ts.model_store / "detector.mar", work / "detector_unpacked", torch_threads=os.cpu_count()
    )
    input_size = handler.data_config.input_size
    print(
        f"detector: {json.loads((run / 'model.json').read_text())['arch']} ({weights} weights) at {input_size} px",
        flush=True,
    )
    bare_result = bare(handler, image, 1, args.duration)
    version = ts.register("detector", "detector.mar", timeout=300)
    try:
        url, headers = f"{ts.url('inference')}/predictions/detector", ts.headers("inference")
        served = closed_loop(url, headers, image, 1, args.duration)
    finally:
        ts.unregister("detector", version)
    return {"run": str(run), "weights": weights, "input_size": input_size, "bare": bare_result, "served": served}


def run_bench(args, server: TorchServe | None = None) -> dict:
    """Every side of the benchmark; `server`: a running TorchServe to register the served sides
    on (built into its model store), else one is started with the bundle's config.properties.

    Each served side is registered for its own loads and unregistered after them. Before,
    each side had a server of its own, the stock one's without config.properties'
    `default_workers_per_model`; that default never applied, since every registration names
    its workers (the archive's minWorkers: 1 for the stock archive, which declares none). What
    differs: a later side finds the JVM warmed by the earlier ones (the closed loop's unmeasured
    warm-up covers the rest), and the detector's bare handler is timed beside an idle server."""
    import torch

    if args.device == "gpu":
        require_gpu()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=out))
    ts = server or TorchServe(
        run_dir=work / "serve", model_store=work / "model_store", config=ROOT / "config.properties", ports={}
    )
    store = ts.model_store
    store.mkdir(exist_ok=True)
    image = cat_jpeg()
    if args.run and not (Path(args.run) / "model.json").is_file():
        raise ValueError(f"training output folder {args.run} does not exist or holds no model.json")
    run = Path(args.run) if args.run else random_weights_run(args.model, work / "run")
    meta = json.loads((run / "model.json").read_text())
    # Measured on the 2-core machine (docs/performance.md): a worker per core with one torch
    # thread each, and small batches, beat one worker with every core (no OpenMP barriers
    # stalled by the frontend's threads; two batches in flight instead of one).
    on_gpu = args.device == "gpu" or (args.device == "auto" and torch.cuda.is_available())
    if args.workers is None:
        args.workers = 1 if on_gpu else os.cpu_count() or 1
    if args.batch_size is None:
        args.batch_size = 8 if on_gpu else 2
    options = {
        "workers": args.workers,
        "batch_size": args.batch_size,
        "max_batch_delay": args.max_batch_delay,
        "torch_threads": args.torch_threads,
        "device": args.device,
        "handler": {},
    }
    if args.runtime != "eager":
        options["runtime"] = args.runtime
    if args.autocast:
        options["handler"]["autocast"] = args.autocast
    if args.gpu_decode:
        options["handler"]["gpu_decode"] = True
    build_archive(run, "served", store, options, force=True)

    result = {
        "model": meta["arch"],
        "weights": "trained" if args.run else "random",
        "runtime": args.runtime,
        "image": "skimage chelsea 451x300 JPEG",
        "machine": machine(),
        "duration_s": args.duration,
        "config": yaml.safe_load(zipfile.ZipFile(store / "served.mar").read("model-config.yaml")),
    }
    # Bare is the best this machine does in-process: torch gets every core.
    handler, config = unpack_handler(
        store / "served.mar",
        work / "served_unpacked",
        torch_threads=os.cpu_count(),
        gpu=0 if args.device != "cpu" and torch.cuda.is_available() else None,
    )
    result["preprocess_ms"] = preprocessing_ms(handler, image)
    print(
        f"bare handler in-process ({handler.threads_per_worker()} torch threads), "
        f"preprocessing {result['preprocess_ms']} ms/image",
        flush=True,
    )
    batches = sorted({1, int(config["batchSize"])})
    result["bare"] = [bare(handler, image, b, args.duration) for b in batches]
    expect = next(iter(handler.handle([{"body": image}], request_context(1))[0]))
    del handler

    if server is None:
        ts.start([], timeout=300)
    try:
        print("served: our archive behind TorchServe", flush=True)
        result["served"] = serve_and_load(ts, "served", image, args, expect)
        if not args.no_stock:
            stock_archive(run, store, work)
            print("stock: TorchServe's image_classifier handler, default model configuration", flush=True)
            result["stock"] = serve_and_load(ts, "stock", image, args, expect)
        if not args.presets and not args.no_detector:
            result["detector"] = bench_detector(args, image, work, ts)
    finally:
        if server is None:
            ts.stop()
    if args.presets:  # the detector is measured there, under each preset, on servers of their own
        args.properties = ROOT / "config.properties"
        detector = None if args.no_detector else detector_run(args, work)[0]
        result["presets"] = run_presets(args, run, detector, image, work)
    result["ratios"] = ratios(result)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def ratios(result: dict) -> dict:
    closed = {c["clients"]: c for c in result["served"]["closed"]}
    at = 4 if 4 in closed else max([c for c in closed if c <= 4] or closed)
    served = closed[at]
    bare_at_batch = result["bare"][-1]  # the archive's batch size
    out = {"clients": at, "served_over_bare": round(served["throughput"] / bare_at_batch["throughput"], 2)}
    if "stock" in result:
        stock = {c["clients"]: c for c in result["stock"]["closed"]}[at]
        out["served_over_stock"] = round(served["throughput"] / stock["throughput"], 2) if stock["throughput"] else None
        out["p99_served_over_stock"] = round(served["p99"] / stock["p99"], 2) if stock["p99"] else None
    return out


def require_gpu(what: str = "--device gpu", instead: str = "; use --device cpu") -> None:
    """Refuse, in one line that names what is missing, to measure a GPU that is not there."""
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        raise ValueError(
            f"{what}: torch {torch.__version__} ({build}) sees no CUDA device here "
            f"(no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides them){instead}"
        )


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench_serving", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", default=None, help="training output folder to serve (default: random weights of --model)")
    p.add_argument(
        "--model",
        default="resnet18",
        help="registered classifier to build with random weights when no --run (default: resnet18)",
    )
    p.add_argument(
        "--runtime",
        default="eager",
        help="runtime of our archive: eager, torchscript, onnx, int8, compile (default: eager)",
    )
    p.add_argument(
        "--autocast", choices=("bf16", "fp16"), default=None, help="run our model under autocast (default: off)"
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="our workers' device: auto = the GPU where there is one; gpu on a GPU host (default: auto)",
    )
    p.add_argument(
        "--gpu-decode", action="store_true", help="decode JPEGs on the GPU (nvJPEG) in our handler (default: off)"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="our archive's workers (default: one per core on the CPU, 1 on a GPU)"
    )
    p.add_argument(
        "--torch-threads", type=int, default=0, help="torch threads per worker, 0 = cores / workers (default: 0)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="our archive's batchSize (default: 2 on the CPU, 8 on a GPU)"
    )
    p.add_argument("--max-batch-delay", type=int, default=5, help="our archive's maxBatchDelay in ms (default: 5)")
    p.add_argument("--clients", default="1,4,16", help="closed-loop client counts, comma-separated (default: 1,4,16)")
    p.add_argument("--rate", type=float, default=8.0, help="open-loop request rate per second; 0 skips it (default: 8)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per measurement (default: 20)")
    p.add_argument(
        "--presets",
        default="",
        help="serving presets to measure side by side, comma-separated (latency,throughput,balanced), each "
        "archived for this host and served at 1 and 4 clients against the bare handler; scripts/bench_serving "
        "passes all three (default: none)",
    )
    p.add_argument(
        "--preset-runtimes",
        default="int8,eager",
        help="the classifier's runtimes measured under --presets (default: int8,eager)",
    )
    p.add_argument("--no-stock", action="store_true", help="skip the stock-handler comparison (default: off)")
    p.add_argument("--no-detector", action="store_true", help="skip the detector latency (default: off)")
    p.add_argument(
        "--detector",
        default="auto",
        help="detection run to time (default: runs/shapes_det if trained, else random FCOS)",
    )
    p.add_argument(
        "--out", default=str(ROOT / "runs" / "bench"), help="where bench.json and bench.png go (default: runs/bench)"
    )
    p.add_argument("--keep", action="store_true", help="keep the archives and server logs under --out (default: off)")
    return p


def main(argv: list[str] | None = None, *, server: TorchServe | None = None) -> int:
    """The command line; `server` (from Python only): a running TorchServe to measure the
    served sides on instead of starting one (see run_bench)."""
    args = get_args_parser().parse_args(argv)
    try:
        args.clients = sorted({int(c) for c in args.clients.split(",") if c.strip()})
    except ValueError:
        print(f"error: --clients expects numbers like 1,4,16, got {args.clients!r}", file=sys.stderr)
        return 2
    if not args.clients or min(args.clients) < 1 or args.duration <= 0:
        print("error: --clients needs counts of at least 1 and --duration a positive number", file=sys.stderr)
        return 2
    from handlers.runtimes import RUNTIMES
    from scripts.ops.presets import PRESETS

    wrong = [p for p in args.presets.split(",") if p and p not in PRESETS]
    wrong += [r for r in args.preset_runtimes.split(",") if r and r not in RUNTIMES]
    if wrong:
        print(
            f"error: --presets / --preset-runtimes: unknown {', '.join(wrong)}; presets are "
            f"{', '.join(PRESETS)}, runtimes {', '.join(RUNTIMES)}",
            file=sys.stderr,
        )
        return 2
    try:
        result = run_bench(args, server)
    except (ServeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "bench.png")
    print()
    print(
        f"{result['model']} ({result['weights']} weights, runtime {result['runtime']}) on {result['machine']}; "
        f"preprocessing {result['preprocess_ms']} ms per 451x300 JPEG"
    )
    print(table(report_rows(result)))
    if "presets" in result:
        print(f"\npresets (bare = the archive's handler in-process, {os.cpu_count()} torch threads)")
        print(presets_report(result["presets"]))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    r = result["ratios"]
    line = f"served/bare={r['served_over_bare']:.2f}"
    if "served_over_stock" in r:  # None when the stock side answered nothing
        line += f" served/stock={r['served_over_stock'] or 0:.2f}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
