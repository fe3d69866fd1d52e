"""Benchmark of `--cache`: epoch time of the classification, detection and segmentation
trainers on JPEG datasets without a cache, with `--cache memory` and with `--cache disk`,
measured in the same run.

    .venv/bin/python -m training.bench_cache --out runs/bench_cache
    .venv/bin/python -m training.bench_cache --images 20 --epochs 2   # a smoke run

It writes the data under OUT/data once: for classification, N JPEG photographs (random
640x480 crops of scikit-image's pictures, one class per source picture); for detection and
segmentation, N 640x480 JPEGs of shapes painted on those photographs (training.shapes;
VOC boxes, PNG masks). Each trainer runs with each setting for --epochs epochs (small_cnn at
64 px, fasterrcnn_mobilenet_320 at 128 px, unet at 64 px), and the table reports the mean
time of the epochs after the first (the first one decodes in every setting but memory, which
decodes before it) and the speed-up over no cache; OUT/cache_benchmark.json holds the
figures. Ratios within one run are what it measures, not absolute times.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from training import train, train_detection, train_segmentation
from training.shapes import generate

PICTURES = ("astronaut", "chelsea", "coffee", "rocket")
TASKS = ("classification", "detection", "segmentation")


def write_jpegs(root: Path, n: int, seed: int = 0) -> Path:
    from skimage import data

    rng = np.random.default_rng(seed)
    for name in PICTURES:
        photo = Image.fromarray(getattr(data, name)()).convert("RGB").resize((1024, 768))
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n // len(PICTURES)):
            x, y = int(rng.integers(0, photo.width - 640)), int(rng.integers(0, photo.height - 480))
            photo.crop((x, y, x + 640, y + 480)).save(root / name / f"{i:04d}.jpg", quality=90)
    return root


def write_masks_as_jpegs(root: Path, n: int) -> Path:
    """training.shapes' masks layout (PNG images) with the images re-saved as JPEGs."""
    generate(root, "masks", n, 640, seed=0, aspect=4 / 3, progress=False)
    for png in sorted((root / "images").glob("*.png")):
        with Image.open(png) as img:
            img.convert("RGB").save(png.with_suffix(".jpg"), quality=90)
        png.unlink()
    return root


def epoch_seconds(run: Path) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [float(r["seconds"]) for r in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default="runs/bench_cache", help="folder for the data and the runs (default: runs/bench_cache)"
    )
    p.add_argument("--images", type=int, default=400, help="JPEGs written per dataset (default: 400)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per setting; the first is not counted (default: 4)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (default: 0)")
    p.add_argument(
        "--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)} (default: all three)"
    )
    args = p.parse_args(argv)
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or args.images < 20 or args.epochs < 2:
        print(f"error: --tasks takes {', '.join(TASKS)}, --images >= 20, --epochs >= 2", file=sys.stderr)
        return 2
    out = Path(args.out)
    data = out / "data"
    common = ["--epochs", str(args.epochs), "--patience", "0", "--workers", str(args.workers), "--threads", "1"]
    common += ["--no-progress", "--force"]
    runs = {
        "classification": (
            train,
            lambda: write_jpegs(data / "classification", args.images),
            ["--model", "small_cnn", "--input-size", "64", "--resize-size", "72", "--batch-size", "32"],
        ),
        "detection": (
            train_detection,
            lambda: generate(data / "detection", "voc", args.images, 640, seed=0, aspect=4 / 3, progress=False),
            ["--model", "fasterrcnn_mobilenet_320", "--input-size", "128", "--batch-size", "8", "--pictures", "0"],
        ),
        "segmentation": (
            train_segmentation,
            lambda: write_masks_as_jpegs(data / "segmentation", args.images),
            ["--model", "unet", "--model-arg", "depth=3", "--input-size", "64", "--batch-size", "8"],
        ),
    }
    results = {}
    for task in tasks:
        module, write, flags = runs[task]
        if not (data / task).is_dir():
            write()
        for mode in ("none", "memory", "disk"):
            run = out / f"{task}_{mode}"
            code = module.cli(["--data", str(data / task), "--out", str(run), *flags, *common, "--cache", mode])
            if code:
                return code
            seconds = epoch_seconds(run)
            results.setdefault(task, {})[mode] = {
                "first_epoch_s": seconds[0],
                "later_epoch_s": float(np.mean(seconds[1:])),
            }
    print(f"\n{args.images} JPEGs of 640x480 per task, {args.epochs} epochs, workers {args.workers}")
    print(f"{'task':<15} {'cache':<8} {'epoch 1 (s)':>12} {'later epochs (s)':>17} {'speed-up':>9}")
    for task, by_mode in results.items():
        base = by_mode["none"]["later_epoch_s"]
        for mode, r in by_mode.items():
            r["speed_up"] = round(base / r["later_epoch_s"], 2)
            print(
                f"{task:<15} {mode:<8} {r['first_epoch_s']:>12.2f} {r['later_epoch_s']:>17.2f} {r['speed_up']:>8.2f}x"
            )
    (out / "cache_benchmark.json").write_text(
        json.dumps({"images": args.images, "epochs": args.epochs, "workers": args.workers, **results}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
