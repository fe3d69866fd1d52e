"""Benchmark of `--cache`: epoch time of the classification trainer on a JPEG dataset
without a cache, with `--cache memory` and with `--cache disk`, measured in the same run.

    .venv/bin/python -m training.bench_cache --out runs/bench_cache

It writes N JPEG photographs (random 640x480 crops of scikit-image's pictures, one class
per source picture) under OUT/data, trains small_cnn at 64 px for --epochs epochs with each
setting, and reports the mean time of the epochs after the first (the first one decodes in
every setting) and the speed-up over no cache, as a table and OUT/cache_benchmark.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from training import train

PICTURES = ("astronaut", "chelsea", "coffee", "rocket")


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


def epoch_seconds(run: Path) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [float(r["seconds"]) for r in csv.DictReader(f)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default="runs/bench_cache", help="folder for the data and the runs (default: runs/bench_cache)"
    )
    p.add_argument("--images", type=int, default=400, help="JPEGs written, split over 4 classes (default: 400)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per setting; the first is not counted (default: 4)")
    p.add_argument("--workers", type=int, default=0, help="data-loading processes (default: 0)")
    args = p.parse_args(argv)
    out = Path(args.out)
    data = out / "data"
    if not data.is_dir():
        write_jpegs(data, args.images)
    results = {}
    for mode in ("none", "memory", "disk"):
        run = out / f"run_{mode}"
        code = train.cli(
            [
                "--data",
                str(data),
                "--out",
                str(run),
                "--force",
                "--model",
                "small_cnn",
                "--input-size",
                "64",
                "--resize-size",
                "72",
                "--epochs",
                str(args.epochs),
                "--batch-size",
                "32",
                "--patience",
                "0",
                "--workers",
                str(args.workers),
                "--threads",
                "1",
                "--no-progress",
                "--cache",
                mode,
            ]
        )
        if code:
            return code
        seconds = epoch_seconds(run)
        results[mode] = {"first_epoch_s": seconds[0], "later_epoch_s": float(np.mean(seconds[1:]))}
    base = results["none"]["later_epoch_s"]
    print(f"\n{args.images} JPEGs of 640x480, small_cnn at 64 px, {args.epochs} epochs, workers {args.workers}")
    print(f"{'cache':<8} {'epoch 1 (s)':>12} {'later epochs (s)':>17} {'speed-up':>9}")
    for mode, r in results.items():
        r["speed_up"] = round(base / r["later_epoch_s"], 2)
        print(f"{mode:<8} {r['first_epoch_s']:>12.2f} {r['later_epoch_s']:>17.2f} {r['speed_up']:>8.2f}x")
    (out / "cache_benchmark.json").write_text(
        json.dumps({"images": args.images, "epochs": args.epochs, **results}, indent=2) + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
