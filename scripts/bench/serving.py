"""Serving speed, side by side in one run: bare handler, our archive served, the stock handler.

    scripts/bench_serving                      # ResNet-18 int8 (runs/digits_resnet18), 20 s per load, ~5 minutes
    scripts/bench_serving --runtime eager      # our fp32 path
    scripts/bench_serving --duration 5 --clients 1,4 --no-detector   # a quick look
    scripts/bench_serving --device gpu --runtime eager --autocast fp16 --gpu-decode   # on a GPU host
    scripts/bench_serving --litserve-python /path/to/venv/bin/python   # with LitServe beside it
    python -m scripts.bench.serving            # no --run: ResNet-18 with random weights, eager

On this machine, with the same weights and the same real JPEG bytes (scikit-image's
451x300 cat), it measures:
- bare:   our handler's preprocess + inference + postprocess called in-process, no server,
          with torch on every core, at batch 1 and at the archive's batch size;
- served: our .mar behind TorchServe REST, closed loop at each --clients count, and one
          open-loop run at --rate requests/s, sent by `wrk` and `hey` (scripts/bench/loadgen.py:
          the open loop is a rate per connection, and a run that fell behind says so), with
          the server's and the load generator's own CPU time per request;
- stock:  the same weights archived with TorchServe's stock `image_classifier` handler and
          no model configuration: one worker (the archive declares none), batch size 1;
- modelserver: the same archive behind the bundle's second engine, KServe's ModelServer
          (`scripts/serve start --engine kserve`), where kserve is installed (--modelserver);
- litserve: the same model class, weights and preprocessing behind LitServe with its own
          dynamic batching, tuned as ours (scripts/bench/litserve_app.py), where a Python with
          litserve is found (--litserve, --litserve-python);
- bodies: (--bodies 1,8,32) KServe v1 `instances` and v2 BYTES [N] bodies of N images against
          one image per request, on a TorchServe started as KServe starts it;
- detector: the light detector's per-image latency at its input size, bare vs served;
- presets (--presets, which scripts/bench_serving passes): the classifier under each runtime of
          --preset-runtimes and the detector, archived with each serving preset and
          measured at 1 and 4 clients against their bare handler (scripts/bench/presets.py).
The served sides take turns on one TorchServe, never side by side. A model of small inputs
(the digits CNN, small_cnn, at 32 px) is sent a 32 px PNG digit; the others the JPEG. It prints
a table, writes bench.json and bench.png to --out and a record to benchmarks/results/
(--record), and its last line is `served/bare=X.XX served/stock=Y.YY`, both throughput ratios at
4 clients (or the largest --clients count under 4 if 4 is not run).
Weights do not change speed: without --run a model of --model is built with random weights.

    scripts/bench_serving --model small_cnn --presets "" --no-detector --bodies 1,8,32   # the digits CNN
    scripts/bench_serving --model resnet18 --presets "" --no-detector                    # ResNet-18 eager
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from scripts.bench.harness import (
    bare,
    cat_jpeg,
    digit_png,
    preprocessing_ms,
    random_weights_run,
    request_context,
    unpack_handler,
)
from scripts.bench.loadgen import GENERATORS, Load, LoadError, fallback_note
from scripts.bench.presets import report as presets_report
from scripts.bench.presets import run_presets
from scripts.bench.record import write_record
from scripts.ops.client import Client
from scripts.ops.packaging import build_archive
from scripts.ops.serve import ServeError, TorchServe

ROOT = Path(__file__).resolve().parents[2]
# The served sides, in the order of the table and the plot.
SIDES = ("served", "stock", "modelserver", "litserve")

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


def load_side(
    name: str,
    url: str,
    headers: dict,
    body: bytes,
    content_type: str,
    args,
    expect_top1: str | None,
    server_pid: int | None,
    *,
    log: str = "",
    access_log: Path | None = None,
) -> dict:
    """One served side: its answer to the image checked against the bare handler's, then each
    closed loop of --clients and the open loop at --rate, by the chosen load generator. With
    TorchServe's `access_log`, a load that had errors says which statuses the server answered."""
    status, raw = Client(url, headers, content_type=content_type).send(body)
    try:
        answer = json.loads(raw) if status == 200 else None
    except ValueError:
        answer = None
    if answer is None:
        raise ServeError(f"{name} did not answer the benchmark image: {status or ''} {str(raw)[:300]}{log}")
    top1 = next(iter(answer)) if isinstance(answer, dict) else None
    if expect_top1 is not None and top1 != expect_top1:
        raise ServeError(f"{name} served answers {top1!r}, the bare handler {expect_top1!r}: not the same model")
    results: dict = {"answer": answer, "closed": []}
    with Load(
        url, headers, body, content_type=content_type, generator=args.load_generator, server_pid=server_pid
    ) as load:
        for clients in args.clients:
            print(f"  {name}: {clients} client(s), {args.duration:g} s ({load.generator})", flush=True)
            mark = access_log.stat().st_size if access_log and access_log.exists() else 0
            results["closed"].append(load.closed(clients, args.duration))
            if results["closed"][-1]["errors"] and access_log:
                results["closed"][-1]["server_statuses"] = statuses_since(access_log, mark)
        if args.rate:
            print(f"  {name}: open loop at {args.rate:g} req/s, {args.duration:g} s", flush=True)
            results["open"] = load.open(args.rate, args.duration)
    return results


