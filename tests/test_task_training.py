"""Segmentation, GAN and SimCLR training: one real short run per entry point on real data
(shapes painted on scikit-image photographs, scikit-learn's handwritten digits), the
metrics each task reports, and the pure pieces (NT-Xent, k-NN, mIoU, masks) on known cases.
"""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from model_defs import DataConfig, get_model
from model_defs.checkpoint import load_trained
from model_defs.embedding import nt_xent_loss
from model_defs.generative import latent_vectors
from model_defs.preprocessing import logits_to_mask, mask_to_image, tensor_to_images
from training import scores, train_gan, train_segmentation, train_simclr
from training.shapes import generate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def shapes_masks(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("shapes") / "masks", "masks", n=20, size=64, seed=1, progress=False)


# -- segmentation ------------------------------------------------------------------------


def test_segmentation_training_reports_miou_and_pixel_accuracy(shapes_masks, tmp_path):
    out = tmp_path / "unet"
    argv = [
        "--data",
        str(shapes_masks),
        "--out",
        str(out),
        "--model",
        "unet",
        "--model-arg",
        "depth=2",
        "--model-arg",
        "width=8",
        "--input-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "--vis-count",
        "2",
    ]
    assert train_segmentation.cli(argv) == 0
    model, meta = load_trained(out)
    assert meta["task"] == "segmentation" and meta["arch"] == "unet"
    assert meta["classes"] == ["background", "rectangle", "ellipse", "triangle"]
    assert meta["arch_args"] == {"num_classes": 4, "in_channels": 3, "depth": 2, "width": 8}
    assert meta["preprocessing"]["input_size"] == meta["preprocessing"]["resize_size"] == 32
    assert meta["metrics"]["name"] == "miou" and 0 < meta["metrics"]["best_val"] <= 1
    assert 0 < meta["metrics"]["pixel_accuracy"] <= 1
    assert len(meta["dataset"]["fingerprint"]) == 64 and meta["dataset"]["val_images"] == 4
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert max(float(r["val_miou"]) for r in rows) == pytest.approx(meta["metrics"]["best_val"])
    assert all(0 <= float(r["val_pixel_accuracy"]) <= 1 for r in rows)
    with Image.open(out / "predictions.png") as img:
        assert img.size[0] > 0
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4, 32, 32)


