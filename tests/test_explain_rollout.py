"""Attention rollout, the second /explanations method, for Vision Transformer classifiers:
the map is a valid heatmap over the image as sent, it follows the image, it is chosen per
request or by the archive's explain_method, and every mistake is one line or a 4xx."""

from __future__ import annotations

import base64
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from handlers.explain import attention_layers, attention_rollout
from handlers.options import OptionError, check_handler_options
from handlers.segmenter import ImageSegmenter
from model_defs import DataConfig, get_model
from model_defs.checkpoint import save_model_files
from scripts.cli import archive
from tests.conftest import encode
from tests.test_explain_handler import explain_run
from tests.test_handler import load_handler, make_context
from tests.test_task_serving import SHAPE_CLASSES

pytestmark = pytest.mark.unit

CLASSES = ["cat", "cup", "rocket"]
VIT_ARGS = {"num_classes": 3, "in_channels": 3, "depth": 3, "dim": 64, "heads": 4}


def save(model_dir, arch, args, classes=CLASSES, task="classification", cfg=None):
    cfg = cfg or DataConfig(input_size=32, resize_size=36, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    meta = {"arch": arch, "arch_args": args, "task": task, "classes": classes, "preprocessing": cfg.to_dict()}
    save_model_files(model_dir, get_model(arch, **args), meta)
    return model_dir


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save(tmp_path_factory.mktemp("vit"), "vit_small", VIT_ARGS)


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save(tmp_path_factory.mktemp("cnn"), "small_cnn", {"num_classes": 3, "in_channels": 3})


def rollout_row(data: bytes, **fields) -> dict:
    return {"body": {"data": base64.b64encode(data).decode(), **fields}}


def heat_alpha(answer: dict) -> np.ndarray:
    """The heatmap's opacity per pixel (the map's strength), read back from its PNG."""
    heat = Image.open(io.BytesIO(base64.b64decode(answer["heatmap"])))
    assert heat.mode == "P" and heat.size == (answer["width"], answer["height"])
    return np.asarray(heat.convert("RGBA"))


def test_rollout_is_a_valid_heatmap_that_follows_the_image(vit_dir, photos):
    handler = load_handler(vit_dir)
    cat, rocket = encode(photos["chelsea"], "JPEG"), encode(photos["coffee"], "JPEG")
    answers, statuses = explain_run(
        handler, [rollout_row(cat, method="attention_rollout"), rollout_row(rocket, method="attention_rollout")]
    )
    assert statuses == [200, 200]
    for answer, (h, w) in zip(answers, [(300, 451), (400, 600)]):
        assert answer["method"] == "attention_rollout" and answer["target"] in CLASSES
        assert answer["layers"] == 3 and answer["patches"] == 8  # a 32 px image in 4 px patches
        assert (answer["height"], answer["width"]) == (h, w)
        grid = np.array(answer["grid"]["values"])
        assert grid.shape == (8, 8) and grid.min() >= 0 and abs(grid.sum() - 1) < 1e-3  # shares of the image
        rgba = heat_alpha(answer)
        x1, y1, x2, y2 = (round(v) for v in answer["grid"]["box"])
        assert rgba[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2, 3].min() > 0  # every pixel the model saw has a share
        assert rgba[..., 2][rgba[..., 3] > 0].max() <= rgba[..., 0][rgba[..., 3] > 0].max()  # red: no negative part
        assert "n_steps" not in answer and "convergence_delta" not in answer
    a, b = (np.array(x["grid"]["values"]) for x in answers)
    assert np.abs(a - b).max() > 1e-3  # two images, two maps


@pytest.mark.parametrize(
    "arch, args, size",
    [("vit_small", VIT_ARGS, 32), ("vit_b_16", {"num_classes": 3, "image_size": 64}, 64)],
)
def test_rollout_reads_every_attention_layer_of_both_vits(arch, args, size):
    """torchvision's ViT-B/16 calls its attention like the small ViT, without weights: the hooks
    ask for them, and the model's own answer is unchanged."""
    torch.manual_seed(0)
    model = get_model(arch, **args).eval().requires_grad_(False)
    x = torch.randn(3, size, size)
    shares, logits, layers = attention_rollout(model, x)
    assert layers == len(attention_layers(model)) > 0
    assert torch.allclose(logits, model(x[None])[0], atol=1e-4)
    side = size // (4 if arch == "vit_small" else 16)
    assert shares.shape == (side, side) and abs(float(shares.sum()) - 1) < 1e-6 and shares.min() >= 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in attention_layers(model))  # hooks removed