def statuses_since(access_log: Path, offset: int) -> dict[str, int]:
    """How many of each status other than 200 TorchServe's access log recorded after `offset`
    (a load's errors, as the server saw them)."""
    with open(access_log, "rb") as f:
        f.seek(offset)
        found = re.findall(rb'" (\d{3}) ', f.read())
    return dict(Counter(code.decode() for code in found if code != b"200"))


def serve_and_load(
    ts: TorchServe, name: str, image: bytes, args, expect_top1: str | None, content_type: str = "image/jpeg"
) -> dict:
    """Register one archive of the server's store, run every load against it, unregister it."""
    version = ts.register(name, f"{name}.mar", timeout=300)
    try:
        url, headers = f"{ts.url('inference')}/predictions/{name}", ts.headers("inference")
        log = "\n" + ts.log_tail("model_log.log")
        access_log = ts.run_dir / "logs" / "access_log.log"
        return load_side(
            name, url, headers, image, content_type, args, expect_top1, ts.pid(), log=log, access_log=access_log
        )
    finally:
        ts.unregister(name, version)


# -- several images per request: KServe's v1 and v2 bodies ----------------------------------


def kserve_bodies(image: bytes, n: int) -> dict[str, tuple[str, bytes]]:
    """{protocol: (path under the inference address, JSON body)} of `n` copies of the image."""
    b64 = base64.b64encode(image).decode()
    v1 = {"instances": [{"data": b64}] * n}
    v2 = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [n], "data": [b64] * n}]}
    return {
        "v1": ("/v1/models/served:predict", json.dumps(v1).encode()),
        "v2": ("/v2/models/served/infer", json.dumps(v2).encode()),
    }


def bench_bodies(args, store: Path, work: Path, image: bytes, content_type: str) -> dict:
    """Our archive on a TorchServe started as KServe starts it (service_envelope=kservev2, which
    also routes v1), at --bodies-clients connections: one image per plain request, then v1
    `instances` and v2 BYTES [N] bodies of N images for each N of --bodies. Throughput counts
    images, not requests."""
    config = work / "kserve.properties"
    config.write_text((ROOT / "config.properties").read_text() + "\nservice_envelope=kservev2\n")
    ts = TorchServe(run_dir=work / "serve_kserve", model_store=store, config=config, ports={})
    ts.start([], timeout=300)
    clients = args.bodies_clients
    rows = []
    try:
        version = ts.register("served", "served.mar", timeout=300)
        base, headers = ts.url("inference"), ts.headers("inference")
        loads = [("plain", 1, f"{base}/predictions/served", image, content_type)]
        for n in args.bodies:
            for protocol, (path, body) in kserve_bodies(image, n).items():
                loads.append((protocol, n, base + path, body, "application/json"))
        for protocol, n, url, body, ctype in loads:
            status, raw = Client(url, headers, content_type=ctype).send(body)
            if status != 200:
                raise ServeError(f"KServe {protocol} body of {n} image(s) got {status or raw}: {str(raw)[:300]}")
            print(f"  kserve: {protocol} x {n}, {clients} client(s), {args.duration:g} s", flush=True)
            with Load(
                url,
                headers,
                body,
                content_type=ctype,
                generator=args.load_generator,
                server_pid=ts.pid(),
                items_per_request=n,
            ) as load:
                rows.append({"protocol": protocol, "images": n, **load.closed(clients, args.duration)})
        ts.unregister("served", version)
    finally:
        ts.stop()
    return {"clients": clients, "rows": rows}


