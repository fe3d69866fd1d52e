"""A detector trained for one epoch on real shapes files, archived and served by a real
TorchServe: REST answers equal the in-process answers of the same model on the same files."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from model_defs.checkpoint import load_trained
from model_defs.detection import detect_answers
from model_defs.preprocessing import detection_input, load_image
from scripts.cli import archive
from tests.conftest import serving
from training import shapes, train_detection

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]

CONFIG_THRESHOLD, CONFIG_MAX = 0.05, 10


@pytest.fixture(scope="module")
def det_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("det_data")
    return shapes.generate(root / "voc", "voc", 8, 128, seed=0, aspect=1.6, progress=False)


@pytest.fixture(scope="module")
def det_run(det_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("det_run") / "run"
    assert (
        train_detection.cli(
            [
                "--data",
                str(det_data),
                "--out",
                str(out),
                "--input-size",
                "128",
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--workers",
                "0",
                "--pictures",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def det_server(det_run, shared_server):
    store = shared_server.model_store
    assert (
        archive.main(
            [
                str(det_run),
                "--name",
                "shapes",
                "--model-store",
                str(store),
                "--batch-size",
                "4",
                "--max-batch-delay",
                "200",
                "--handler-option",
                f"score_threshold={CONFIG_THRESHOLD}",
                "--handler-option",
                f"max_detections={CONFIG_MAX}",
            ]
        )
        == 0
    )
    with serving(shared_server, "shapes") as ts:
        yield ts


def predict(ts, data=None, **kw):
    return requests.post(
        f"{ts.url('inference')}/predictions/shapes", data=data, headers=ts.headers("inference"), timeout=120, **kw
    )


def in_process(run_dir, data: bytes, score_threshold=CONFIG_THRESHOLD, max_detections=CONFIG_MAX) -> list[dict]:
    model, meta = load_trained(run_dir)
    image = load_image(data, 3)
    x, scale = detection_input(image, meta["preprocessing"]["input_size"])
    with torch.inference_mode():
        out = model([x])[0]
    return detect_answers(out, scale, image.size, meta["classes"], score_threshold, max_detections)


def assert_same(served: list[dict], expected: list[dict]) -> None:
    """Same detections: label equal, score within 1e-4, box within 1 px (order of equal scores may differ)."""
    assert len(served) == len(expected), (served, expected)
    left = list(expected)
    for d in served:
        match = next(
            (
                e
                for e in left
                if e["label"] == d["label"]
                and abs(e["score"] - d["score"]) < 1e-4
                and all(abs(a - b) <= 1.0 for a, b in zip(e["box"], d["box"]))
            ),
            None,
        )
        assert match is not None, (d, expected)
        left.remove(match)


def test_trained_run_has_the_detection_metadata(det_run):
    _, meta = load_trained(det_run)
    assert meta["task"] == "detection" and meta["classes"] == list(shapes.CLASSES)
    assert set(meta["metrics"]) >= {"map_50", "map", "best_epoch"}
    assert len(meta["dataset"]["fingerprint"]) == 64 and meta["versions"]["torchmetrics"]
    assert (det_run / "detections.png").is_file() and (det_run / "metrics.csv").is_file()


def test_rest_answers_equal_in_process_answers(det_server, det_run, det_data):
    files = sorted((det_data / "JPEGImages").glob("*.jpg"))
    with ThreadPoolExecutor(len(files)) as pool:  # concurrent, so TorchServe batches images of several sizes
        answers = list(pool.map(lambda f: predict(det_server, f.read_bytes()), files))
    sizes = {Image.open(f).size for f in files}
    assert len(sizes) > 1  # several aspect ratios in one batch
    nonempty = 0
    for f, r in zip(files, answers):
        assert r.status_code == 200, r.text
        served = r.json()
        w, h = Image.open(f).size
        assert all(0 <= d["box"][0] < d["box"][2] <= w and 0 <= d["box"][1] < d["box"][3] <= h for d in served)
        assert all(d["score"] >= CONFIG_THRESHOLD for d in served) and len(served) <= CONFIG_MAX
        assert_same(served, in_process(det_run, f.read_bytes()))
        nonempty += bool(served)
    assert nonempty  # the comparison was not between empty lists


def test_per_request_options_json_and_multipart(det_server, det_run, det_data, photos):
    buf = io.BytesIO()
    photos["chelsea"].save(buf, format="JPEG")  # a real 451x300 photo, another size again
    data = buf.getvalue()
    as_json = predict(
        det_server, json={"data": base64.b64encode(data).decode(), "score_threshold": 0.0, "max_detections": 3}
    )
    multipart = predict(
        det_server,
        files={"data": ("cat.jpg", data, "image/jpeg")},
        data={"score_threshold": "0", "max_detections": "3"},
    )
    expected = in_process(det_run, data, 0.0, 3)
    assert len(expected) == 3
    for how, r in (("json", as_json), ("multipart", multipart)):
        assert r.status_code == 200, (how, r.text)
        assert len(r.json()) == 3, how
        assert_same(r.json(), expected)


def test_bad_items_get_400_while_their_batch_mates_succeed(det_server, det_data):
    good = sorted((det_data / "JPEGImages").glob("*.jpg"))[:3]
    img = base64.b64encode(good[0].read_bytes()).decode()
    bad = [
        b"not an image",
        {"json": {"data": img, "score_threshold": 2}},
        {"json": {"data": img, "max_detections": "many"}},
    ]
    jobs = [{"data": f.read_bytes()} for f in good] + [b if isinstance(b, dict) else {"data": b} for b in bad]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda kw: predict(det_server, **kw), jobs))
    assert [r.status_code for r in answers] == [200] * 3 + [400] * 3, [r.text for r in answers]
    assert [r.json()["type"] for r in answers[3:]] == ["InvalidImage", "InvalidOption", "InvalidOption"]
    assert "score_threshold must be between 0 and 1" in answers[4].json()["message"]


def test_visualize_draws_the_served_boxes(det_server, det_data, tmp_path):
    from scripts.cli import visualize

    image = sorted((det_data / "JPEGImages").glob("*.jpg"))[0]
    out = tmp_path / "boxes.png"
    assert (
        visualize.main(
            [
                str(image),
                "--model",
                "shapes",
                "--run-dir",
                str(det_server.run_dir),
                "--score-threshold",
                "0",
                "--max-detections",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    drawn, original = Image.open(out).convert("RGB"), Image.open(image).convert("RGB")
    zoom = 320 / max(original.size)  # small images are drawn enlarged so the labels stay readable
    assert zoom > 1 and drawn.size == (round(original.width * zoom), round(original.height * zoom))
    original = original.resize(drawn.size, Image.Resampling.BILINEAR)
    changed = (torch.from_numpy(np.array(drawn)) != torch.from_numpy(np.array(original))).any(-1).float().mean()
    assert 0.001 < changed < 0.5  # box outlines and labels, not a repainted image


def test_visualize_draws_a_segmenters_mask():
    from model_defs.preprocessing import encode_png
    from scripts.cli.visualize import render

    image = Image.new("RGB", (40, 30), (0, 0, 0))
    mask = torch.zeros(30, 40, dtype=torch.uint8)
    mask[5:15, 10:30] = 2
    answer = {
        "mask": base64.b64encode(encode_png(Image.fromarray(mask.numpy(), "L"))).decode(),
        "classes": ["background", "rectangle", "ellipse"],
    }
    drawn = torch.from_numpy(np.array(render(image, answer)))
    assert (drawn[10, 20] > 0).any() and (drawn[25, 35] == 0).all()  # the class area is coloured, the background not
    with pytest.raises(ValueError, match="neither detections, a mask nor an explanation"):
        render(image, {"cat": 0.9})
