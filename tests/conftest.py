"""Shared fixtures: real data written to disk once per session, a trained model, and one
TorchServe for every module that needs no process-level config of its own.

The digits are scikit-learn's real handwritten digits as PNG files; the photographs are
scikit-image's real pictures. Nothing is downloaded. Starting TorchServe costs seconds of
JVM and worker start-up on every start, so the run counts its starts and prints them at the end.
"""

from __future__ import annotations

import io
import os
import shutil
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from model_defs import DataConfig
from model_defs.checkpoint import load_trained
from model_defs.preprocessing import eval_transform, load_image
from scripts.ops.serve import TorchServe
from training import shapes, train_detection
from training import train as train_mod
from training.sample_data import write_digits

STARTS: list[str] = []  # the test (node id) during which each TorchServe start happened


@pytest.fixture(scope="session", autouse=True)
def count_torchserve_starts():
    """Counts real launches: TorchServe.start writes the effective config just before it runs
    `torchserve --start` (a start refused earlier, e.g. for a taken port, launches nothing)."""
    write_config = TorchServe._write_config

    def counted(self):
        STARTS.append(os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0])
        return write_config(self)

    TorchServe._write_config = counted
    yield
    TorchServe._write_config = write_config


def pytest_terminal_summary(terminalreporter):
    by_module = Counter(nodeid.split("::")[0] for nodeid in STARTS)
    where = ", ".join(f"{Path(m).name} {n}" for m, n in sorted(by_module.items()))
    terminalreporter.write_line(f"TorchServe starts: {len(STARTS)}" + (f" ({where})" if where else ""))


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory) -> TorchServe:
    """One TorchServe with the bundle's config.properties on free ports, for the whole run.
    Modules borrow it through `serving` below (test_versions restarts it); a module that needs
    process-level settings of its own (KServe's layout, the k8s ConfigMap) starts its own."""
    ts = TorchServe(
        run_dir=tmp_path_factory.mktemp("shared_serve"), model_store=tmp_path_factory.mktemp("shared_store"), ports={}
    )
    ts.start([], timeout=240)
    yield ts
    ts.stop()


@contextmanager
def serving(ts: TorchServe, *models: str, timeout: float = 240):
    """For a module fixture: registers `models` (each served from <name>.mar) on the shared
    server and gives it, then unregisters every model registered by then and empties the
    model store, so that the next module finds the server as new."""
    assert ts.models() == [], f"the shared server still serves {ts.models()}"
    try:
        for name in models:
            ts.register(name, f"{name}.mar", timeout=timeout)
        yield ts
    finally:
        for name in ts.models():
            default = ts.describe(name)[0]["modelVersion"]  # TorchServe removes it last
            for version in sorted((v["modelVersion"] for v in ts.versions(name)), key=lambda v: v == default):
                ts.unregister(name, version)
        for path in ts.model_store.iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        ts.state.save({"models": {}})  # a version refused at a restart stays in the record: forget it


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


class TrainedRun(NamedTuple):
    run: Path  # training's output folder: model.pt, model.json (metrics, split), metrics.csv
    data: Path  # the dataset it was trained on; model.json records the validation split


# A detector that really detects, trained from random weights in about a minute of one CPU
# core: one large shape per image (35-60% of the side) on a real photograph, 96 px images
# with sides up to 1.3:1 seen at 64 px, so boxes go through a resize with unequal x and y
# scales; the light fcos_resnet. Measured: validation mAP@0.5 0.51 (mAP@[.5:.95] 0.17), 46 s.
SHAPES_DETECTOR_DATA = {"n": 200, "size": 96, "seed": 0, "max_shapes": 1, "shape_size": (0.35, 0.6), "aspect": 1.3}
SHAPES_DETECTOR_TRAINING = ["--model", "fcos_resnet", "--input-size", "64", "--epochs", "12", "--batch-size", "8"]
SHAPES_DETECTOR_TRAINING += ["--lr", "3e-3", "--threads", "1", "--workers", "0", "--pictures", "0", "--no-progress"]


@pytest.fixture(scope="session")
def shapes_detector(tmp_path_factory) -> TrainedRun:
    """A detector trained on shapes (VOC layout): 160 training and 40 validation images."""
    root = tmp_path_factory.mktemp("shapes_detector")
    data = shapes.generate(root / "voc", "voc", progress=False, **SHAPES_DETECTOR_DATA)
    run = root / "run"
    assert train_detection.cli(["--data", str(data), "--out", str(run), *SHAPES_DETECTOR_TRAINING]) == 0
    return TrainedRun(run, data)


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