# -- LitServe ------------------------------------------------------------------------------


def litserve_python(args) -> str | None:
    """The Python that runs LitServe: --litserve-python, else this one if it has litserve."""
    if args.litserve_python:
        return args.litserve_python
    return sys.executable if importlib.util.find_spec("litserve") else None


def healthy(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def bench_litserve(args, run: Path, image: bytes, expect_top1: str | None, work: Path) -> dict:
    """The same run served by LitServe (scripts/bench/litserve_app.py), tuned as our archive
    is for this machine: as many inference processes as our workers, each with the same torch
    threads, batching up to our batch size and waiting at most our batch delay."""
    from scripts.ops.serve import free_port

    python = litserve_python(args)
    assert python is not None
    threads = args.torch_threads or max(1, (os.cpu_count() or 1) // args.workers)
    settings = {
        "workers": args.workers,
        "threads": threads,
        "max_batch_size": args.batch_size,
        "batch_timeout": args.max_batch_delay / 1000,
        "accelerator": "cuda" if args.device == "gpu" else "cpu",
    }
    port = free_port()
    cmd = [python, "-m", "scripts.bench.litserve_app", "--run", str(run), "--port", str(port)]
    cmd += ["--workers", str(args.workers), "--threads", str(threads), "--max-batch-size", str(args.batch_size)]
    cmd += ["--batch-timeout", f"{settings['batch_timeout']:g}", "--accelerator", settings["accelerator"]]
    body = json.dumps({"image": base64.b64encode(image).decode()}).encode()
    base = f"http://127.0.0.1:{port}"
    side = external_side(
        "litserve", cmd, f"{base}/health", f"{base}/predict", body, "application/json", args, expect_top1, work
    )
    return {"settings": settings, "body": "JSON {'image': base64}", **side}


def bench_modelserver(args, store: Path, work: Path, image: bytes, content_type: str, expect_top1) -> dict:
    """The same archive served by the bundle's second engine, KServe's ModelServer
    (`scripts/serve start --engine kserve`), from the same model store and config, loaded the
    same way on its /predictions route."""
    from scripts.ops.modelserver import ModelServerEngine

    engine = ModelServerEngine(
        run_dir=work / "modelserver", model_store=store, config=ROOT / "config.properties", ports={}
    )
    engine.start(["served"], timeout=300)
    try:
        url, headers = f"{engine.url('inference')}/predictions/served", engine.headers("inference")
        return load_side("modelserver", url, headers, image, content_type, args, expect_top1, engine.pid())
    finally:
        engine.stop()


def external_side(
    name: str,
    cmd: list[str],
    health_url: str,
    url: str,
    body: bytes,
    content_type: str,
    args,
    expect_top1: str | None,
    work: Path,
    headers: dict | None = None,
) -> dict:
    """A server that is not TorchServe as one more side: `cmd` started in its own process
    group, loaded once `health_url` answers 200, stopped after. The server's CPU per request
    counts its process and every one it started."""
    log_path = work / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 300
        while not healthy(health_url) and proc.poll() is None:
            if time.time() > deadline:
                raise ServeError(f"{name} did not answer {health_url} in 300 s; see {log_path}")
            time.sleep(1)
        if proc.poll() is not None:
            raise ServeError(f"{name} exited with {proc.returncode}: {log_path.read_text()[-400:]}")
        return load_side(name, url, headers or {}, body, content_type, args, expect_top1, proc.pid)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


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
    head = ("what", "load", "img/s", "p50 ms", "p90 ms", "p99 ms", "errors", "server CPU ms/req", "client CPU ms/req")
    cells = [head] + [tuple("-" if v is None else str(v) for v in row) for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells
    )


def report_rows(result: dict) -> list[tuple]:
    def row(what, load, s):
        cpu = (s.get("server_cpu_ms_per_request"), s.get("generator_cpu_ms_per_request"))
        statuses = s.get("server_statuses")  # the server's own answers where the load had errors
        errors = f"{s['errors']} ({', '.join(f'{k}: {n}' for k, n in statuses.items())})" if statuses else s["errors"]
        return (what, load, s["throughput"], s["p50"], s["p90"], s["p99"], errors, *cpu)

    rows = [row("bare", f"batch {b['batch']}", b) for b in result["bare"]]
    for what in SIDES:
        if what in result:
            rows += [row(what, f"{c['clients']} client(s)", c) for c in result[what]["closed"]]
            if "open" in result[what]:
                rows.append(row(what, f"open {result[what]['open']['rate']:g}/s", result[what]["open"]))
    if "bodies" in result:
        for b in result["bodies"]["rows"]:
            rows.append(row(f"kserve {b['protocol']} x{b['images']}", f"{b['clients']} client(s)", b))
    if "detector" in result:
        d = result["detector"]
        rows += [row("detector bare", "batch 1", d["bare"]), row("detector served", "1 client", d["served"])]
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if "bodies" in result else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5))
    ax1, ax2 = axes[0], axes[1]
    clients = [c["clients"] for c in result["served"]["closed"]]
    x = np.arange(len(clients))
    kinds = [k for k in SIDES if k in result]
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
    if "bodies" in result:
        rows = result["bodies"]["rows"]
        ax3 = axes[2]
        labels = [f"{r['protocol']} x{r['images']}" for r in rows]
        ax3.bar(range(len(rows)), [r["throughput"] for r in rows], color="tab:green")
        ax3.set_xticks(range(len(rows)), labels, rotation=30)
        ax3.set_ylabel(f"images / s at {result['bodies']['clients']} client(s)")
        ax3.set_title("images per request (KServe v1/v2 bodies)", fontsize=9)
    fig.suptitle(
        f"{result['model']} ({result['runtime']}), {result['image']}, {result['machine']}, "
        f"load by {result['load_generator']}",
        fontsize=9,
    )
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
        with Load(url, headers, image, generator=args.load_generator, server_pid=ts.pid()) as load:
            served = load.closed(1, args.duration)
    finally:
        ts.unregister("detector", version)
    return {"run": str(run), "weights": weights, "input_size": input_size, "bare": bare_result, "served": served}


