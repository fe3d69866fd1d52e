"""`--cache memory|disk`: decode each image once, shrunk so its shorter side is the data
config's resize size, and hand that to the transforms every later epoch, so epochs after
the first skip JPEG decoding. Augmentation still runs on every epoch (it works on the
cached picture). An unreadable image stays unreadable: it is skipped and named as before.

- memory: decoded in the main process before training, kept as uint8 arrays (data-loading
  workers share them, forked);
- disk: one .npy per image under <out>/cache, named by the file's path, size and time and
  the cache size, reused by --resume and by later runs writing to the same folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from model_defs.preprocessing import load_image


def shrink(image: Image.Image, side: int) -> Image.Image:
    """Scale down (never up) so the shorter side is `side`."""
    scale = side / min(image.size)
    if scale >= 1:
        return image
    return image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BILINEAR
    )


class MemoryCache:
    def __init__(self, paths: list[Path], channels: int, side: int, progress: bool = True):
        self.side, self.images = side, {}
        for p in tqdm(
            sorted(set(paths)), desc="decoding into the memory cache", leave=False, disable=None if progress else True
        ):
            try:
                self.images[str(p)] = np.asarray(shrink(load_image(p, channels), side))
            except (ValueError, OSError) as e:
                self.images[str(p)] = e

    def __call__(self, path: Path, channels: int) -> Image.Image:
        item = self.images.get(str(path))
        if item is None:
            return shrink(load_image(path, channels), self.side)
        if isinstance(item, Exception):
            raise item
        return Image.fromarray(item)


class DiskCache:
    def __init__(self, folder: Path, side: int):
        self.folder, self.side = Path(folder), side

    def file(self, path: Path, channels: int) -> Path:
        st = Path(path).stat()
        key = f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.side}|{channels}"
        return self.folder / f"{hashlib.sha1(key.encode()).hexdigest()}.npy"

    def __call__(self, path: Path, channels: int) -> Image.Image:
        f = self.file(path, channels)
        if f.is_file():
            return Image.fromarray(np.load(f))
        array = np.asarray(shrink(load_image(path, channels), self.side))
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, array)
        os.replace(tmp, f)  # several workers or ranks may write the same entry: the last rename wins, whole
        return Image.fromarray(array)


def decoder(mode: str, cfg, folder: Path, paths: list[Path], progress: bool = True):
    """The image loader the datasets call: load_image itself, or a cache in front of it."""
    side = max(cfg.resize_size, cfg.input_size)
    if mode == "memory":
        return MemoryCache(paths, cfg.channels, side, progress)
    if mode == "disk":
        return DiskCache(folder, side)
    return load_image