def test_the_archive_option_picks_the_method_and_a_request_overrides_it(vit_dir, photos):
    handler = load_handler(vit_dir, {"handler": {"explain_method": "attention_rollout"}})
    data = encode(photos["astronaut"], "PNG")
    answers, statuses = explain_run(
        handler, [{"body": data}, rollout_row(data, method="integrated_gradients", n_steps=4)]
    )
    assert statuses == [200, 200]
    assert answers[0]["method"] == "attention_rollout"
    assert answers[1]["method"] == "integrated_gradients" and answers[1]["n_steps"] == 4
    # Integrated Gradients stays the default.
    (answer,), _ = explain_run(load_handler(vit_dir), [{"body": data}])
    assert answer["method"] == "integrated_gradients"


def test_bad_method_requests_are_a_400_naming_the_problem(vit_dir, cnn_dir, photos):
    data = encode(photos["chelsea"], "JPEG")
    answers, statuses = explain_run(
        load_handler(vit_dir),
        [rollout_row(data, method="gradcam"), rollout_row(data, method="attention_rollout", n_steps=8), {"body": data}],
    )
    assert statuses == [400, 400, 200]
    assert "method must be one of integrated_gradients, attention_rollout, got 'gradcam'" in answers[0]["message"]
    assert "n_steps applies to integrated_gradients only" in answers[1]["message"]
    (answer,), (status,) = explain_run(load_handler(cnn_dir), [rollout_row(data, method="attention_rollout")])
    assert status == 400 and answer["type"] == "MethodUnsupported"
    assert "explains Vision Transformer classifiers; this small_cnn classification model" in answer["message"]


def test_a_segmenter_refuses_rollout_per_request(tmp_path, photos):
    torch.manual_seed(0)
    args = {"num_classes": 4, "in_channels": 3, "depth": 2, "width": 8}
    save(tmp_path, "unet", args, SHAPE_CLASSES, "segmentation", DataConfig(input_size=32, resize_size=32, channels=3))
    handler = ImageSegmenter()
    handler.initialize(make_context(tmp_path, 1))
    (answer,), (status,) = explain_run(
        handler, [rollout_row(encode(photos["coffee"], "JPEG"), method="attention_rollout")]
    )
    assert status == 400 and "segmentation model explains with integrated_gradients" in answer["message"]


def test_explain_method_is_in_the_one_option_schema():
    assert check_handler_options({"explain_method": "attention_rollout"}) == {"explain_method": "attention_rollout"}
    with pytest.raises(OptionError, match="explain_method must be one of integrated_gradients, attention_rollout"):
        check_handler_options({"explain_method": "rollout"})


def test_rollout_for_a_model_without_attention_is_refused_at_archive_time(cnn_dir, vit_dir, tmp_path, capsys):
    store = tmp_path / "store"
    cmd = ["--model-store", str(store), "--handler-option", "explain_method=attention_rollout"]
    assert archive.main([str(cnn_dir), "--name", "cnn", *cmd]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "explain_method: attention_rollout explains Vision Transformer classifiers" in err and "small_cnn" in err
    assert not (store / "cnn.mar").exists()
    assert archive.main([str(vit_dir), "--name", "vit", *cmd]) == 0 and (store / "vit.mar").exists()


def test_a_worker_given_rollout_for_a_cnn_refuses_to_load_in_one_line(cnn_dir, caplog):
    with caplog.at_level(logging.ERROR), pytest.raises(OptionError, match="explain_method"):
        load_handler(cnn_dir, {"handler": {"explain_method": "attention_rollout"}})
    assert any("refuses to load: handler option explain_method" in r.getMessage() for r in caplog.records)


def test_visualize_draws_a_rollout_and_names_a_misplaced_method(vit_dir, photos, tmp_path, capsys):
    from scripts.cli import visualize

    handler = load_handler(vit_dir)
    (answer,), _ = explain_run(handler, [rollout_row(encode(photos["chelsea"], "JPEG"), method="attention_rollout")])
    sheet = visualize.render(photos["chelsea"], answer)
    assert sheet.size == (451, 300 + 18)  # the image, under a caption line
    assert np.asarray(sheet)[18:, :, 0].astype(int).sum() > np.asarray(sheet)[18:, :, 2].astype(int).sum()  # red
    image = tmp_path / "cat.jpg"
    image.write_bytes(encode(photos["chelsea"], "JPEG"))
    assert visualize.main([str(image), "--model", "vit", "--method", "attention_rollout"]) == 2
    assert capsys.readouterr().err.strip() == "error: --target, --steps and --method go with --explain"
