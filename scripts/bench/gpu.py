"""Serving on a GPU, side by side in one run: where the time goes, and what each option buys.

    scripts/bench_gpu                                  # ResNet-18 and ResNet-50, about 6 minutes on one GPU
    scripts/bench_gpu --models resnet18 --batches 1,8 --duration 1   # a quick look

For each model (random weights: speed does not depend on them; 224 px, ImageNet preprocessing),
with the same real JPEG (scikit-image's 451x300 cat), it measures in one run:
- model: the runner alone on a batch already on the GPU, at each batch size (the ceiling);
- bare:  our handler's whole handle() in-process (decode, preprocess, one pinned copy,
         inference, postprocess) at each batch size, for eager fp32, fp16 and bf16 autocast,
         TorchScript, ONNX Runtime (CUDA provider where installed) and nvJPEG decode;
- stages: per image, CPU decode vs nvJPEG decode, and the resize/crop/normalize on each side;
- served: the same archives behind one TorchServe (REST, --clients keep-alive connections from
         `wrk`, or Python clients over several processes where it is missing), ours at the best
         configuration and TorchServe's stock image_classifier handler with its default model
         configuration as the baseline, with the server's and the client's CPU per request.
It writes bench_gpu.json and bench_gpu.png to --out and a record (--record), prints one table; its last line is
`served/bare=X.XX served/stock=Y.YY` for the first model at its best batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from scripts.bench.harness import bare, cat_jpeg, closed_loop_raw, random_weights_run, summary, unpack_handler
from scripts.bench.loadgen import GENERATORS, Load, pick
from scripts.bench.record import write_record
from scripts.bench.serving import ROOT, STOCK_LAYOUTS, machine, require_gpu, stock_archive, stock_config, table

# What each bare row runs: the archive's runtime, its handler options.
CONFIGS = {
    "eager fp32": ("eager", {}),
    "eager fp16": ("eager", {"autocast": "fp16"}),
    "eager bf16": ("eager", {"autocast": "bf16"}),
    "eager fp16 nvjpeg": ("eager", {"autocast": "fp16", "gpu_decode": True}),
    "torchscript": ("torchscript", {}),
    "onnx": ("onnx", {}),
}


def gpu_info() -> dict:
    """The GPU, its driver and the CUDA torch was built with, for the report."""
    import torch

    info = {
        "gpu": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import subprocess

        info["driver"] = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            .stdout.strip()
            .splitlines()[0]
        )
    except (OSError, IndexError, subprocess.SubprocessError):
        info["driver"] = "unknown (nvidia-smi did not answer)"
    return info


def onnx_on_gpu() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def val_folder(work: Path, classes: list[str], per_class: int = 4) -> Path:
    """A few real images per class folder, for the archive-time check of TorchScript / ONNX
    against eager (a small set: that check runs on the CPU)."""
    from training.sample_data import write_digits

    digits = work / "digits"
    write_digits(digits, size=32, test_fraction=0.2, seed=0)
    val = work / "val"
    for c in classes:
        (val / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((digits / "test" / c).glob("*.png"))[:per_class]:
            shutil.copy(f, val / c / f.name)
    return val


def model_only(runner, shape: tuple, batch: int, seconds: float) -> dict:
    """The runner alone on a float batch already on the GPU: the most a handler could reach."""
    import torch

    x = torch.randn(batch, *shape, device="cuda")
    for _ in range(3):
        runner(x)
    torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        runner(x)
        torch.cuda.synchronize()
        n += 1
    return {"batch": batch, "throughput": round(n * batch / (time.perf_counter() - start), 1)}


def stage_ms(handler, image: bytes, n: int = 200) -> dict:
    """Median ms per image of decode and of resize/crop/normalize, on the CPU and with nvJPEG."""
    import torch

    from model_defs.preprocessing import load_image_tensor

    def median_ms(fn) -> float:
        for _ in range(10):
            fn()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return round(float(np.median(times)) * 1000, 3)

    cpu_img = load_image_tensor(image, 3)
    gpu_img = load_image_tensor(image, 3, device="cuda")
    return {
        "decode_cpu": median_ms(lambda: load_image_tensor(image, 3)),
        "decode_nvjpeg": median_ms(lambda: load_image_tensor(image, 3, device="cuda")),
        "transform_cpu": median_ms(lambda: handler.transform(cpu_img)),
        "transform_gpu": median_ms(lambda: handler.transform(gpu_img)),
        "nvjpeg_max_abs_pixel_diff": int((gpu_img.cpu().int() - cpu_img.int()).abs().max()),
    }


def load_processes(url: str, headers: dict, image: bytes, clients: int, seconds: float, processes: int) -> dict:
    """A closed loop of `clients` keep-alive clients spread over `processes` load processes
    (one Python process cannot post thousands of requests a second alone)."""
    processes = max(1, min(processes, clients))
    share = [clients // processes + (i < clients % processes) for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        parts = list(
            pool.map(
                closed_loop_raw,
                [url] * processes,
                [headers] * processes,
                [image] * processes,
                share,
                [seconds] * processes,
            )
        )
    latencies = [t for lat, _ in parts for t in lat]
    return summary(latencies, sum(e for _, e in parts), seconds) | {"clients": clients}


def bench_model(arch: str, args, work: Path, store: Path, image: bytes) -> dict:
    """Every bare row of one model; builds its archives into `store` on the way."""
    import torch

    from scripts.ops.packaging import build_archive

    # The digits' class folders name the classes, so TorchScript and ONNX can be checked against eager.
    classes = [str(i) for i in range(10)]
    run = random_weights_run(arch, work / f"run_{arch}", classes=classes)
    val = val_folder(work, classes)
    result = {"arch": arch, "configs": {}}
    best = max(args.batches)
    for label, (runtime, handler_opts) in CONFIGS.items():
        if label not in args.configs:
            continue
        if runtime == "onnx" and not onnx_on_gpu():
            result["configs"][label] = {
                "skipped": "onnxruntime here has no CUDAExecutionProvider (install onnxruntime-gpu on GPU hosts)"
            }
            continue
        name = f"{arch}_{label.replace(' ', '_')}"
        options = {
            "workers": 1,
            "batch_size": best,
            "max_batch_delay": args.max_batch_delay,
            "device": "gpu",
            "runtime": runtime,
            "handler": handler_opts,
        }
        print(f"{arch} {label}: archiving", flush=True)
        build_archive(run, name, store, options, force=True, val_data=val if runtime != "eager" else None)
        handler, config = unpack_handler(store / f"{name}.mar", work / f"unpacked_{name}", gpu=0)
        shape = (3, handler.data_config.input_size, handler.data_config.input_size)
        row = {
            "runtime": runtime,
            "handler": handler_opts,
            "model": [model_only(handler.runner, shape, b, args.duration / 2) for b in args.batches],
            "bare": [bare(handler, image, b, args.duration) for b in args.batches],
        }
        if not any("stages" in c for c in result["configs"].values()):
            row["stages"] = stage_ms(handler, image)
        result["configs"][label] = row
        del handler
        torch.cuda.empty_cache()
        best_bare = max(row["bare"], key=lambda r: r["throughput"])
        print(
            f"  best bare {best_bare['throughput']} img/s at batch {best_bare['batch']}, "
            f"model alone {max(r['throughput'] for r in row['model'])} img/s",
            flush=True,
        )
    return result


def best_config(result: dict) -> tuple[str, dict]:
    """The bare configuration with the highest throughput, and its best row."""
    rows = [
        (label, max(c["bare"], key=lambda r: r["throughput"])) for label, c in result["configs"].items() if "bare" in c
    ]
    return max(rows, key=lambda lr: lr[1]["throughput"])


def bench_served(results: list[dict], args, work: Path, store: Path, image: bytes) -> None:
    """Our best configuration of each model, at each --served-workers count, and the stock
    handler, all behind one TorchServe, loaded one after the other."""
    from scripts.ops.packaging import build_archive
    from scripts.ops.serve import TorchServe

    loads = []  # (result, where its figures go, model name)
    cores = os.cpu_count() or 1
    for result in results:
        label, row = best_config(result)
        runtime, handler_opts = CONFIGS[label]
        arch = result["arch"]
        run = work / f"run_{arch}"
        result["served"] = {"config": label, "bare_at_batch": row, "runs": []}
        for workers in args.served_workers:
            options = {
                "workers": workers,
                "batch_size": row["batch"],
                "max_batch_delay": args.max_batch_delay,
                "device": "gpu",
                "runtime": runtime,
                "torch_threads": max(1, cores // workers),
                "handler": handler_opts,
            }
            name = f"served_{arch}_w{workers}"
            build_archive(run, name, store, options, force=True, val_data=work / "val" if runtime != "eager" else None)
            result["served"]["runs"].append({"workers": workers, "options": options})
            loads.append((result["served"]["runs"][-1], name))
        if arch in STOCK_LAYOUTS and not args.no_stock:
            stock_archive(run, store, work, name=f"stock_{arch}")
            result["stock"] = {}
            loads.append((result["stock"], f"stock_{arch}"))
    config = stock_config(work)  # TorchServe's default workers per model for the stock handler
    ts = TorchServe(run_dir=work / "serve", model_store=store, config=config, ports={})
    ts.start([name for _, name in loads], timeout=600)
    try:
        headers = ts.headers("inference")
        generator = pick(args.load_generator)
        for where, name in loads:
            url = f"{ts.url('inference')}/predictions/{name}"
            if generator == "native":
                print(f"{name}: {args.clients} clients (wrk), {args.duration * 4:g} s", flush=True)
                with Load(url, headers, image, generator="native", server_pid=ts.pid()) as load:
                    where["load"] = load.closed(args.clients, args.duration * 4)
            else:
                print(
                    f"{name}: {args.clients} clients over {args.load_processes} Python processes "
                    f"(wrk is not installed), {args.duration * 4:g} s",
                    flush=True,
                )
                where["load"] = load_processes(
                    url, headers, image, args.clients, args.duration * 4, args.load_processes
                ) | {"generator": "python"}
            print(
                f"  {where['load']['throughput']} img/s, p50 {where['load']['p50']} ms, "
                f"p99 {where['load']['p99']} ms, {where['load']['errors']} errors",
                flush=True,
            )
    finally:
        ts.stop()


def best_served(r: dict) -> dict | None:
    runs = [x for x in r.get("served", {}).get("runs", []) if "load" in x]
    return max(runs, key=lambda x: x["load"]["throughput"]) if runs else None


def report_rows(results: list[dict]) -> list[tuple]:
    rows = []
    for r in results:
        for label, c in r["configs"].items():
            if "bare" not in c:
                rows.append((f"{r['arch']} {label}", c["skipped"], None, None, None, None, None))
                continue
            for m, b in zip(c["model"], c["bare"]):
                rows.append(
                    (
                        f"{r['arch']} {label}",
                        f"batch {b['batch']} (model alone {m['throughput']}/s)",
                        b["throughput"],
                        b["p50"],
                        b["p90"],
                        b["p99"],
                        b["errors"],
                    )
                )
        served = [
            (f"{r['arch']} served ({r['served']['config']}, {x['workers']} worker(s))", x["load"])
            for x in r.get("served", {}).get("runs", [])
            if "load" in x
        ]
        if "load" in r.get("stock", {}):
            served.append((f"{r['arch']} stock (TorchServe defaults)", r["stock"]["load"]))
        rows += [
            (what, f"{s['clients']} clients", s["throughput"], s["p50"], s["p90"], s["p99"], s["errors"])
            for what, s in served
        ]
    return rows


def ratios(r: dict) -> dict:
    best = best_served(r)
    if best is None:
        return {}
    out = {"served_over_bare": round(best["load"]["throughput"] / r["served"]["bare_at_batch"]["throughput"], 2)}
    if r.get("stock", {}).get("load", {}).get("throughput"):
        out["served_over_stock"] = round(best["load"]["throughput"] / r["stock"]["load"]["throughput"], 2)
    return out


def plot(results: list[dict], info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.5), squeeze=False)
    for ax, r in zip(axes[0], results):
        for label, c in r["configs"].items():
            if "bare" in c:
                ax.plot(
                    [b["batch"] for b in c["bare"]], [b["throughput"] for b in c["bare"]], "o-", label=f"bare {label}"
                )
        eager = next(c for c in r["configs"].values() if "model" in c)
        ax.plot(
            [m["batch"] for m in eager["model"]],
            [m["throughput"] for m in eager["model"]],
            "k--",
            label="model alone (first config)",
        )
        best = best_served(r)
        if best is not None:
            ax.plot(
                [best["options"]["batch_size"]],
                [best["load"]["throughput"]],
                "*",
                markersize=14,
                label=f"served, {best['workers']} worker(s) (REST)",
            )
        if "load" in r.get("stock", {}):
            ax.plot([1], [r["stock"]["load"]["throughput"]], "x", markersize=14, label="stock handler (REST)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("images / s")
        ax.set_title(r["arch"])
        ax.legend(fontsize=7)
    fig.suptitle(f"{info['gpu']} (driver {info['driver']}), torch {info['torch']}, JPEG 451x300")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/bench_gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--models",
        default="resnet18,resnet50",
        help="registered classifiers, comma-separated (default: resnet18,resnet50)",
    )
    p.add_argument("--batches", default="1,8,32,64", help="batch sizes of the bare rows (default: 1,8,32,64)")
    p.add_argument(
        "--duration",
        type=float,
        default=1.5,
        help="seconds per bare measurement; served loads run 4x it (default: 1.5)",
    )
    p.add_argument("--max-batch-delay", type=int, default=5, help="archives' maxBatchDelay in ms (default: 5)")
    p.add_argument(
        "--served-workers",
        default="1,2",
        help="our workers on the GPU when served, one archive per count (default: 1,2)",
    )
    p.add_argument("--no-stock", action="store_true", help="skip the stock handler (default: off)")
    p.add_argument("--clients", type=int, default=128, help="closed-loop clients against the server (default: 128)")
    p.add_argument(
        "--load-generator",
        default="auto",
        help=f"{', '.join(GENERATORS)}: auto = wrk where installed, else Python load processes (default: auto)",
    )
    p.add_argument(
        "--load-processes",
        type=int,
        default=4,
        help="processes the Python clients are spread over where wrk is missing (default: 4)",
    )
    p.add_argument(
        "--record",
        default="gpu_serving",
        help="record name under benchmarks/results/; '' for none (default: gpu_serving)",
    )
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"bare configurations to run, comma-separated (default: all: {', '.join(CONFIGS)})",
    )
    p.add_argument("--no-served", action="store_true", help="bare rows only, no TorchServe (default: off)")
    p.add_argument(
        "--out",
        default=str(ROOT / "runs" / "bench_gpu"),
        help="where bench_gpu.json and .png go (default: runs/bench_gpu)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        args.batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        args.served_workers = sorted({int(w) for w in args.served_workers.split(",") if w.strip()})
    except ValueError:
        print(
            f"error: --batches and --served-workers expect numbers like 1,8,32, got {args.batches!r}, "
            f"{args.served_workers!r}",
            file=sys.stderr,
        )
        return 2
    from model_defs import get_entry

    if args.load_generator not in GENERATORS:
        choices = ", ".join(GENERATORS)
        print(f"error: --load-generator {args.load_generator!r}: choose one of {choices}", file=sys.stderr)
        return 2
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or not args.configs:
        print(f"error: --configs {','.join(unknown)!r} unknown; choose from: {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    try:
        require_gpu("bench_gpu measures a GPU", "; scripts/bench_serving measures the CPU")
        for m in models:
            get_entry(m, task="classification")
    except (ValueError, KeyError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-", dir=out))
    store = work / "model_store"
    store.mkdir()
    image = cat_jpeg()
    info = gpu_info() | {"machine": machine()}
    print(
        f"{info['gpu']} x{info['gpus']}, driver {info['driver']}, torch {info['torch']} (CUDA {info['cuda']})",
        flush=True,
    )
    results = []
    for m in models:  # written as it goes, so a run cut short still leaves its figures
        results.append(bench_model(m, args, work, store, image))
        (out / "bench_gpu.json").write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")
    if not args.no_served:
        bench_served(results, args, work, store, image)
    for r in results:
        r["ratios"] = ratios(r)
    (out / "bench_gpu.json").write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")
    plot(results, info, out / "bench_gpu.png")
    if args.record:
        print(f"record: {write_record(args.record, {'info': info, 'results': results})}")
    shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(report_rows(results)))
    for r in results:
        for c in r["configs"].values():
            if "stages" in c:
                print(f"{r['arch']} stages (ms per image): {c['stages']}")
    print(f"wrote {out / 'bench_gpu.json'} and {out / 'bench_gpu.png'}")
    first = results[0]["ratios"]
    if first:
        print(" ".join(f"{k.replace('_over_', '/')}={v:.2f}" for k, v in first.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
