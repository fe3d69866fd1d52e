"""Explanations (Integrated Gradients) through a real TorchServe's /explanations API.

One server serves: a classifier trained here on shapes painted on real photographs (one
shape per image, so each image's label has an exact mask), the same run archived with the
int8 runtime, and a small (untrained, seeded) segmenter. The answers are checked against
the same models run in-process, against Integrated Gradients' completeness property, and
against the shapes' known masks.
"""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from model_defs import DataConfig, get_model
from model_defs.checkpoint import load_trained
from model_defs.preprocessing import eval_transform, load_image, segmentation_transform
from scripts.cli import archive
from tests.conftest import built_once, encode, serving
from tests.test_task_serving import SHAPE_CLASSES, _perturb_batchnorm, _save
from training import train as train_mod
from training.shapes import CLASSES, generate

pytestmark = [pytest.mark.serve, pytest.mark.slow, pytest.mark.timeout(600)]  # its fixture trains 10 epochs (30 s)

SIZE = 40  # image side = model input: the map and the masks share pixels
# Completeness at the default 32 steps: |delta| <= 5% of |f(x) - f(baseline)| + 0.05 (in
# logits; the constant covers ends that are close together).
DELTA_TOLERANCE = (0.05, 0.05)


def write_one_shape_dataset(out, n: int, seed: int):
    """Shapes on photos, one per image, as images/ + labels.txt (+ the masks, kept beside)."""
    root = generate(out, "masks", n=n, size=SIZE, seed=seed, max_shapes=1, progress=False, shape_size=(0.4, 0.6))
    lines = [
        f"{m.name} {CLASSES[int(np.asarray(Image.open(m)).max()) - 1]}" for m in sorted((root / "masks").glob("*.png"))
    ]
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return root


