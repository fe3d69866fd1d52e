"""Peak memory of one request at each task's pixel limit: what a worker must have room for.

    .venv/bin/python -m scripts.bench.memory_peak                      # 40 MP (the default max_pixels), every task
    .venv/bin/python -m scripts.bench.memory_peak --megapixels 10 --out runs/memory_peak.json

For each task (classification, detection, segmentation, embedding) a small untrained model
of that task is saved, and its handler is loaded in a fresh Python process with TorchServe's
own Context; one real photograph resized to exactly the pixel limit is sent as a JPEG. The
figure is the process's peak RSS during that request (VmHWM, reset just before it) minus
its RSS just before it (after a warm-up request on a small image), so the model and the
libraries do not count.
The segmenter is measured twice in the same run: as served (`mask_at_size`, one class
plane at a time) and with every class scaled at once (`logits_to_mask`, the baseline), and
the ratio of the two is printed. A measurement, not a test: nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TASKS = {  # task: (arch, arch_args, classes, preprocessing, handler module.class)
    "classification": (
        "small_cnn",
        {"num_classes": 3, "in_channels": 3},
        ["a", "b", "c"],
        {"input_size": 32, "resize_size": 36, "channels": 3},
        "handlers.image_classifier.ImageClassifier",
    ),
    "detection": (
        "fasterrcnn_mobilenet_320",
        {"num_classes": 3, "image_size": 128},
        ["background", "a", "b"],
        {"input_size": 128, "resize_size": 128, "channels": 3},
        "handlers.object_detector.ObjectDetector",
    ),
    "segmentation": (
        "unet",
        {"num_classes": 4, "in_channels": 3, "depth": 2, "width": 8},
        ["bg", "a", "b", "c"],
        {"input_size": 64, "resize_size": 64, "channels": 3},
        "handlers.segmenter.ImageSegmenter",
    ),
    "embedding": (
        "simclr",
        {"in_channels": 3, "widths": [8, 16, 32], "proj_hidden": 32, "proj_dim": 16},
        [],
        {"input_size": 32, "resize_size": 36, "channels": 3},
        "handlers.embedder.ImageEmbedder",
    ),
}


def status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    """Set this process's peak RSS (VmHWM) back to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def photo_jpeg(pixels: int) -> bytes:
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.astronaut())
    height = int((pixels * 3 / 4) ** 0.5)  # 4:3
    width = pixels // height
    buf = io.BytesIO()
    photo.resize((width, height), Image.BILINEAR).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def measure(task: str, model_dir: Path, image: Path, pixels: int, baseline: bool) -> dict:
    """In this (fresh) process: load the task's handler, warm it up, send the image once."""
    import importlib

    from ts.context import Context, RequestProcessor

    module, cls = TASKS[task][4].rsplit(".", 1)
    handler_cls = getattr(importlib.import_module(module), cls)
    if baseline:  # every class scaled to full size at once, then the argmax
        import handlers.segmenter as seg
        from model_defs.preprocessing import logits_to_mask

        seg.mask_at_size = logits_to_mask
    config = {"minWorkers": 1, "handler": {"max_pixels": pixels, "max_bytes": 1 << 30, "torch_threads": 1}}

    def context(n: int) -> Context:
        ctx = Context(task, str(model_dir), {"model": {"modelName": task}}, 1, None, "0.12.0", model_yaml_config=config)
        ctx.request_processor = [RequestProcessor({}) for _ in range(n)]
        return ctx

    handler = handler_cls()
    handler.initialize(context(1))
    small = photo_jpeg(64 * 48)
    handler.handle([{"body": small}], context(1))
    data = image.read_bytes()
    reset_peak()  # the peak of loading and warming up does not count
    before = status_bytes("VmRSS")
    ctx = context(1)
    handler.handle([{"body": data}], ctx)
    peak = status_bytes("VmHWM")
    return {
        "task": task,
        "baseline": baseline,
        "status": ctx.get_response_status(0)[0],
        "rss_before_mb": round(before / 2**20, 1),
        "peak_mb": round(peak / 2**20, 1),
        "request_peak_mb": round((peak - before) / 2**20, 1),
    }


def save_models(root: Path) -> dict[str, Path]:
    import torch

    from model_defs import DataConfig, get_model
    from model_defs.checkpoint import save_model_files

    out = {}
    for task, (arch, args, classes, pre, _) in TASKS.items():
        torch.manual_seed(0)
        out[task] = root / task
        save_model_files(
            out[task],
            get_model(arch, **args),
            {
                "arch": arch,
                "arch_args": args,
                "task": task,
                "classes": classes,
                "preprocessing": DataConfig(**pre).to_dict(),
            },
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="scripts/memory_peak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--megapixels", type=float, default=40, help="image size = each handler's max_pixels (default: 40)")
    p.add_argument(
        "--work",
        default=str(ROOT / "runs" / "memory_peak"),
        help="folder for the models and the image (default: runs/memory_peak)",
    )
    p.add_argument(
        "--out",
        default=str(ROOT / "runs" / "memory_peak.json"),
        help="results as JSON (default: runs/memory_peak.json)",
    )
    p.add_argument("--one", nargs=2, metavar=("TASK", "MODE"), help=argparse.SUPPRESS)  # a child process's own run
    args = p.parse_args(argv)
    work, pixels = Path(args.work), int(args.megapixels * 1_000_000)
    image = work / f"photo_{pixels}.jpg"
    if args.one:
        task, mode = args.one
        print(json.dumps(measure(task, work / task, image, pixels, mode == "baseline")))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    save_models(work)
    image.write_bytes(photo_jpeg(pixels))
    results = []
    runs = [(t, "served") for t in TASKS] + [("segmentation", "baseline")]
    for task, mode in runs:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.bench.memory_peak",
                "--megapixels",
                str(args.megapixels),
                "--work",
                str(work),
                "--one",
                task,
                mode,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            print(f"error: {task} ({mode}) failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(
            f"{task:<15} {mode:<9} HTTP {r['status']}  peak during the request +{r['request_peak_mb']:.0f} MB "
            f"(process peak {r['peak_mb']:.0f} MB)",
            flush=True,
        )
    served = next(r for r in results if r["task"] == "segmentation" and not r["baseline"])
    base = next(r for r in results if r["baseline"])
    ratio = served["request_peak_mb"] / base["request_peak_mb"] if base["request_peak_mb"] else None
    report = {
        "megapixels": args.megapixels,
        "image_bytes": image.stat().st_size,
        "results": results,
        "segmentation_served_over_all_classes_at_once": ratio and round(ratio, 3),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"segmentation request peak: served / all classes at once = {ratio:.2f}" if ratio else "no ratio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
