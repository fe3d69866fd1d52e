"""`--cache memory|disk` (every trainer): decode each image once, so that epochs after the
first skip decoding. One cache for every task; the datasets read each item through
`DecodeCache.get(files, recipe, decode, shrink)`:

- none: `decode()` on every read (the item's transforms do all the rest);
- memory / disk: `shrink(decode())` once, kept, then the kept copy. `shrink` is the first,
  deterministic step of the item's own transforms, done with the same torchvision call: the
  resize to the size the model sees (a classifier's shorter side to the resize size, never
  up; a detector's longer side to the input size, boxes scaled with it; a segmentation
  image and its mask to the input square). The transforms' resize then finds the item at
  its size and torchvision returns it untouched, so with the same seed a cached item gives
  the batches an uncached one gives; the random steps (crops, flips, jitter) still run on
  every read.

memory keeps the arrays in this process; `fill` reads every item before training, so the
data-loading workers (forked) start with all of them. disk writes one .npz per item under
<out>/cache, named by the files' paths, sizes and times and the recipe (sizes, channels,
boxes), reused by --resume and by later runs writing to the same folder. An unreadable file
stays unreadable: the dataset skips it and names it, as without a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2
from tqdm import tqdm

from model_defs.preprocessing import load_image

Item = dict[str, torch.Tensor]
CACHE_MODES = ("none", "memory", "disk")


class DecodeCache:
    def __init__(self, mode: str = "none", folder: str | Path | None = None):
        assert mode in CACHE_MODES, mode
        self.mode, self.folder, self.items = mode, Path(folder) if folder else None, {}

    @staticmethod
    def key(files: Iterable[Path], recipe: str) -> str:
        parts = []
        for f in files:
            st = Path(f).stat()
            parts.append(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}")
        return hashlib.sha1("|".join([*parts, recipe]).encode()).hexdigest()

    def get(
        self, files: Iterable[Path], recipe: str, decode: Callable[[], Item], shrink: Callable[[Item], Item]
    ) -> Item:
        """The item made of `files`: decode() without a cache, else shrink(decode()) kept
        under (files, recipe). Raises what decode raises (ValueError, OSError) for a bad file."""
        if self.mode == "none":
            return decode()
        key = self.key(files, recipe)
        if self.mode == "memory":
            item = self.items.get(key)
            if item is None:
                try:
                    item = {k: v.numpy() for k, v in shrink(decode()).items()}
                except (ValueError, OSError) as e:
                    item = e
                self.items[key] = item
            if isinstance(item, Exception):
                raise item
            return {k: torch.from_numpy(v.copy()) for k, v in item.items()}  # a copy: the kept one stays as it is
        path = self.folder / f"{key}.npz"
        if path.is_file():
            with np.load(path) as z:
                return {k: torch.from_numpy(z[k]) for k in z.files}
        item = shrink(decode())
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{key}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **{k: v.numpy() for k, v in item.items()})
        os.replace(tmp, path)  # several workers or ranks may write the same entry: the last rename wins, whole
        return item

    def fill(self, datasets: Iterable, progress: bool = True) -> None:
        """memory: read every item of `datasets` (each has `read(i)`) now, in this process."""
        if self.mode != "memory":
            return
        reads = [(ds, i) for ds in datasets for i in range(len(ds))]
        for ds, i in tqdm(
            reads, desc="decoding into the memory cache", leave=False, disable=None if progress else True
        ):
            with contextlib.suppress(ValueError, OSError):  # kept as unreadable: skipped and named when read
                ds.read(i)

    def image_loader(self, cfg) -> ImageLoader:
        """`load(path, channels)` for the classification, GAN and SimCLR datasets."""
        return ImageLoader(self, max(cfg.resize_size, cfg.input_size), cfg.interpolation)


class ImageLoader:
    """An image as a uint8 C x H x W tensor, its shorter side resized to `side` (never up)
    in the cache, as eval_transform's first step resizes it."""

    def __init__(self, cache: DecodeCache, side: int, interpolation: str):
        self.cache, self.side, self.interpolation = cache, side, v2.InterpolationMode(interpolation)

    def __call__(self, path: Path, channels: int) -> torch.Tensor:
        return self.cache.get(
            [path],
            f"image {channels} {self.side} {self.interpolation.value}",
            lambda: {"image": v2.functional.pil_to_tensor(load_image(path, channels))},
            self.shrink,
        )["image"]

    def shrink(self, item: Item) -> Item:
        image = item["image"]
        if min(image.shape[-2:]) <= self.side:
            return item
        return {"image": v2.functional.resize(image, self.side, interpolation=self.interpolation, antialias=True)}
