"""Write real datasets to disk from data that ships inside installed packages (no network).

    python -m training.sample_data digits --out data/digits --size 32

writes scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) upscaled to PNG files
in a class-folder tree, split into `train/` and a held-out `test/` (seeded, stratified).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from training.datasets import Sample, stratified_split


def digit_images(size: int) -> tuple[list[Image.Image], list[int]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for pixels in digits.images:  # values 0..16, ink high
        grey = (pixels * (255.0 / 16.0)).round().astype(np.uint8)
        images.append(Image.fromarray(grey, "L").resize((size, size), Image.Resampling.BICUBIC))
    return images, [int(t) for t in digits.target]


def write_digits(out: str | Path, size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> dict:
    """Write out/train/<digit>/*.png and out/test/<digit>/*.png; reuse them if already there."""
    out = Path(out)
    marker = out / "dataset.json"
    wanted = {"name": "sklearn-digits", "size": size, "test_fraction": test_fraction, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()).get("params") == wanted:
        return json.loads(marker.read_text())
    images, targets = digit_images(size)
    indexed = [Sample(Path(f"{i:04d}"), [t]) for i, t in enumerate(targets)]
    train, test = stratified_split(indexed, test_fraction, seed)
    for split, samples in (("train", train), ("test", test)):
        for s in samples:
            i, label = int(str(s.path)), s.labels[0]
            folder = out / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            images[i].save(folder / f"digit_{i:04d}.png")
    info = {"params": wanted, "train": len(train), "test": len(test), "classes": [str(c) for c in range(10)]}
    marker.write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["digits"], help="which dataset to write")
    parser.add_argument("--out", default="data/digits", help="output folder (default: data/digits)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels after upscaling (default: 32)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="held-out share per class (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default: 0)")
    args = parser.parse_args(argv)
    info = write_digits(args.out, args.size, args.test_fraction, args.seed)
    print(f"digits: {info['train']} train and {info['test']} held-out test images in {args.out}")


if __name__ == "__main__":
    main()
