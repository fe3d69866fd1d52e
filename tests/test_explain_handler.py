"""The explanation path's pure parts and the handlers driven in-process with TorchServe's
own Context (tests/test_explain.py covers the same answers through a real TorchServe)."""

from __future__ import annotations

import base64
import subprocess
import sys

import numpy as np
import pytest
import torch

from handlers.explain import crop_box, grid_sums
from handlers.options import OptionError, check_handler_options
from handlers.segmenter import ImageSegmenter
from handlers.vision import VisionHandler
from model_defs import DataConfig, get_model
from model_defs.checkpoint import save_model_files
from model_defs.preprocessing import eval_transform
from tests.conftest import encode
from tests.test_handler import load_handler, make_context
from tests.test_task_serving import SHAPE_CLASSES

pytestmark = pytest.mark.unit


def explain_run(handler, rows):
    """handle() with every request marked as TorchServe marks /explanations requests."""
    from ts.context import RequestProcessor

    ctx = make_context(handler.context.system_properties["model_dir"], len(rows))
    ctx.request_processor = [RequestProcessor({"explain": "True"}) for _ in rows]
    answers = handler.handle(rows, ctx)
    return answers, [ctx.get_response_status(i)[0] for i in range(len(rows))]


def test_workers_that_never_explain_do_not_import_captum():
    code = (
        "import sys, handlers.image_classifier, handlers.segmenter, handlers.object_detector; "
        "sys.exit('captum' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("size", [(300, 451), (451, 300), (61, 97), (40, 40)])
def test_crop_box_is_the_part_eval_transform_keeps(size):
    cfg = DataConfig(input_size=32, resize_size=36, channels=1, mean=(0.0,), std=(1.0,))
    h, w = size
    x1, y1, x2, y2 = crop_box(size, cfg)
    inside = torch.zeros(1, h, w, dtype=torch.uint8)
    inside[:, round(y1) : round(y2), round(x1) : round(x2)] = 255
    # All the model sees is inside the box (its edges blur into the black by a pixel)...
    assert eval_transform(cfg)(inside)[0, 1:-1, 1:-1].min() > 0.9
    # ...and the box is no bigger: input_size pixels of the image resized to resize_size.
    side = 32 * min(h, w) / 36
    assert abs((x2 - x1) - side) < 1 and abs((y2 - y1) - side) < 1


def test_grid_adds_up_to_the_map():
    attr = torch.randn(37, 53, dtype=torch.float64)
    grid = np.array(grid_sums(attr))
    assert grid.shape == (8, 8)
    assert abs(grid.sum() - attr.sum().item()) < 1e-4
    assert abs(grid[0, 0] - attr[:4, :6].sum().item()) < 1e-5  # cells are blocks of the map
    assert np.array(grid_sums(torch.ones(3, 5, dtype=torch.float64))).shape == (3, 5)


@pytest.mark.parametrize(
    "option, message",
    [
        ({"explain_steps": 0}, "explain_steps must be a whole number from 1"),
        ({"explain_steps": 300}, r"explain_steps \(300\) must be at most explain_max_steps \(128\)"),
        ({"explain_baseline": "noise"}, "explain_baseline must be one of mean, black, white, blur"),
        ({"explain_memory_mb": -1}, "explain_memory_mb must be a number from 0.001"),
    ],
)
def test_wrong_archive_settings_are_named(option, message):
    """The explanation settings are part of the one option schema (archive time and worker load)."""
    with pytest.raises(OptionError, match=message):
        check_handler_options(option)


@pytest.fixture(scope="module")
def rgb_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("rgb_explain")
    cfg = DataConfig(input_size=32, resize_size=36, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    model = get_model("small_cnn", num_classes=3, in_channels=3)
    save_model_files(
        model_dir,
        model,
        {
            "arch": "small_cnn",
            "arch_args": {"num_classes": 3, "in_channels": 3},
            "task": "classification",
            "classes": ["cat", "cup", "rocket"],
            "preprocessing": cfg.to_dict(),
        },
    )
    return model_dir


def test_internal_batches_are_sized_to_the_memory_setting(rgb_model_dir, photos):
    data = encode(photos["chelsea"], "JPEG")
    small = load_handler(rgb_model_dir, {"handler": {"explain_memory_mb": 0.01}})
    large = load_handler(rgb_model_dir, {"handler": {"explain_memory_mb": 4096}})
    x = small.transform(small.read_image(data, 3))
    assert small.explainer.internal_batch_size(x, 32) == 1
    assert large.explainer.internal_batch_size(x, 32) == 32
    # The batching changes the cost, not the answer.
    (a,), _ = explain_run(small, [{"body": data}])
    (b,), _ = explain_run(large, [{"body": data}])
    assert a["target"] == b["target"] and abs(a["attribution_sum"] - b["attribution_sum"]) < 1e-4


def test_a_task_without_explanations_answers_400_naming_it(tmp_path, photos):
    torch.manual_seed(0)
    cfg = DataConfig(input_size=32, resize_size=32, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    args = {"in_channels": 3, "widths": [8, 16, 32], "proj_hidden": 32, "proj_dim": 16}
    save_model_files(
        tmp_path,
        get_model("simclr", **args),
        {"arch": "simclr", "arch_args": args, "task": "embedding", "classes": [], "preprocessing": cfg.to_dict()},
    )
    from handlers.embedder import ImageEmbedder

    handler = ImageEmbedder()
    handler.initialize(make_context(tmp_path, 1))
    assert type(handler).explain_one is VisionHandler.explain_one
    (answer,), (status,) = explain_run(handler, [{"body": encode(photos["chelsea"], "PNG")}])
    assert status == 400 and answer["type"] == "ExplanationsUnsupported" and "embedding" in answer["message"]


def test_segmenter_refuses_a_class_it_predicts_nowhere(tmp_path, photos):
    torch.manual_seed(0)
    seg = get_model("unet", num_classes=4, in_channels=3, depth=2, width=8)
    with torch.no_grad():
        seg.head.bias[3] = -1e4  # "triangle" is never predicted
    save_model_files(
        tmp_path,
        seg,
        {
            "arch": "unet",
            "arch_args": {"num_classes": 4, "in_channels": 3, "depth": 2, "width": 8},
            "task": "segmentation",
            "classes": SHAPE_CLASSES,
            "preprocessing": DataConfig(input_size=32, resize_size=32, channels=3).to_dict(),
        },
    )
    handler = ImageSegmenter()
    handler.initialize(make_context(tmp_path, 1))
    data = encode(photos["coffee"], "JPEG")
    answers, statuses = explain_run(
        handler, [{"body": {"data": base64.b64encode(data).decode(), "target": "triangle"}}, {"body": data}]
    )
    assert statuses == [422, 200]
    assert "'triangle' is predicted nowhere" in answers[0]["message"]
    assert answers[1]["target"] != "triangle" and answers[1]["width"] == 600
