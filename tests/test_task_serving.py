"""Segmentation, generation and embeddings through a real TorchServe: one server serving
all three .mar files, REST answers compared with the same model run in-process on the same
real files (shapes painted on scikit-image photographs, and the photographs themselves).

The models are small and untrained (seeded): what is under test here is the serving path,
not the quality; tests/test_task_training.py trains each task for real.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F
from PIL import Image

from model_defs import DataConfig, get_model
from model_defs.checkpoint import load_trained, save_model_files
from model_defs.generative import latent_vectors
from model_defs.preprocessing import (
    eval_transform,
    load_image,
    logits_to_mask,
    segmentation_transform,
    tensor_to_images,
)
from scripts.cli import archive
from tests.conftest import encode, serving
from training.shapes import generate

pytestmark = [pytest.mark.serve, pytest.mark.timeout(600)]

SHAPE_CLASSES = ["background", "rectangle", "ellipse", "triangle"]
MAX_N = 16


def _save(out, model, arch, arch_args, task, classes, cfg, **extra):
    save_model_files(
        out,
        model,
        {
            "arch": arch,
            "arch_args": arch_args,
            "task": task,
            "classes": classes,
            "preprocessing": cfg.to_dict(),
            **extra,
        },
    )
    return out


def _perturb_batchnorm(model: torch.nn.Module) -> None:
    """Non-trivial running statistics, so eval-mode BatchNorm is really exercised."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("task_runs")
    seg_cfg = DataConfig(input_size=64, resize_size=64, channels=3)
    seg = get_model("unet", num_classes=4, in_channels=3, depth=2, width=8)
    _perturb_batchnorm(seg)
    with torch.no_grad():  # an untrained head predicts background everywhere: make the masks vary
        seg.head.weight.mul_(20)
    gan_cfg = DataConfig(input_size=32, resize_size=32, channels=1, mean=(0.5,), std=(0.5,))
    gan_args = {"latent_dim": 16, "channels": 1, "image_size": 32, "width": 8}
    gan = get_model("dcgan", **gan_args)
    _perturb_batchnorm(gan)
    emb_cfg = DataConfig(input_size=32, resize_size=36, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    emb_args = {"in_channels": 3, "widths": [8, 16, 32], "proj_hidden": 32, "proj_dim": 16}
    emb = get_model("simclr", **emb_args)
    return {
        "shapes_seg": _save(
            root / "seg",
            seg,
            "unet",
            {"num_classes": 4, "in_channels": 3, "depth": 2, "width": 8},
            "segmentation",
            SHAPE_CLASSES,
            seg_cfg,
        ),
        "digit_gan": _save(root / "gan", gan, "dcgan", gan_args, "generation", [], gan_cfg),
        "embedder": _save(root / "emb", emb, "simclr", emb_args, "embedding", [], emb_cfg),
    }


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Real files: shapes on photographs (non-square, several sizes) from the shapes writer."""
    out = generate(
        tmp_path_factory.mktemp("shapes") / "masks", "masks", n=4, size=96, seed=5, aspect=1.6, progress=False
    )
    return sorted((out / "images").glob("*.png"))


@pytest.fixture(scope="module")
def server(runs, shared_server):
    store = shared_server.model_store
    for name, run in runs.items():
        extra = ["--handler-option", f"max_n={MAX_N}"] if name == "digit_gan" else []
        assert (
            archive.main(
                [
                    str(run),
                    "--name",
                    name,
                    "--model-store",
                    str(store),
                    "--batch-size",
                    "4",
                    "--max-batch-delay",
                    "200",
                    *extra,
                ]
            )
            == 0
        )
    with serving(shared_server, *runs, timeout=300) as ts:
        yield ts


def post(ts, model, data=None, **kw):
    kw.setdefault("headers", ts.headers("inference"))
    return requests.post(f"{ts.url('inference')}/predictions/{model}", data=data, timeout=60, **kw)


def decode_png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def mask_in_process(run_dir, data: bytes) -> np.ndarray:
    model, meta = load_trained(run_dir)
    cfg = DataConfig.from_dict(meta["preprocessing"])
    image = load_image(data, cfg.channels)
    with torch.inference_mode():
        logits = model(segmentation_transform(cfg)(image)[None])[0]
    return logits_to_mask(logits, (image.height, image.width))


def embedding_in_process(run_dir, data: bytes) -> torch.Tensor:
    model, meta = load_trained(run_dir)
    cfg = DataConfig.from_dict(meta["preprocessing"])
    with torch.inference_mode():
        return F.normalize(model(eval_transform(cfg)(load_image(data, cfg.channels))[None]), dim=1)[0]


def photo_files(photos) -> list[bytes]:
    return [encode(photos["chelsea"], "JPEG", quality=90), encode(photos["camera"], "PNG")]


def test_all_three_models_are_served(server, runs):
    assert sorted(server.models()) == sorted(runs)


def test_segmentation_masks_equal_in_process_masks(server, runs, shapes, photos):
    payloads = [f.read_bytes() for f in shapes] + photo_files(photos)
    seen = set()
    for data in payloads:  # one at a time: each request is a batch of one, as in-process
        r = post(server, "shapes_seg", data)
        assert r.status_code == 200, r.text
        answer = r.json()
        expected = mask_in_process(runs["shapes_seg"], data)
        mask_png = decode_png(answer["mask"])
        assert mask_png.mode == "P"
        served = np.asarray(mask_png)
        assert served.shape == expected.shape == (answer["height"], answer["width"])
        original = Image.open(io.BytesIO(data))
        assert (answer["width"], answer["height"]) == original.size  # the original size, not the model's
        np.testing.assert_array_equal(served, expected)
        seen |= set(np.unique(served).tolist())
        assert answer["classes"] == SHAPE_CLASSES
        counts = np.bincount(expected.ravel(), minlength=4) / expected.size
        assert [answer["fractions"][c] for c in SHAPE_CLASSES] == pytest.approx(counts.tolist(), abs=1e-6)
        assert len(r.content) < 20_000  # a PNG, not H x W x [class, prob] JSON
    assert len(seen) >= 2  # the masks hold several classes, so equality means something


def test_generator_images_equal_in_process_images_for_a_seed(server, runs):
    model, meta = load_trained(runs["digit_gan"])
    cfg = DataConfig.from_dict(meta["preprocessing"])
    for seed, n in ((0, 1), (7, 5), (2**40, MAX_N)):
        r = post(server, "digit_gan", json={"seed": seed, "n": n})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["seed"] == seed and answer["n"] == n and len(answer["images"]) == n
        with torch.inference_mode():
            expected = tensor_to_images(model(latent_vectors(seed, n, 16)), cfg)
        for b64, want in zip(answer["images"], expected):
            got = decode_png(b64)
            assert got.size == (32, 32) and got.mode == "L"
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    again = post(server, "digit_gan", json={"seed": 7, "n": 5}).json()
    assert again["images"] == post(server, "digit_gan", json={"seed": 7, "n": 5}).json()["images"]
    assert again["images"] != post(server, "digit_gan", json={"seed": 8, "n": 5}).json()["images"]


def test_generator_accepts_latent_vectors(server, runs):
    model, meta = load_trained(runs["digit_gan"])
    z = latent_vectors(11, 3, 16)
    r = post(server, "digit_gan", json={"latent": z.tolist()})
    assert r.status_code == 200, r.text
    with torch.inference_mode():
        expected = tensor_to_images(model(z), DataConfig.from_dict(meta["preprocessing"]))
    got = [np.asarray(decode_png(b)) for b in r.json()["images"]]
    # JSON carries the floats' shortest repr, which round-trips float32 exactly.
    assert all(np.array_equal(g, np.asarray(e)) for g, e in zip(got, expected))


def test_generator_bad_requests_get_400_while_batch_mates_succeed(server):
    bad = [
        {"seed": 1, "n": MAX_N + 1},
        {"seed": "one"},
        {"n": 2},
        {"seed": 1, "n": 0},
        {"seed": -1},
        {"latent": [[0.0] * 3]},
        {"seed": True},
    ]
    good = [{"seed": s, "n": 2} for s in range(4)]
    with ThreadPoolExecutor(len(bad) + len(good) + 1) as pool:
        answers = list(pool.map(lambda body: post(server, "digit_gan", json=body), good + bad))
        not_json = pool.submit(post, server, "digit_gan", b"seed=1").result()
    for r in answers[: len(good)]:
        assert r.status_code == 200, r.text
        assert len(r.json()["images"]) == 2
    for body, r in zip(bad, answers[len(good) :]):
        assert r.status_code == 400, (body, r.text)
        assert r.json()["code"] == 400 and r.json()["message"]
    assert "at most 16" in answers[len(good)].json()["message"]
    assert not_json.status_code == 400 and not_json.json()["type"] == "InvalidJSON"


def test_embeddings_equal_in_process_embeddings(server, runs, shapes, photos):
    payloads = [f.read_bytes() for f in shapes] + photo_files(photos)
    with ThreadPoolExecutor(len(payloads)) as pool:  # concurrent: served in batches
        answers = list(pool.map(lambda d: post(server, "embedder", d), payloads))
    for data, r in zip(payloads, answers):
        assert r.status_code == 200, r.text
        served = torch.tensor(r.json()["embedding"])
        assert served.shape == (32,)
        assert abs(served.norm().item() - 1) < 1e-5
        assert torch.allclose(served, embedding_in_process(runs["embedder"], data), atol=1e-4)


def test_bad_images_get_400_while_batch_mates_succeed(server, runs, shapes):
    good = [f.read_bytes() for f in shapes]
    bad = [b"not an image", good[0][:50], b""]
    for model in ("shapes_seg", "embedder"):
        with ThreadPoolExecutor(len(good) + len(bad)) as pool:
            answers = list(pool.map(partial(post, server, model), good + bad))
        for data, r in zip(good, answers[: len(good)]):
            assert r.status_code == 200, (model, r.text)
            if model == "shapes_seg":
                expected = mask_in_process(runs["shapes_seg"], data)
                served = np.asarray(decode_png(r.json()["mask"]))
                # Batched with others: float sums may differ in the last bit, flipping a tie.
                assert served.shape == expected.shape and (served == expected).mean() > 0.999
        for r in answers[len(good) :]:
            assert r.status_code == 400, (model, r.text)
            assert set(r.json()) == {"code", "type", "message"}


def test_visualize_draws_the_served_mask(server, runs, shapes, tmp_path):
    from scripts.cli import visualize

    # An image where the (untrained) model paints something besides background.
    image = next(p for p in shapes if (mask_in_process(runs["shapes_seg"], p.read_bytes()) > 0).any())
    out = tmp_path / "mask.png"
    assert (
        visualize.main([str(image), "--model", "shapes_seg", "--run-dir", str(server.run_dir), "--out", str(out)]) == 0
    )
    drawn = np.asarray(Image.open(out).convert("RGB")).astype(int)
    original = np.asarray(Image.open(image).convert("RGB").resize(drawn.shape[1::-1])).astype(int)
    assert np.abs(drawn - original).sum(-1).mean() > 1  # the mask is drawn over the photo