@pytest.fixture(scope="session")
def shapes_run(tmp_path_factory):
    """A small classifier trained on one shape per photo (about 30 s). Built once per run, by any
    xdist worker: the served tests below are ordered after one that needs it (conftest.py)."""

    def build(root):
        data = write_one_shape_dataset(root / "train", n=1500, seed=0)
        out = root / "run"
        assert (
            train_mod.cli(
                [
                    "--data",
                    str(data),
                    "--layout",
                    "labels_txt",
                    "--model",
                    "lenet5_bn",
                    "--channels",
                    "3",
                    "--input-size",
                    str(SIZE),
                    "--resize-size",
                    str(SIZE),
                    "--min-scale",
                    "1.0",
                    "--epochs",
                    "10",
                    "--batch-size",
                    "32",
                    "--lr",
                    "3e-3",
                    "--workers",
                    "0",
                    "--seed",
                    "0",
                    "--no-progress",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )

    return built_once(tmp_path_factory, "explain_shapes_run", build) / "run"


def test_the_classifier_it_explains_has_learned_the_shapes(shapes_run):
    """Where attributions fall says something only for a classifier that sees the shapes."""
    assert json.loads((shapes_run / "model.json").read_text())["metrics"]["best_val"] >= 0.75


@pytest.fixture(scope="module")
def held_out_dir(tmp_path_factory):
    return write_one_shape_dataset(tmp_path_factory.mktemp("shapes") / "test", n=40, seed=1)


@pytest.fixture(scope="module")
def held_out(held_out_dir):
    """Images the classifier never saw, with their labels and masks."""
    root = held_out_dir
    labels = dict(line.split() for line in (root / "labels.txt").read_text().splitlines())
    return [
        (p.read_bytes(), labels[p.name], np.asarray(Image.open(root / "masks" / p.name)) > 0)
        for p in sorted((root / "images").glob("*.png"))
    ]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    torch.manual_seed(0)
    seg = get_model("unet", num_classes=4, in_channels=3, depth=2, width=8)
    _perturb_batchnorm(seg)
    with torch.no_grad():  # an untrained head predicts background everywhere: make the masks vary
        seg.head.weight.mul_(20)
    return _save(
        tmp_path_factory.mktemp("seg"),
        seg,
        "unet",
        {"num_classes": 4, "in_channels": 3, "depth": 2, "width": 8},
        "segmentation",
        SHAPE_CLASSES,
        DataConfig(input_size=64, resize_size=64, channels=3),
    )


@pytest.fixture(scope="module")
def server(shapes_run, seg_run, held_out_dir, shared_server):
    store = shared_server.model_store
    common = ["--model-store", str(store), "--batch-size", "4", "--max-batch-delay", "200"]
    assert archive.main([str(shapes_run), "--name", "shapes", *common]) == 0
    # The int8 archive is here for its explanations, not its accuracy: a short check, no gate.
    assert (
        archive.main(
            [
                str(shapes_run),
                "--name",
                "shapes_int8",
                "--runtime",
                "int8",
                "--calibration-images",
                "32",
                "--val-data",
                str(held_out_dir),
                "--max-accuracy-drop",
                "100",
                *common,
            ]
        )
        == 0
    )
    assert archive.main([str(seg_run), "--name", "seg", *common]) == 0
    with serving(shared_server, "shapes", "shapes_int8", "seg", timeout=300) as ts:
        yield ts


def post(ts, route: str, data=None, **kw):
    kw.setdefault("headers", ts.headers("inference"))
    return requests.post(f"{ts.url('inference')}/{route}", data=data, timeout=120, **kw)


def explain(ts, model: str, data: bytes, **fields):
    """An /explanations request: raw bytes, or JSON with the fields given."""
    if fields:
        return post(ts, f"explanations/{model}", json={"data": base64.b64encode(data).decode(), **fields})
    return post(ts, f"explanations/{model}", data)


def heatmap(answer: dict) -> tuple[np.ndarray, np.ndarray]:
    """(signed map scaled to [-1, 1], opacity) read back from the answer's palette PNG."""
    png = Image.open(io.BytesIO(base64.b64decode(answer["heatmap"])))
    assert png.mode == "P"
    index = np.asarray(png).astype(float)
    alpha = np.frombuffer(png.info["transparency"], dtype=np.uint8)[np.asarray(png)]
    return index / 254 * 2 - 1, alpha


def logits_in_process(run_dir, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager model's logits for the image and for the mean baseline (zeros)."""
    model, meta = load_trained(run_dir)
    cfg = DataConfig.from_dict(meta["preprocessing"])
    x = eval_transform(cfg)(load_image(data, cfg.channels))
    with torch.inference_mode():
        out = model(torch.stack([x, torch.zeros_like(x)]))
    return out[0], out[1]


def grown(mask: np.ndarray) -> np.ndarray:
    """The mask with every pixel next to it (3x3 neighbourhood) added."""
    return torch.nn.functional.max_pool2d(torch.from_numpy(mask)[None, None].float(), 3, 1, 1)[0, 0].bool().numpy()


def test_explanation_of_the_top_class_with_a_map_of_the_image_size(server, held_out, photos):
    chelsea = encode(photos["chelsea"], "JPEG", quality=90)  # 451x300: the model sees a center crop
    for data in (held_out[0][0], chelsea):
        r = explain(server, "shapes", data)
        assert r.status_code == 200, r.text
        answer = r.json()
        predicted = post(server, "predictions/shapes", data).json()
        assert answer["target"] == list(predicted)[0]
        assert abs(answer["probability"] - predicted[answer["target"]]) < 1e-4
        width, height = Image.open(io.BytesIO(data)).size
        assert (answer["width"], answer["height"]) == (width, height)
        values, alpha = heatmap(answer)
        assert values.shape == (height, width)
        x1, y1, x2, y2 = answer["grid"]["box"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert len(answer["grid"]["values"]) == 8 and all(len(row) == 8 for row in answer["grid"]["values"])
        outside = np.ones((height, width), bool)
        outside[round(y1) : round(y2), round(x1) : round(x2)] = False
        assert alpha[outside].max(initial=0) == 0  # pixels the model never saw carry nothing
        assert alpha[~outside].max() > 200  # and the map is drawn where it did look
    assert (x1, x2) != (0, width)  # chelsea's sides were cropped off


def test_completeness_within_the_reported_delta(server, shapes_run, held_out):
    for data, _, _ in held_out[:16]:
        answer = explain(server, "shapes", data).json()
        assert answer["n_steps"] == 32 and answer["baseline"] == "mean"
        logits, at_baseline = logits_in_process(shapes_run, data)
        target = CLASSES.index(answer["target"])
        # f(input) and f(baseline) are the eager model's, run here in-process
        assert abs(answer["output"] - logits[target].item()) < 1e-4
        assert abs(answer["baseline_output"] - at_baseline[target].item()) < 1e-4
        grid_sum = sum(map(sum, answer["grid"]["values"]))
        assert abs(grid_sum - answer["attribution_sum"]) < 1e-3  # the grid adds up to the attributions
        gap = answer["output"] - answer["baseline_output"]
        assert abs(answer["attribution_sum"] - gap - answer["convergence_delta"]) < 1e-4
        assert abs(answer["convergence_delta"]) <= DELTA_TOLERANCE[0] * abs(gap) + DELTA_TOLERANCE[1], answer


def test_the_same_request_gets_the_same_answer_alone_or_in_a_batch(server, held_out):
    data = held_out[3][0]
    first = explain(server, "shapes", data).json()
    assert explain(server, "shapes", data).json() == first
    others = [d for d, _, _ in held_out[4:7]]
    with ThreadPoolExecutor(4) as pool:  # with batch mates this time
        answers = list(pool.map(lambda d: explain(server, "shapes", d), [data, *others]))
    assert answers[0].json() == first
    assert all(r.json()["heatmap"] != first["heatmap"] for r in answers[1:])


def test_a_class_named_in_json_or_a_form_field_is_explained(server, held_out):
    data = held_out[5][0]
    probs = post(server, "predictions/shapes", data).json()
    for name in CLASSES:
        as_json = explain(server, "shapes", data, target=name).json()
        form = post(server, "explanations/shapes", files={"data": ("img.png", data)}, data={"target": name}).json()
        assert as_json["target"] == form["target"] == name
        assert abs(as_json["probability"] - probs[name]) < 1e-4
        assert as_json == form


def test_an_unknown_class_gets_400_naming_it(server, held_out):
    data = held_out[0][0]
    for r in (
        explain(server, "shapes", data, target="hexagon"),
        post(server, "explanations/shapes", files={"data": ("img.png", data)}, data={"target": "hexagon"}),
    ):
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["type"] == "UnknownClass" and "'hexagon'" in body["message"] and "rectangle" in body["message"]


def test_steps_come_from_the_request_up_to_the_archive_bound(server, held_out):
    data = held_out[1][0]
    assert explain(server, "shapes", data, n_steps=8).json()["n_steps"] == 8
    for steps in (129, 0, "many", 2.5):
        r = explain(server, "shapes", data, n_steps=steps)
        assert r.status_code == 400, (steps, r.text)
        assert "n_steps" in r.json()["message"]
    assert "from 1 to 128" in explain(server, "shapes", data, n_steps=129).json()["message"]


def test_versioned_route_and_predictions_beside_explanations(server, held_out):
    data = held_out[2][0]
    plain = explain(server, "shapes", data).json()
    assert post(server, "explanations/shapes/1.0", data).json() == plain
    alone = post(server, "predictions/shapes", data).json()
    routes = ["predictions/shapes", "explanations/shapes"] * 3
    with ThreadPoolExecutor(len(routes)) as pool:  # predictions and explanations share batches
        answers = list(pool.map(lambda route: post(server, route, data), routes))
    for route, r in zip(routes, answers):
        assert r.status_code == 200, r.text
        if route.startswith("explanations"):
            assert r.json() == plain  # each image is explained on its own
        else:  # batched predictions may differ from a batch of one in the last bits
            assert r.json() == pytest.approx(alone, abs=1e-5)


def test_bad_images_get_their_own_400_while_batch_mates_are_explained(server, held_out):
    good = [d for d, _, _ in held_out[:3]]
    bad = [b"not an image", good[0][:60], b""]
    with ThreadPoolExecutor(len(good) + len(bad)) as pool:
        answers = list(pool.map(lambda d: explain(server, "shapes", d), good + bad))
    for data, r in zip(good, answers):
        assert r.status_code == 200, r.text
        assert r.json()["target"] == list(post(server, "predictions/shapes", data).json())[0]
    for r in answers[len(good) :]:
        assert r.status_code == 400, r.text
        assert set(r.json()) == {"code", "type", "message"}


def test_most_positive_attribution_falls_inside_the_shape(server, held_out):
    """On held-out images the trained classifier gets right: most positive attribution lies
    on the shape (its exact mask grown by one pixel: an edge is made of the pixels on both of
    its sides, and a uniform shape is told apart by its edges), and the exact mask alone holds
    far more of it than its share of the image."""
    on_shape, inside, area = [], [], []
    for data, label, mask in held_out:
        answer = explain(server, "shapes", data).json()
        if answer["target"] != label:
            continue
        positive = np.clip(heatmap(answer)[0], 0, None)
        on_shape.append(positive[grown(mask)].sum() / positive.sum())
        inside.append(positive[mask].sum() / positive.sum())
        area.append(mask.mean())
    assert len(inside) >= len(held_out) * 0.7  # the model learned the shapes
    assert np.mean(on_shape) > 0.5, (np.mean(on_shape), np.mean(inside), np.mean(area))
    assert np.mean(inside) > 1.5 * np.mean(area), (np.mean(inside), np.mean(area))


def test_an_int8_archive_explains_with_the_eager_model_it_carries(server, held_out):
    """Its predictions are int8's, its explanations the eager model's: the same as the eager
    archive's (up to float rounding: the eager archive runs its model channels_last)."""
    prob_gaps = []
    for data, _, _ in held_out[:4]:
        r = explain(server, "shapes_int8", data)
        assert r.status_code == 200, r.text
        got, want = r.json(), explain(server, "shapes", data).json()
        assert got["target"] == want["target"]
        numbers = ("probability", "convergence_delta", "attribution_sum", "output", "baseline_output")
        assert [got[k] for k in numbers] == pytest.approx([want[k] for k in numbers], abs=1e-4)
        assert np.abs(heatmap(got)[0] - heatmap(want)[0]).max() <= 2 / 254 + 1e-9  # one palette level
        int8, eager = (post(server, f"predictions/{m}", data).json() for m in ("shapes_int8", "shapes"))
        prob_gaps.append(max(abs(int8[k] - eager[k]) for k in eager))
    assert max(prob_gaps) > 1e-3  # the int8 runtime really answers the predictions


def seg_mask_in_process(run_dir, data: bytes) -> np.ndarray:
    model, meta = load_trained(run_dir)
    cfg = DataConfig.from_dict(meta["preprocessing"])
    with torch.inference_mode():
        return model(segmentation_transform(cfg)(load_image(data, 3))[None])[0].argmax(0).numpy()


def test_segmenter_explains_a_class_over_its_predicted_region(server, seg_run, held_out, photos):
    payloads = [held_out[0][0], encode(photos["coffee"], "JPEG", quality=90)]
    for data in payloads:
        predicted = np.bincount(seg_mask_in_process(seg_run, data).ravel(), minlength=4)
        default = int(predicted[1:].argmax()) + 1
        answer = explain(server, "seg", data).json()
        assert answer["target"] == SHAPE_CLASSES[default]  # the largest non-background region
        width, height = Image.open(io.BytesIO(data)).size
        assert heatmap(answer)[0].shape == (height, width)
        assert answer["grid"]["box"] == [0, 0, width, height]  # the whole image, no crop
        gap = answer["output"] - answer["baseline_output"]
        assert abs(answer["attribution_sum"] - gap - answer["convergence_delta"]) < 1e-4
        assert abs(answer["convergence_delta"]) <= DELTA_TOLERANCE[0] * abs(gap) + DELTA_TOLERANCE[1], answer
        for index, name in enumerate(SHAPE_CLASSES):
            r = explain(server, "seg", data, target=name)
            if predicted[index]:
                assert r.status_code == 200 and r.json()["target"] == name, r.text
            else:  # no predicted region to explain
                assert r.status_code == 422 and f"'{name}'" in r.json()["message"], r.text
    r = explain(server, "seg", payloads[0], target="hexagon")
    assert r.status_code == 400 and "'hexagon'" in r.json()["message"]


def test_visualize_draws_the_served_heatmap_over_the_image(server, held_out, tmp_path):
    from scripts.cli import visualize

    data, label, mask = held_out[0]
    image = tmp_path / "shape.png"
    image.write_bytes(data)
    out = tmp_path / "explained.png"
    argv = [str(image), "--model", "shapes", "--run-dir", str(server.run_dir), "--out", str(out), "--explain"]
    assert visualize.main([*argv, "--target", label]) == 0
    drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert drawn.shape == (320 + 18, 320, 3)  # enlarged from 40 px, under a caption line
    picture = drawn[18:]
    red = (picture[..., 0] - picture[..., 2]) > 60  # where attribution is positive
    big_mask = np.asarray(Image.fromarray(mask).resize((320, 320), Image.Resampling.NEAREST))
    assert red.any() and red[big_mask].mean() > red[~big_mask].mean()
    assert visualize.main([*argv, "--target", "hexagon"]) == 2  # the server's 400, in one line
