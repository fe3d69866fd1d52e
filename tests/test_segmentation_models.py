"""Every registered segmenter through the segmentation trainer and the segmentation handler,
so a newly registered one (the DeepLabV3s, LR-ASPP) is trained and served the moment it is
registered: a short real run on shapes masks, and the handler's masks on real photographs
equal to the in-process ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from handlers.segmenter import ImageSegmenter
from model_defs import DataConfig, get_entry, get_model, list_models
from model_defs.checkpoint import load_trained, save_model_files
from tests.conftest import encode
from tests.test_handler import make_context
from tests.test_registry import speed
from tests.test_task_serving import SHAPE_CLASSES, decode_png, mask_in_process
from training import shapes, train_segmentation


def segmenters() -> list:
    return [pytest.param(n, id=n, marks=speed(n)) for n in list_models("segmentation")]


@pytest.fixture(scope="module")
def masks(tmp_path_factory):
    return shapes.generate(tmp_path_factory.mktemp("shapes") / "masks", "masks", n=10, size=48, seed=2, progress=False)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", segmenters())
def test_segmentation_trainer_trains_every_segmenter(name, masks, tmp_path):
    out = tmp_path / name
    argv = ["--data", str(masks), "--out", str(out), "--model", name, "--input-size", "32", "--epochs", "1"]
    argv += ["--batch-size", "4", "--workers", "0", "--threads", "1", "--no-progress", "--pictures", "1"]
    argv += [f"--model-arg={k}={v}" for k, v in get_entry(name).test_kwargs.items()]
    assert train_segmentation.cli(argv) == 0
    model, meta = load_trained(out)
    assert meta["arch"] == name and meta["arch_args"]["num_classes"] == len(SHAPE_CLASSES)
    assert 0 <= meta["metrics"]["best_val"] <= 1 and (out / "predictions.png").is_file()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, len(SHAPE_CLASSES), 32, 32)


@pytest.mark.parametrize("name", segmenters())
def test_segmentation_handler_serves_every_segmenter(name, tmp_path, photos):
    torch.manual_seed(0)
    entry = get_entry(name)
    arch_args = {"num_classes": len(SHAPE_CLASSES), "in_channels": 3, **entry.test_kwargs}
    model = get_model(name, **arch_args)
    with torch.no_grad():  # an untrained model predicts one class everywhere: make the masks vary
        for predictor in entry.predictors:
            model.get_submodule(predictor).weight.mul_(20)
    cfg = DataConfig(input_size=64, resize_size=64, channels=3)
    meta = {"arch": name, "arch_args": arch_args, "task": "segmentation", "classes": SHAPE_CLASSES}
    save_model_files(tmp_path, model, {**meta, "preprocessing": cfg.to_dict()})
    handler = ImageSegmenter()
    handler.initialize(make_context(tmp_path, 1))
    payloads = [encode(photos["chelsea"], "JPEG", quality=90), encode(photos["camera"], "PNG")]
    for data in payloads:  # one at a time: a batch of one, as in-process
        ctx = make_context(tmp_path, 1)
        (answer,) = handler.handle([{"body": data}], ctx)
        assert ctx.get_response_status(0)[0] == 200, answer
        expected = mask_in_process(tmp_path, data)
        np.testing.assert_array_equal(np.asarray(decode_png(answer["mask"])), expected)
        counts = np.bincount(expected.ravel(), minlength=len(SHAPE_CLASSES)) / expected.size
        assert [answer["fractions"][c] for c in SHAPE_CLASSES] == pytest.approx(counts.tolist(), abs=1e-6)


@pytest.mark.unit
def test_deeplab_needs_two_images_a_batch(masks, tmp_path, capsys):
    """DeepLabV3's ASPP pooling branch has BatchNorm over one value per image: one image a batch is refused."""
    out = tmp_path / "o"
    argv = ["--data", str(masks), "--out", str(out), "--model", "deeplabv3_mobilenet_v3", "--batch-size", "1"]
    assert train_segmentation.cli([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --batch-size 1: deeplabv3_mobilenet_v3's ASPP pooling") and err.count("\n") == 1
    assert not out.exists()
