"""Unlabeled image folders: what the GAN and SimCLR train on.

Any folder tree works (class folders included: the labels are simply not used); every
image file under it is one sample. Unreadable images are skipped and counted, as in the
classification trainer, and the dataset fingerprint covers every file's path and content.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from model_defs.preprocessing import IMAGE_EXTENSIONS, load_image
from training.datasets import DatasetError, Skipped, fingerprint, is_image


def find_images(root: str | Path) -> list[Path]:
    """Every image file under `root`, sorted; a clear error if there is none."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    paths = sorted(p for p in root.rglob("*") if is_image(p))
    if not paths:
        raise DatasetError(f"no images found under {root} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return paths


def unlabeled_record(root: str | Path, paths: list[Path]) -> dict:
    """model.json's record of unlabeled training images (the GAN's, SimCLR's)."""
    return {"layout": "unlabeled images", "train_images": len(paths), "fingerprint": fingerprint(root, paths)}


class UnlabeledImages(Dataset):
    """paths → transform(image), or `views` independent transforms of it (SimCLR's pairs);
    `load` as ImageDataset's. An unreadable image yields Skipped."""

    def __init__(self, paths: list[Path], channels: int, transform, views: int = 1, load=load_image):
        self.paths, self.channels, self.transform, self.views, self.load = paths, channels, transform, views, load

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int):
        return self.load(self.paths[i], self.channels)

    def __getitem__(self, i: int):
        try:
            image = self.read(i)
        except (ValueError, OSError):
            return Skipped(self.paths[i])
        if self.views == 1:
            return self.transform(image)
        return tuple(self.transform(image) for _ in range(self.views))