def test_segmentation_bad_annotations_are_named(shapes_masks, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(shapes_masks, bad)
    mask = bad / "masks" / "00003.png"
    Image.open(mask).resize((10, 12)).save(mask)
    assert train_segmentation.cli(["--data", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "00003.png" in err and "10x12" in err
    mask.unlink()
    assert train_segmentation.cli(["--data", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no mask" in err and "00003.png" in err
    assert not (tmp_path / "o").exists()


def test_miou_and_pixel_accuracy_on_a_known_confusion_matrix():
    # rows = truth, columns = prediction
    s = scores.segmentation_scores(np.array([[3, 1, 0], [0, 4, 0], [0, 0, 0]]))
    assert s["iou"][0] == pytest.approx(3 / 4) and s["iou"][1] == pytest.approx(4 / 5)
    assert s["iou"][2] is None  # absent from truth and prediction: not averaged
    assert s["miou"] == pytest.approx((3 / 4 + 4 / 5) / 2)
    assert s["pixel_accuracy"] == pytest.approx(7 / 8)


def test_logits_are_scaled_to_the_original_size_before_the_argmax():
    logits = torch.zeros(3, 4, 4)
    logits[1, :, :2] = 1.0  # left half class 1
    logits[2, :, 2:] = 1.0  # right half class 2
    mask = logits_to_mask(logits, (30, 50))
    assert mask.shape == (30, 50) and mask.dtype == np.uint8
    assert (mask[:, :24] == 1).all() and (mask[:, 26:] == 2).all()
    png = mask_to_image(mask, 3)
    assert png.mode == "P" and np.array_equal(np.asarray(png), mask)


# -- GAN ---------------------------------------------------------------------------------


def test_gan_training_writes_the_generator_and_a_sample_grid_per_epoch(digits_dir, trained_digits, tmp_path):
    out = tmp_path / "gan"
    argv = [
        "--data",
        str(digits_dir / "test"),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--width",
        "8",
        "--latent-dim",
        "16",
        "--batch-size",
        "32",
        "--grid-size",
        "16",
        "--workers",
        "0",
        "--threads",
        "1",
        "--score-classifier",
        str(trained_digits),
        "--score-samples",
        "200",
        "--no-progress",
    ]
    before = get_model("dcgan", latent_dim=16, channels=1, image_size=32, width=8).state_dict()
    assert train_gan.cli(argv) == 0
    model, meta = load_trained(out)
    assert meta["task"] == "generation" and meta["classes"] == []
    assert meta["arch_args"] == {"latent_dim": 16, "channels": 1, "image_size": 32, "width": 8}
    assert meta["dataset"]["train_images"] == len(list((digits_dir / "test").rglob("*.png")))
    assert meta["metrics"]["epochs_run"] == 2 and meta["versions"]["torch"] == torch.__version__
    for epoch in (1, 2):
        with Image.open(out / "samples" / f"epoch_{epoch:03d}.png") as grid:
            assert grid.size == (4 * 34 + 2, 4 * 34 + 2)  # 4 x 4 images of 32 px, 2 px padding
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 2 and all(
        math.isfinite(float(r["train_d_loss"])) and math.isfinite(float(r["train_g_loss"])) for r in rows
    )
    # Inception Score with the digit classifier: 1 (one class, or no confidence) up to 10;
    # the real digits, which that classifier gets right, score far above the 2-epoch samples.
    assert all(1 <= float(r["val_inception_score"]) <= 10 and 1 <= int(r["val_classes_covered"]) <= 10 for r in rows)
    assert meta["metrics"]["name"] == "inception_score" and meta["metrics"]["real_inception_score"] > 5
    assert meta["metrics"]["inception_score"] == pytest.approx(float(rows[-1]["val_inception_score"]))
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    with torch.no_grad():
        images = tensor_to_images(model(latent_vectors(3, 2, 16)), DataConfig.from_dict(meta["preprocessing"]))
    assert [im.size for im in images] == [(32, 32)] * 2


def test_gan_resumes_both_networks_and_their_optimizers(digits_dir, tmp_path, capsys):
    out = tmp_path / "gan"
    argv = [
        "--data",
        str(digits_dir / "test"),
        "--out",
        str(out),
        "--width",
        "8",
        "--latent-dim",
        "16",
        "--batch-size",
        "64",
        "--grid-size",
        "4",
        "--workers",
        "0",
        "--threads",
        "1",
        "--no-progress",
    ]
    assert train_gan.cli(argv + ["--epochs", "1"]) == 0
    first = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(first["optimizer"]) == {"model", "disc"} and first["modules"]["disc"]
    capsys.readouterr()
    assert train_gan.cli(argv + ["--epochs", "2", "--resume", str(out)]) == 0
    err = capsys.readouterr().err
    assert "after epoch 1" in err and "epoch 2/2" in err and "epoch 1/2" not in err
    second = torch.load(out / "checkpoint.pt", weights_only=True)
    assert second["state"]["epoch"] == 2 and len(read_csv(out / "metrics.csv")) == 2
    assert any(
        not torch.equal(first["modules"]["disc"][k], second["modules"]["disc"][k])
        for k in first["modules"]["disc"]
        if first["modules"]["disc"][k].is_floating_point()
    )


def test_latent_vectors_depend_only_on_the_seed():
    assert torch.equal(latent_vectors(5, 4, 8), latent_vectors(5, 4, 8))
    assert not torch.equal(latent_vectors(5, 4, 8), latent_vectors(6, 4, 8))
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(latent_vectors(5, 4, 8)[:2], latent_vectors(5, 2, 8))


# -- SimCLR ------------------------------------------------------------------------------


def test_simclr_training_reports_knn_accuracy(digits_dir, tmp_path):
    out = tmp_path / "simclr"
    argv = [
        "--data",
        str(digits_dir / "test"),
        "--eval-data",
        str(digits_dir / "test"),
        "--eval-val-fraction",
        "0.3",
        "--channels",
        "1",
        "--hflip-prob",
        "0",
        "--model-arg",
        "widths=[8, 16, 32]",
        "--model-arg",
        "proj_hidden=32",
        "--model-arg",
        "proj_dim=16",
        "--epochs",
        "2",
        "--batch-size",
        "128",
        "--workers",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert train_simclr.cli(argv) == 0
    model, meta = load_trained(out)
    assert meta["task"] == "embedding" and meta["embedding_dim"] == 32
    m = meta["metrics"]
    assert m["name"] == "knn_accuracy" and m["epochs_run"] == 2
    # Ten classes: chance is 0.1; even an untrained conv encoder separates digits far better.
    assert 0.3 < m["best_val"] <= 1 and 0.3 < m["untrained_knn_accuracy"] <= 1
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 2 and max(float(r["val_knn_accuracy"]) for r in rows) == pytest.approx(m["best_val"])
    assert float(rows[0]["train_loss"]) < math.log(2 * 128 - 1) + 0.5
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 32)


def test_nt_xent_loss_matches_its_definition():
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / 0.5
    expected = 0.0
    for i in range(8):
        j = (i + 4) % 8
        others = torch.cat([sim[i, :i], sim[i, i + 1 :]])
        expected += -(sim[i, j] - torch.logsumexp(others, 0))
    assert nt_xent_loss(z1, z2, 0.5).item() == pytest.approx(expected.item() / 8, rel=1e-5)
    # Two views that agree exactly score better than unrelated views.
    assert nt_xent_loss(z1, z1, 0.5) < nt_xent_loss(z1, z2, 0.5)


def test_knn_accuracy_on_separable_points():
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.2, 1.0]]), dim=1)
    assert scores.knn_accuracy(bank, labels, query, torch.tensor([0, 1, 1]), k=2, num_classes=2) == 1.0
    assert scores.knn_accuracy(bank, labels, query, torch.tensor([1, 1, 1]), k=2, num_classes=2) == pytest.approx(2 / 3)


# -- every entry point ---------------------------------------------------------------------


@pytest.mark.parametrize("module", [train_gan, train_simclr, train_segmentation])
def test_help_shows_every_default(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.get_args_parser().parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for action in module.get_args_parser()._actions:
        if action.option_strings and action.dest not in ("help", "data"):
            assert f"--{action.dest.replace('_', '-')}" in text
    assert text.count("(default:") >= len([a for a in module.get_args_parser()._actions if a.option_strings]) - 2


@pytest.mark.parametrize("module", [train_gan, train_simclr])
def test_missing_data_folder_is_a_one_line_error(module, tmp_path, capsys):
    assert module.cli(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nowhere" in err and len(err.splitlines()) == 1
