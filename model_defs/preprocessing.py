"""The one place images are decoded and turned into model input.

Training (its validation pass) and every handler call the same functions here, so a
served model sees exactly the tensor it saw when it was evaluated. This module ships
inside every `.mar` next to the registry.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from model_defs.registry import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class ImageDecodeError(ValueError):
    """The bytes are not an image PIL can decode; the message says why."""


def decode_image(source: bytes | bytearray | str | Path) -> Image.Image:
    """Open image bytes or a file fully (so truncation is found here, not later)."""
    what = str(source) if isinstance(source, (str, Path)) else "image data"
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise ImageDecodeError("empty image data (0 bytes)")
        fp = io.BytesIO(source)
    else:
        fp = source
    try:
        with Image.open(fp) as img:
            img.seek(0)  # animated GIF/WebP: the first frame
            img.load()
            return ImageOps.exif_transpose(img) or img.copy()
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{what} is not an image format PIL can read") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"{what} is too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f"{what} could not be decoded ({e})") from None


def to_model_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to "L" (channels=1) or "RGB" (channels=3).

    16-bit and 32-bit grey are scaled to 8 bits (PIL's own convert would clip them);
    transparency is composited over white, as an image viewer shows it.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / 257.0, 0, 255).round().astype(np.uint8))
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        img = Image.fromarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8))
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    target = "L" if channels == 1 else "RGB"
    if img.mode == target:
        return img
    if target == "L" and img.mode not in ("1", "RGB"):
        img = img.convert("RGB")
    return img.convert(target)


def load_image(source: bytes | bytearray | str | Path, channels: int) -> Image.Image:
    """Decode and convert: what both training and serving do with every image."""
    return to_model_mode(decode_image(source), channels)


def _interpolation(cfg: DataConfig) -> InterpolationMode:
    return InterpolationMode(cfg.interpolation)


def eval_transform(cfg: DataConfig) -> v2.Compose:
    """PIL image → normalized float tensor (C, H, W): resize the short side, center-crop.

    Resizing happens on uint8, before the conversion to float, which is both faster and
    what the training validation pass does.
    """
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(cfg.resize_size, interpolation=_interpolation(cfg), antialias=True),
            v2.CenterCrop(cfg.input_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(cfg.mean, cfg.std),
        ]
    )


def train_transform(cfg: DataConfig, *, hflip_prob: float = 0.5, min_scale: float = 0.6) -> v2.Compose:
    """Training augmentation: random resized crop and optional horizontal flip."""
    steps = [
        v2.PILToTensor(),
        v2.RandomResizedCrop(cfg.input_size, scale=(min_scale, 1.0), interpolation=_interpolation(cfg), antialias=True),
    ]
    if hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(hflip_prob))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]
    return v2.Compose(steps)
