"""The classification handler driven directly, with TorchServe's own Context, on real images."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest
import torch
from ts.context import Context, RequestProcessor

from handlers.image_classifier import ImageClassifier
from model_defs import DataConfig, get_entry, get_model
from model_defs.checkpoint import load_trained, save_model_files
from scripts.ops.serve import ROOT
from tests.conftest import classify_in_process, encode, image_variants

pytestmark = pytest.mark.unit


def make_context(model_dir, n_requests: int, config: dict | None = None) -> Context:
    ctx = Context(
        "test", str(model_dir), {"model": {"modelName": "test"}}, 8, None, "0.12.0", model_yaml_config=config or {}
    )
    ctx.request_processor = [RequestProcessor({}) for _ in range(n_requests)]
    return ctx


def load_handler(model_dir, config=None) -> ImageClassifier:
    handler = ImageClassifier()
    handler.initialize(make_context(model_dir, 1, config))
    return handler


def run(handler, model_dir, rows, config=None):
    ctx = make_context(model_dir, len(rows), config)
    answers = handler.handle(rows, ctx)
    return answers, [ctx.get_response_status(i)[0] for i in range(len(rows))]


@pytest.fixture(scope="module")
def rgb_model_dir(tmp_path_factory):
    """An RGB model with four named classes (untrained: the handler's mechanics are under test)."""
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("rgb_model")
    cfg = DataConfig(input_size=32, resize_size=32, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    model = get_model("small_cnn", num_classes=4, in_channels=3)
    save_model_files(
        model_dir,
        model,
        {
            "arch": "small_cnn",
            "arch_args": {"num_classes": 4, "in_channels": 3},
            "task": "classification",
            "classes": ["cat", "dog", "cup", "face"],
            "preprocessing": cfg.to_dict(),
            "multi_label": False,
        },
    )
    return model_dir


def test_batch_predictions_equal_in_process(digits_model_dir, digits_dir):
    handler = load_handler(digits_model_dir, {"handler": {"topk": 3}})
    files = sorted((digits_dir / "test").rglob("*.png"))[::40]
    answers, codes = run(handler, digits_model_dir, [{"body": f.read_bytes()} for f in files])
    assert codes == [200] * len(files)
    for f, answer in zip(files, answers):
        probs = classify_in_process(digits_model_dir, f.read_bytes())
        assert len(answer) == 3
        assert list(answer)[0] == str(int(probs.argmax()))
        for label, p in answer.items():
            assert abs(p - probs[int(label)].item()) < 1e-5


def test_request_forms_raw_multipart_and_base64_json(rgb_model_dir, photos):
    handler = load_handler(rgb_model_dir)
    data = encode(photos["chelsea"], "JPEG")
    rows = [{"body": data}, {"data": bytearray(data)}, {"body": {"data": base64.b64encode(data).decode()}}]
    answers, codes = run(handler, rgb_model_dir, rows)
    assert codes == [200, 200, 200]
    assert answers[0] == answers[1] == answers[2]


def test_every_format_is_served(rgb_model_dir, photos):
    handler = load_handler(rgb_model_dir)
    variants = image_variants(photos["astronaut"])
    answers, codes = run(handler, rgb_model_dir, [{"body": b} for b in variants.values()])
    assert codes == [200] * len(variants), dict(zip(variants, codes))
    assert all(abs(sum(a.values()) - 1) < 1e-5 for a in answers)  # top-4 of 4 classes: all of them


def test_topk_is_clamped_to_the_number_of_classes(rgb_model_dir, photos):
    handler = load_handler(rgb_model_dir, {"handler": {"topk": 50}})
    answers, _ = run(handler, rgb_model_dir, [{"body": encode(photos["coffee"], "PNG")}])
    assert sorted(answers[0]) == ["cat", "cup", "dog", "face"]
    assert list(answers[0].values()) == sorted(answers[0].values(), reverse=True)


def test_a_bad_item_gets_its_own_4xx_and_the_rest_of_the_batch_succeeds(rgb_model_dir, photos):
    handler = load_handler(rgb_model_dir)
    good = encode(photos["chelsea"], "JPEG")
    rows = [
        {"body": good},
        {"body": b"this is not an image"},
        {"body": good[: len(good) // 3]},
        {"body": {"image": "x"}},
        {"body": {"data": "%%% not base64 %%%"}},
        {"body": b""},
        {"body": encode(photos["camera"], "PNG")},
    ]
    answers, codes = run(handler, rgb_model_dir, rows)
    assert codes == [200, 400, 400, 400, 400, 400, 200]
    alone = run(handler, rgb_model_dir, [{"body": good}])[0][0]
    assert list(answers[0]) == list(alone)
    assert all(abs(answers[0][k] - alone[k]) < 1e-5 for k in alone)  # batched kernels: float noise only
    messages = {i: answers[i]["message"] for i in range(1, 6)}
    assert "not an image" in messages[1]
    assert "could not be decoded" in messages[2] or "not an image" in messages[2]
    assert '"data"' in messages[3]
    assert "base64" in messages[4]
    assert "empty" in messages[5] or "no body" in messages[5]
    for i in range(1, 6):
        assert set(answers[i]) == {"code", "type", "message"}


def test_multi_label_returns_every_label_over_the_threshold(rgb_model_dir, photos, tmp_path):
    model, meta = load_trained(rgb_model_dir)
    with torch.no_grad():  # make the head favour "cat" and "cup" strongly, the others not at all
        head = model.get_submodule(get_entry(meta["arch"]).head)
        head.weight.zero_()
        head.bias.copy_(torch.tensor([5.0, -5.0, 3.0, -5.0]))
    save_model_files(tmp_path, model, {**meta, "multi_label": True, "threshold": 0.5})
    handler = load_handler(tmp_path)
    answers, codes = run(handler, tmp_path, [{"body": encode(photos["chelsea"], "PNG")}])
    assert codes == [200]
    assert list(answers[0]) == ["cat", "cup"]
    assert answers[0]["cat"] > answers[0]["cup"] > 0.5


def test_threads_fit_workers_into_the_cores(rgb_model_dir, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    handler = ImageClassifier()
    handler.config, handler.handler_config = {"minWorkers": 4}, {}
    assert handler.threads_per_worker() == 2
    handler.handler_config = {"torch_threads": 3}
    assert handler.threads_per_worker() == 3


def test_a_worker_imports_every_image_format_at_start(rgb_model_dir):
    """PIL imports its rarer format plugins on the first bytes it cannot identify, about 0.1 s;
    a fresh worker pays that in initialize, not in a client's first unusual image."""
    code = (
        "import sys; from tests.test_handler import load_handler; "
        f"assert 'PIL.XVThumbImagePlugin' not in sys.modules; load_handler({str(rgb_model_dir)!r}); "
        "assert 'PIL.XVThumbImagePlugin' in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_form_encoded_body_with_no_image_gets_a_415_naming_the_fix(rgb_model_dir, photos):
    """What `curl --data-binary @file` without a Content-Type sends: the frontend reads the bytes
    as form fields, and the handler finds no image among them (tests/test_user_server.py sends
    it with real curl)."""
    handler = load_handler(rgb_model_dir)
    rows = [{"shopping list: milk, eggs\n": b""}, {}, {"body": encode(photos["chelsea"], "JPEG")}]
    ctx = make_context(rgb_model_dir, len(rows))
    ctx.request_processor = [
        RequestProcessor({"Content-Type": "application/x-www-form-urlencoded"}),
        RequestProcessor({}),
        RequestProcessor({"content-type": "application/x-www-form-urlencoded; charset=utf-8"}),
    ]
    answers = handler.handle(rows, ctx)
    assert [ctx.get_response_status(i)[0] for i in range(3)] == [415, 400, 200]
    assert answers[0]["type"] == "FormEncodedBody" and "Content-Type: image/jpeg" in answers[0]["message"]
    assert answers[1]["type"] == "EmptyBody"
