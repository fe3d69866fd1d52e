"""Shared fixtures: real data written to disk once per session, and a trained model.

The digits are scikit-learn's real handwritten digits as PNG files; the photographs are
scikit-image's real pictures. Nothing is downloaded.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model_defs import DataConfig
from model_defs.checkpoint import load_trained
from model_defs.preprocessing import eval_transform, load_image
from training import train as train_mod
from training.sample_data import write_digits


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """data/digits-like tree: train/<digit>/*.png and test/<digit>/*.png (32x32 grey)."""
    root = tmp_path_factory.mktemp("digits")
    write_digits(root, size=32, test_fraction=0.2, seed=0)
    return root


def train_cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        "small_cnn",
        "--channels",
        "1",
        "--hflip-prob",
        "0",
        "--workers",
        "0",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="session")
def trained_digits(digits_dir, tmp_path_factory) -> Path:
    """A small CNN trained for a few epochs on the digits: a real training output folder."""
    out = tmp_path_factory.mktemp("run") / "digits"
    assert train_mod.cli(train_cli_args(digits_dir / "train", out, "--epochs", "3", "--batch-size", "32")) == 0
    return out


@pytest.fixture(scope="module")
def digits_model_dir(trained_digits, tmp_path_factory) -> Path:
    """The trained digits model alone in a folder, as a worker's model_dir holds it."""
    model_dir = tmp_path_factory.mktemp("digits_model")
    for name in ("model.pt", "model.json"):
        shutil.copy(trained_digits / name, model_dir / name)
    return model_dir


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Real photographs of several sizes and modes from scikit-image."""
    from skimage import data

    return {
        "chelsea": Image.fromarray(data.chelsea()),  # 300x451 RGB cat
        "astronaut": Image.fromarray(data.astronaut()),  # 512x512 RGB
        "coffee": Image.fromarray(data.coffee()),  # 400x600 RGB
        "camera": Image.fromarray(data.camera()),  # 512x512 grey
    }


def classify_in_process(run_dir: Path, data: bytes) -> torch.Tensor:
    """Class probabilities of a training output folder's model for image bytes, no server."""
    model, meta = load_trained(run_dir)
    cfg = DataConfig.from_dict(meta["preprocessing"])
    with torch.inference_mode():
        return torch.softmax(model(eval_transform(cfg)(load_image(data, cfg.channels))[None]), 1)[0]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def image_variants(photo: Image.Image) -> dict[str, bytes]:
    """The same photo in the formats and modes users send."""
    rgb = photo.convert("RGB")
    small = rgb.resize((96, 64))
    grey16 = Image.fromarray(np.asarray(small.convert("L"), dtype=np.uint16) * 257)
    rgba = small.convert("RGBA")
    rgba.putalpha(128)
    frames = [small.convert("P"), small.rotate(90).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    return {
        "jpeg": encode(rgb, "JPEG", quality=90),
        "png_rgb": encode(small, "PNG"),
        "png_grey": encode(small.convert("L"), "PNG"),
        "png_rgba": encode(rgba, "PNG"),
        "png_palette": encode(small.convert("P"), "PNG"),
        "png_16bit": encode(grey16, "PNG"),
        "gif_animated": gif.getvalue(),
        "webp": encode(small, "WEBP"),
        "bmp": encode(small, "BMP"),
        "tiff": encode(small, "TIFF"),
        "jpeg_cmyk": encode(small.convert("CMYK"), "JPEG"),
    }
