"""Shared fixtures: real data written to disk once per session, a trained model, and one
TorchServe for every module that needs no process-level config of its own.

The digits are scikit-learn's real handwritten digits as PNG files; the photographs are
scikit-image's real pictures. Nothing is downloaded. Starting TorchServe costs seconds of
JVM and worker start-up on every start, so the run counts its starts and prints them at the end.

The suite runs on every core with pytest-xdist (pytest.ini). Each xdist worker is a session of
its own, so: every test that uses the shared TorchServe goes to one group, which one worker
runs (the other tests spread over the rest); the session's trained models are built once, by
the first worker that needs them, in the run's common folder (`built_once`); each worker gets
its share of the cores for torch; and the workers hand their TorchServe starts to the count.
"""

from __future__ import annotations

import fcntl
import io
import os
import shutil
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pytest
from _pytest.nodeid import NodeId  # pytest_collection_modifyitems: the xdist group

from scripts.ops.serve import TorchServe

# torch, PIL and the trainers are imported where they are used: xdist's controller loads this
# file too, and runs no test.
if TYPE_CHECKING:
    import torch
    from PIL import Image

STARTS: list[str] = []  # the test (node id) during which each TorchServe start happened
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:  # torch threads that outnumber the cores stall on each other's OpenMP barriers (set
    # before a test module imports torch; inherited by the processes the tests start)
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // WORKERS))


# Served modules whose fixtures train for a minute or more: they run last in the shared server's
# group, while another worker runs their tests that need no server, which train those models
# (session-scoped, `built_once`) as the other served tests run.
TRAINED_LAST = ("test_explain.py", "test_predict.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under --dist loadgroup (xdist), the groups:
    - every test of the shared TorchServe goes to one worker, in collection order but with
      TRAINED_LAST's modules at the end;
    - the other tests of TRAINED_LAST's modules form a group of their own (xdist hands out the
      larger groups first, so another worker takes it early);
    - a test that uses a module-scoped fixture (a module's own server or model) goes with the rest
      of its module, so that the fixture is made once; any other test goes to any free worker.
    xdist 3.8 reads a test's group from an "@group" suffix of its node id, which it can no longer
    write since pytest 9.2 made node ids structured (pytest-xdist#1386), so it is written here."""
    if not getattr(config.option, "loadgroup", False):  # set in xdist workers only
        return

    def group(item) -> str | None:
        if "shared_server" in item.fixturenames:
            return "shared_server"
        if item.path.name in TRAINED_LAST:
            return "trained_first"
        scopes = {defs[-1].scope for defs in item._fixtureinfo.name2fixturedefs.values()}
        return item.path.name if "module" in scopes else None

    groups = {item: group(item) for item in items}
    items.sort(key=lambda i: groups[i] == "shared_server" and i.path.name in TRAINED_LAST)
    for item in items:
        if groups[item]:
            item._id = NodeId.parse(f"{item.nodeid}@{groups[item]}")


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


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):  # an xdist worker: its starts go to the controller
        session.config.workeroutput["torchserve_starts"] = STARTS


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    STARTS.extend(getattr(node, "workeroutput", {}).get("torchserve_starts", []))


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


def built_once(tmp_path_factory, name: str, build: Callable[[Path], object]) -> Path:
    """The folder `name`, made by `build(folder)` once per run: under xdist the first worker
    builds it in the workers' common temporary folder while the others wait on a lock."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-of-<user>/pytest-N, above each worker's popen-gwK
    folder, done = root / name, root / f"{name}.built"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """data/digits-like tree: train/<digit>/*.png and test/<digit>/*.png (32x32 grey)."""
    from training.sample_data import write_digits

    return built_once(tmp_path_factory, "digits", lambda root: write_digits(root, size=32, test_fraction=0.2, seed=0))


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


def trained_once(tmp_path_factory, name: str, data: Path, *extra: str) -> Path:
    """The digits CNN trained on `data` with train_cli_args and `extra`, once per run (`built_once`)."""
    from training import train as train_mod

    def train(root: Path) -> None:
        assert train_mod.cli(train_cli_args(data, root / "digits", *extra)) == 0

    return built_once(tmp_path_factory, name, train) / "digits"


@pytest.fixture(scope="session")
def trained_digits(digits_dir, tmp_path_factory) -> Path:
    """A small CNN trained for a few epochs on the digits: a real training output folder."""
    return trained_once(tmp_path_factory, "trained_digits", digits_dir / "train", "--epochs", "3", "--batch-size", "32")


@pytest.fixture(scope="session")
def digits_run(digits_dir, tmp_path_factory) -> Path:
    """The same model after one epoch on the 287 test digits (a few seconds): a real training
    output folder for tests that need one, but not a model that has learned much."""
    return trained_once(tmp_path_factory, "digits_run", digits_dir / "test", "--epochs", "1")


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

    from training import shapes, train_detection

    def train(root: Path) -> None:
        data = shapes.generate(root / "voc", "voc", progress=False, **SHAPES_DETECTOR_DATA)
        assert train_detection.cli(["--data", str(data), "--out", str(root / "run"), *SHAPES_DETECTOR_TRAINING]) == 0

    root = built_once(tmp_path_factory, "shapes_detector", train)
    return TrainedRun(root / "run", root / "voc")


@pytest.fixture(scope="module")
def digits_model_dir(digits_run, tmp_path_factory) -> Path:
    """The digits model alone in a folder, as a worker's model_dir holds it."""
    model_dir = tmp_path_factory.mktemp("digits_model")
    for name in ("model.pt", "model.json"):
        shutil.copy(digits_run / name, model_dir / name)
    return model_dir


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Real photographs of several sizes and modes from scikit-image."""
    from PIL import Image
    from skimage import data

    return {
        "chelsea": Image.fromarray(data.chelsea()),  # 300x451 RGB cat
        "astronaut": Image.fromarray(data.astronaut()),  # 512x512 RGB
        "coffee": Image.fromarray(data.coffee()),  # 400x600 RGB
        "camera": Image.fromarray(data.camera()),  # 512x512 grey
    }


def classify_in_process(run_dir: Path, data: bytes) -> torch.Tensor:
    """Class probabilities of a training output folder's model for image bytes, no server."""
    import torch

    from model_defs import DataConfig
    from model_defs.checkpoint import load_trained
    from model_defs.preprocessing import eval_transform, load_image

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
    import numpy as np
    from PIL import Image

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