def bare_threads(handler, image: bytes, seconds: float) -> int:
    """The faster torch thread count for the bare handler, every core or one (a short probe
    of each at batch 1); torch is left set to it."""
    import torch

    cores = os.cpu_count() or 1
    if cores == 1 or handler.device.type != "cpu":
        return torch.get_num_threads()
    rates = {}
    for threads in (cores, 1):
        torch.set_num_threads(threads)
        rates[threads] = bare(handler, image, 1, min(2.0, seconds / 4))["throughput"]
    best = max(rates, key=lambda t: rates[t])
    torch.set_num_threads(best)
    return best


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
    if args.run and not (Path(args.run) / "model.json").is_file():
        raise ValueError(f"training output folder {args.run} does not exist or holds no model.json")
    run = Path(args.run) if args.run else random_weights_run(args.model, work / "run")
    meta = json.loads((run / "model.json").read_text())
    # A model of small inputs (the digits CNN at 32 px) is served what it was trained on: a
    # small PNG digit; the others the 451x300 JPEG photo.
    small = int(meta.get("preprocessing", {}).get("input_size", 224)) <= 64
    image, content_type, image_name = (
        (digit_png(), "image/png", "scikit-learn digit 32x32 PNG")
        if small
        else (cat_jpeg(), "image/jpeg", "skimage chelsea 451x300 JPEG")
    )
    if not args.no_stock and meta["arch"] not in STOCK_LAYOUTS:
        print(f"stock: skipped, TorchServe's stock handler serves torchvision's ResNets, not {meta['arch']}")
        args.no_stock = True
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
        "image": image_name,
        "machine": machine(),
        "load_generator": None,
        "duration_s": args.duration,
        "config": yaml.safe_load(zipfile.ZipFile(store / "served.mar").read("model-config.yaml")),
    }
    # Bare is the best this machine does in-process: torch on every core, or on one where that
    # is faster (a small model's OpenMP barriers stall when other processes hold the cores).
    handler, config = unpack_handler(
        store / "served.mar",
        work / "served_unpacked",
        torch_threads=os.cpu_count(),
        gpu=0 if args.device != "cpu" and torch.cuda.is_available() else None,
    )
    result["preprocess_ms"] = preprocessing_ms(handler, image)
    result["bare_threads"] = bare_threads(handler, image, args.duration)
    print(
        f"bare handler in-process ({result['bare_threads']} torch threads), "
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
        result["served"] = serve_and_load(ts, "served", image, args, expect, content_type)
        result["load_generator"] = result["served"]["closed"][0]["generator"]
        if not args.no_stock:
            stock_archive(run, store, work)
            print("stock: TorchServe's image_classifier handler, default model configuration", flush=True)
            result["stock"] = serve_and_load(ts, "stock", image, args, expect, content_type)
        if not args.presets and not args.no_detector:
            result["detector"] = bench_detector(args, image, work, ts)
    finally:
        if server is None:
            ts.stop()
    if args.bodies:
        print("kserve: several images per request, on a TorchServe started as KServe starts it", flush=True)
        result["bodies"] = bench_bodies(args, store, work, image, content_type)
    if args.modelserver != "off":
        if importlib.util.find_spec("kserve") is None:
            if args.modelserver == "on":
                raise ValueError("--modelserver on: kserve is not installed here (the kserve dependency group)")
            print("modelserver: skipped, kserve is not installed here", flush=True)
        else:
            print("modelserver: our archive behind KServe's ModelServer (--engine kserve)", flush=True)
            result["modelserver"] = bench_modelserver(args, store, work, image, content_type, expect)
    if args.litserve != "off":
        if litserve_python(args) is None:
            if args.litserve == "on":
                raise ValueError("--litserve on: no Python with litserve; name one with --litserve-python")
            print("litserve: skipped, no Python with litserve here (--litserve-python names one)", flush=True)
        else:
            print("litserve: the same model and preprocessing behind LitServe", flush=True)
            result["litserve"] = bench_litserve(args, run, image, expect, work)
    if args.presets:  # the detector is measured there, under each preset, on servers of their own
        args.properties = ROOT / "config.properties"
        detector = None if args.no_detector else detector_run(args, work)[0]
        result["presets"] = run_presets(args, run, detector, image, work)
    result["ratios"] = ratios(result)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def ratios(result: dict) -> dict:
    """served/bare and served/stock at 4 clients (or the nearest count under it), served/bare at
    the best concurrency, and against LitServe: throughput at 16 clients, p99 at 4."""
    closed = {c["clients"]: c for c in result["served"]["closed"]}
    at = 4 if 4 in closed else max([c for c in closed if c <= 4] or closed)
    served = closed[at]
    best_bare = max(b["throughput"] for b in result["bare"])
    bare_at_batch = result["bare"][-1]  # the archive's batch size
    best = max(closed.values(), key=lambda c: c["throughput"])
    out = {
        "clients": at,
        "served_over_bare": round(served["throughput"] / bare_at_batch["throughput"], 2),
        "best_clients": best["clients"],
        "best_served_over_bare": round(best["throughput"] / best_bare, 2),
    }
    if "stock" in result:
        stock = {c["clients"]: c for c in result["stock"]["closed"]}[at]
        out["served_over_stock"] = round(served["throughput"] / stock["throughput"], 2) if stock["throughput"] else None
        out["p99_served_over_stock"] = round(served["p99"] / stock["p99"], 2) if stock["p99"] else None
    if "modelserver" in result:
        engine = {c["clients"]: c for c in result["modelserver"]["closed"]}
        for c in sorted(set(engine) & set(closed)):
            if closed[c]["throughput"]:
                out[f"modelserver_over_served_{c}"] = round(engine[c]["throughput"] / closed[c]["throughput"], 2)
    if "litserve" in result:
        lit = {c["clients"]: c for c in result["litserve"]["closed"]}
        if 16 in lit and 16 in closed and lit[16]["throughput"]:
            out["served_over_litserve_16"] = round(closed[16]["throughput"] / lit[16]["throughput"], 2)
        if 4 in lit and 4 in closed and lit[4]["p99"] and closed[4]["p99"]:
            out["p99_served_over_litserve_4"] = round(closed[4]["p99"] / lit[4]["p99"], 2)
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
    p.add_argument(
        "--clients", default="1,4,16,64", help="closed-loop client counts, comma-separated (default: 1,4,16,64)"
    )
    p.add_argument(
        "--load-generator",
        default="auto",
        help=f"{', '.join(GENERATORS)}: auto = native (wrk and hey) where installed, else the Python client "
        "(default: auto)",
    )
    p.add_argument(
        "--bodies",
        default="",
        help="KServe v1 and v2 bodies of N images each, comma-separated N (e.g. 1,8,32), against one image per "
        "request on a TorchServe with service_envelope=kservev2 (default: none)",
    )
    p.add_argument("--bodies-clients", type=int, default=4, help="connections of the --bodies loads (default: 4)")
    p.add_argument(
        "--modelserver",
        choices=("auto", "on", "off"),
        default="auto",
        help="the same archive served by KServe's ModelServer (scripts/serve start --engine kserve): "
        "auto = where kserve is installed (default: auto)",
    )
    p.add_argument(
        "--litserve",
        choices=("auto", "on", "off"),
        default="auto",
        help="the same model behind LitServe: auto = where a Python with litserve is found (default: auto)",
    )
    p.add_argument(
        "--litserve-python",
        default=None,
        help="a Python with litserve and the bundle's dependencies (default: this one, if it has litserve)",
    )
    p.add_argument(
        "--record",
        default="auto",
        help="record name under benchmarks/results/: auto = serving_<model>_<runtime>_<cpu|gpu>, '' for none "
        "(default: auto)",
    )
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
    try:
        args.bodies = sorted({int(n) for n in args.bodies.split(",") if n.strip()})
    except ValueError:
        print(f"error: --bodies expects numbers like 1,8,32, got {args.bodies!r}", file=sys.stderr)
        return 2
    if args.load_generator not in GENERATORS:
        choices = ", ".join(GENERATORS)
        print(f"error: --load-generator {args.load_generator!r}: choose one of {choices}", file=sys.stderr)
        return 2
    if (args.bodies and min(args.bodies) < 1) or args.bodies_clients < 1:
        print("error: --bodies needs image counts of at least 1 and --bodies-clients at least 1", file=sys.stderr)
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
    except (ServeError, LoadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "bench.png")
    print()
    print(
        f"{result['model']} ({result['weights']} weights, runtime {result['runtime']}) on {result['machine']}; "
        f"preprocessing {result['preprocess_ms']} ms per image ({result['image']})"
    )
    note = fallback_note(result["load_generator"])
    if note:
        print(note)
    print(table(report_rows(result)))
    if "presets" in result:
        print(f"\npresets (bare = the archive's handler in-process, {os.cpu_count()} torch threads)")
        print(presets_report(result["presets"]))
    if args.record:
        device = "gpu" if "no GPU" not in result["machine"] else "cpu"
        name = args.record if args.record != "auto" else f"serving_{result['model']}_{result['runtime']}_{device}"
        print(f"record: {write_record(name, result)}")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    r = result["ratios"]
    print(
        f"best served/bare={r['best_served_over_bare']:.2f} at {r['best_clients']} client(s)"
        + "".join(f" {k}={v}" for k, v in r.items() if "litserve" in k)
    )
    line = f"served/bare={r['served_over_bare']:.2f}"
    if "served_over_stock" in r:  # None when the stock side answered nothing
        line += f" served/stock={r['served_over_stock'] or 0:.2f}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
