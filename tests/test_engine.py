"""The shared training engine: every trainer's mistakes refused up front (one line, exit 2,
nothing written), the diagnostics naming the right layers, BatchNorm recalibration, the
decode cache, skipped files named, class names with spaces. Real digit PNGs and shapes."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import xml.etree.ElementTree as ET
from collections import Counter

import pytest
import torch
import torch.nn as nn
from PIL import Image

from model_defs import get_entry, get_model, preprocessing
from model_defs.checkpoint import data_config_from_meta, load_trained
from model_defs.preprocessing import (
    detection_eval_transform,
    detection_train_transform,
    eval_transform,
    load_image,
    segmentation_train_transform,
    segmentation_transform,
)
from model_defs.usage import OneLineParser
from tests.conftest import train_cli_args
from training import args as args_mod
from training import engine, train, train_detection, train_gan, train_segmentation, train_simclr
from training.cache import DecodeCache
from training.datasets import ImageDataset, read_dataset
from training.det_datasets import DetectionDataset, SegmentationDataset, read_detection, read_masks
from training.diagnostics import activation_stats, grad_flags, layer_grad_norms
from training.shapes import generate

pytestmark = pytest.mark.unit


def subset(digits_dir, dest, counts: dict[str, int]):
    for label, n in counts.items():
        (dest / label).mkdir(parents=True, exist_ok=True)
        for src in sorted((digits_dir / "train" / label).glob("*.png"))[:n]:
            shutil.copy(src, dest / label / src.name)
    return dest


@pytest.fixture(scope="session")  # cheap data: each xdist worker makes its own
def small(digits_dir, tmp_path_factory):
    return subset(digits_dir, tmp_path_factory.mktemp("small"), {"0": 6, "1": 6, "2": 6})


@pytest.fixture(scope="session")  # cheap data: each xdist worker makes its own
def masks(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("masks") / "m", "masks", n=6, size=48, seed=2, progress=False)


@pytest.fixture(scope="session")  # cheap data: each xdist worker makes its own
def voc(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("voc") / "v", "voc", 6, 96, seed=3, progress=False)


@pytest.fixture(scope="session")  # cheap data: each xdist worker makes its own
def labels_txt_data(small, tmp_path_factory):
    """The same images as `small`, in the images/ + labels.txt layout."""
    root = tmp_path_factory.mktemp("ltxt")
    (root / "images").mkdir()
    lines = []
    for p in sorted(small.glob("*/*.png")):
        shutil.copy(p, root / "images" / f"{p.parent.name}_{p.name}")
        lines.append(f"{p.parent.name}_{p.name}\tdigit {p.parent.name}")
    (root / "labels.txt").write_text("\n".join(lines) + "\n")
    return root


def run_cli(module, argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = module.cli(argv)
    return code, capsys.readouterr().err


# -- mistakes: one line, exit 2, nothing written -------------------------------------------

CLS = ["--model", "small_cnn", "--channels", "1", "--hflip-prob", "0", "--workers", "0", "--no-progress"]

EVERY_TASK = {  # each trainer at its smallest, with the data of this module
    "classification": (train, "small", [*CLS, "--batch-size", "8"]),
    "detection": (
        train_detection,
        "voc",
        ["--model", "fcos_resnet", "--input-size", "64", "--batch-size", "2", "--pictures", "0"],
    ),
    "segmentation": (
        train_segmentation,
        "masks",
        [
            "--model-arg",
            "depth=2",
            "--model-arg",
            "width=8",
            "--input-size",
            "32",
            "--batch-size",
            "2",
            "--pictures",
            "0",
        ],
    ),
    "generation": (train_gan, "small", ["--width", "8", "--latent-dim", "8", "--batch-size", "4", "--grid-size", "4"]),
    "embedding": (
        train_simclr,
        "small",
        ["--eval-data", "{small}", "--channels", "1", "--hflip-prob", "0", "--batch-size", "4"]
        + ["--model-arg", "widths=[4, 8, 8]", "--model-arg", "proj_hidden=8", "--model-arg", "proj_dim=8"],
    ),
}


# (trainer, extra flags, words the one line must hold); "{data}" etc. are filled in per test
MISTAKES = [
    ("train", ["--epochs", "0"], "--epochs must be >= 1"),
    ("train", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("train", ["--input-size", "0"], "--input-size must be >= 8"),
    ("train", ["--model-arg", "bogus=1"], "takes no argument 'bogus'"),
    ("train", ["--model-arg", "hidden"], "KEY=VALUE"),
    ("train", ["--model-arg", "hidden=[1, 2]"], "cannot be built"),
    ("train", ["--model", "resnet18", "--channels", "3", "--weights-path", "/nope.pt"], "/nope.pt does not exist"),
    ("train", ["--weights-path", "/nope.pt"], "does not support --weights-path"),
    ("train", ["--device", "tpu"], "not one of auto, cpu, cuda"),
    ("train", ["--device", "cuda:99"], "cuda:99"),
    ("train", ["--device", "cuda:x"], "not one of auto, cpu, cuda"),
    ("train", ["--sync-bn"], "--sync-bn needs"),
    ("train", ["--model", "no_such_net"], "no_such_net"),
    ("train", ["--model", "unet"], "unet"),
    ("train", ["--val-fraction", "0"], "--val-fraction must be > 0"),
    ("train", ["--val-fraction", "1.5"], "--val-fraction must be > 0 and < 1"),
    ("train", ["--lr", "-1"], "--lr must be >= 0"),
    ("train", ["--label-smoothing", "1"], "--label-smoothing must be >= 0 and < 1"),
    ("train", ["--threshold", "0"], "--threshold must be > 0"),
    ("train", ["--hflip-prob", "2"], "--hflip-prob must be >= 0 and <= 1"),
    ("train", ["--min-scale", "0"], "--min-scale must be > 0"),
    ("train", ["--workers", "-1"], "--workers must be >= 0"),
    ("train", ["--patience", "-1"], "--patience must be >= 0"),
    ("train", ["--max-minutes", "-5"], "--max-minutes must be >= 0"),
    ("train", ["--clip-grad-norm", "-1"], "--clip-grad-norm must be >= 0"),
    ("train", ["--min-lr-ratio", "2"], "--min-lr-ratio must be >= 0 and <= 1"),
    ("train", ["--profile", "-1"], "--profile must be >= 0"),
    ("train", ["--profile-wait", "-1"], "--profile-wait must be >= 0"),
    ("train", ["--profile-warmup", "-2"], "--profile-warmup must be >= 0"),
    ("train", ["--bn-recalibration-batches", "-1"], "--bn-recalibration-batches must be >= 0"),
    ("train", ["--lr", "nan"], "--lr must be >= 0"),
    ("train", ["--val-data", "{tmp}/nowhere"], "nowhere does not exist"),
    ("train", ["--layout", "folders", "--data", "{labels_txt}"], "needs at least 2"),
    ("train", ["--data", "{one_class}"], "needs at least 2"),
    ("train", ["--out", "{a_file}"], "is a file"),
    ("train", ["--out", "{existing}"], "--resume"),
    ("train", ["--resume", "{tmp}/no_checkpoint.pt"], "does not exist"),
    ("train", ["--resume", "{truncated}"], "not a readable checkpoint"),
    ("train", ["--resume", "{not_a_checkpoint}"], "not a checkpoint.pt"),
    ("detection", ["--val-fraction", "1"], "--val-fraction must be > 0 and < 1"),
    ("detection", ["--input-size", "4"], "--input-size must be >= 8"),
    ("detection", ["--model", "small_cnn"], "small_cnn"),
    ("detection", ["--model-arg", "nope=2"], "takes no argument 'nope'"),
    ("segmentation", ["--model-arg", "depth=[1]"], "cannot be built"),
    ("segmentation", ["--epochs", "-3"], "--epochs must be >= 1"),
    ("gan", ["--input-size", "12"], "power of two"),
    ("gan", ["--score-classifier", "{tmp}/nowhere"], "nowhere"),
    ("gan", ["--beta1", "1"], "--beta1 must be >= 0 and < 1"),
    ("simclr", ["--knn-k", "0"], "--knn-k must be >= 1"),
    ("simclr", ["--temperature", "0"], "--temperature must be > 0"),
    ("simclr", ["--eval-data", "{tmp}/nowhere"], "nowhere"),
    ("simclr", ["--optimizer", "adam"], "invalid choice: 'adam'"),
    ("segmentation", ["--data", "{one_class_masks}"], "at least 1 other class"),
    ("detection", ["--data", "{no_object_voc}"], "names no object class"),
    ("simclr", ["--eval-data", "{one_class}"], "at least 2 classes"),
    ("gan", ["--model-arg", "width=8"], "sets width itself"),
]

# Each mistake section 5 of the issue tried, on each of the five trainers.
TRAINERS = ("train", "detection", "segmentation", "gan", "simclr")
EVERY_TRAINER = [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--input-size", "0"], "--input-size must be >= 8"),
    (["--model-arg", "bogus=1"], "takes no argument 'bogus'"),
    (["--weights-path", "/nope.pt"], "{weights_words}"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--out", "{a_file}"], "is a file"),
    (["--out", "{existing}"], "--resume"),
    (["--resume", "{truncated}"], "not a readable checkpoint"),
    (["--cache", "ram"], "invalid choice: 'ram'"),
]
MISTAKES += [(trainer, extra, words) for extra, words in EVERY_TRAINER for trainer in TRAINERS]


@pytest.mark.parametrize("trainer,extra,words", MISTAKES, ids=[f"{m[0]}:{' '.join(m[1])}" for m in MISTAKES])
def test_a_mistake_is_one_line_exit_2_and_writes_nothing(
    trainer, extra, words, small, masks, voc, labels_txt_data, digits_dir, tmp_path, capsys
):
    if "cuda:99" in extra and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    if extra == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "model.pt").write_bytes(b"keep")
    (tmp_path / "truncated").mkdir()
    torch.save(
        {"model": {"w": torch.zeros(1000)}, "state": {}, "optimizer": {}}, tmp_path / "truncated" / "checkpoint.pt"
    )
    data = (tmp_path / "truncated" / "checkpoint.pt").read_bytes()
    (tmp_path / "truncated" / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weights": torch.zeros(1)}, tmp_path / "not_a_checkpoint.pt")
    one_class = subset(digits_dir, tmp_path / "one_class", {"4": 5})
    one_class_masks = tmp_path / "one_class_masks"
    shutil.copytree(masks, one_class_masks)
    (one_class_masks / "classes.txt").write_text("background\n")
    for mask in (one_class_masks / "masks").glob("*.png"):
        Image.new("L", Image.open(mask).size).save(mask)
    no_object_voc = tmp_path / "no_object_voc"
    shutil.copytree(voc, no_object_voc)
    (no_object_voc / "classes.txt").unlink()
    for xml in (no_object_voc / "Annotations").glob("*.xml"):
        tree = ET.parse(xml)
        for obj in tree.getroot().findall("object"):
            tree.getroot().remove(obj)
        tree.write(xml)
    fill = {
        "weights_words": "does not support --weights-path" if trainer == "train" else "unrecognized arguments",
        "one_class_masks": str(one_class_masks),
        "no_object_voc": str(no_object_voc),
        "tmp": str(tmp_path),
        "labels_txt": str(labels_txt_data),
        "one_class": str(one_class),
        "a_file": str(tmp_path / "a_file"),
        "existing": str(tmp_path / "existing"),
        "truncated": str(tmp_path / "truncated"),
        "not_a_checkpoint": str(tmp_path / "not_a_checkpoint.pt"),
    }
    extra, words = [e.format(**fill) for e in extra], words.format(**fill)
    out = tmp_path / "out"
    module, base = {
        "train": (train, ["--data", str(small), "--out", str(out), *CLS]),
        "detection": (train_detection, ["--data", str(voc), "--out", str(out), "--input-size", "96", "--workers", "0"]),
        "segmentation": (train_segmentation, ["--data", str(masks), "--out", str(out), "--workers", "0"]),
        "gan": (train_gan, ["--data", str(small), "--out", str(out), "--workers", "0"]),
        "simclr": (train_simclr, ["--data", str(small), "--out", str(out), "--workers", "0"]),
    }[trainer]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, err = run_cli(module, base + extra, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert words in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    assert (tmp_path / "existing" / "model.pt").read_bytes() == b"keep"


def test_the_mistakes_table_covers_at_least_25_and_each_trainer_gets_every_mistake():
    assert len(MISTAKES) >= 25
    for extra, _ in EVERY_TRAINER:
        assert {t for t, e, _ in MISTAKES if e == extra} == set(TRAINERS)


def test_shared_flags_have_one_name_default_and_help():
    """A flag two trainers share has one help text and one default, except the defaults a
    task sets for its models (shown by --help) and the flags whose meaning is the task's."""

    task_defaults = args_mod.TASK_DEFAULTS | {"model", "hflip_prob", "min_scale"}
    task_meaning = {"data", "layout", "input_size", "pictures", "model"}
    seen = {}
    for module in (train, train_detection, train_segmentation, train_gan, train_simclr):
        parser = module.get_args_parser()
        assert isinstance(parser, OneLineParser)
        for a in parser._actions:
            help_text = (a.help or "").split("(default:")[0]
            assert a.dest in ("help", "data") or "(default:" in a.help, (module.__name__, a.dest)
            first = seen.setdefault(a.dest, (module.__name__, a.option_strings[:1], help_text, a.default))
            assert a.option_strings[:1] == first[1], (a.dest, module.__name__, first[0])  # one name (old aliases kept)
            if a.dest not in task_meaning:
                assert help_text == first[2], (a.dest, module.__name__, first[0])
            if a.dest not in task_defaults | task_meaning:
                assert a.default == first[3], (a.dest, module.__name__, first[0])
    engine_flags = {a.dest for a in args_mod.add_engine_args(argparse.ArgumentParser())._actions}
    for module in (train, train_detection, train_segmentation, train_gan, train_simclr):
        assert engine_flags <= {a.dest for a in module.get_args_parser()._actions}, module.__name__


def test_cuda_on_a_machine_without_one_is_one_line(small, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, err = run_cli(train, ["--data", str(small), "--out", str(tmp_path / "o"), *CLS, "--device", "cuda"], capsys)
    assert code == 2 and err.startswith("error: --device cuda: no CUDA GPU") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_trains_and_resumes_on_the_cpu(amp, small, tmp_path, capsys):
    """The AMP path the GPU runs (autocast, and for fp16 the GradScaler), exercised on the CPU."""
    out = tmp_path / "o"
    code, err = run_cli(train, train_cli_args(small, out, "--epochs", "1", "--batch-size", "8", "--amp", amp), capsys)
    assert code == 0, err
    assert f"AMP {amp}" in err and json.loads((out / "model.json").read_text())["training"]["amp"] == amp
    scaler = torch.load(out / "checkpoint.pt", weights_only=True)["scaler"]["model"]
    assert (scaler.get("scale", 0) > 0) == (amp == "fp16")  # a GradScaler for fp16 only
    code, err = run_cli(
        train,
        train_cli_args(small, out, "--epochs", "2", "--batch-size", "8", "--amp", amp, "--resume", str(out)),
        capsys,
    )
    assert code == 0 and "epoch 2/2" in err, err


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_detector_trains_under_amp_on_the_cpu(amp, voc, tmp_path, capsys):
    """The path the GPU takes with a detector, whose loss is a dict of losses summed: the
    forward under autocast, for fp16 the GradScaler with clipping, and the mAP of float32
    boxes on the CPU (FCOS, as scripts/bench_train trains it, on the light backbone)."""
    out = tmp_path / "o"
    argv = ["--data", str(voc), "--out", str(out), "--model", "fcos_resnet", "--input-size", "64"]
    argv += ["--batch-size", "2", "--epochs", "1", "--pictures", "1", "--workers", "0", "--threads", "1"]
    code, err = run_cli(train_detection, [*argv, "--no-progress", "--amp", amp], capsys)
    assert code == 0, err
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["amp"] == amp and 0 <= meta["metrics"]["map_50"] <= 1
    assert (out / "detections.png").is_file()
    scaler = torch.load(out / "checkpoint.pt", weights_only=True)["scaler"]["model"]
    assert (scaler.get("scale", 0) > 0) == (amp == "fp16")


def test_a_detection_batch_moves_whole_to_the_device(voc):
    """Every tensor of a detection batch goes to the training device: the images and each
    target's boxes and labels (dicts inside a list); the dataset indices stay ints."""
    ds = DetectionDataset(read_detection(voc).samples, detection_eval_transform(64), 64)
    images, targets, indices = engine.to_device(train_detection.Detection.collate([ds[0], ds[1]]), torch.device("meta"))
    assert [x.device.type for x in images] == ["meta", "meta"]
    assert {t[k].device.type for t in targets for k in ("boxes", "labels")} == {"meta"}
    assert indices == [0, 1]


def test_a_detector_without_pycocotools_is_told_before_training(voc, tmp_path, capsys, monkeypatch):
    """A machine whose torchmetrics cannot compute the mAP (no pycocotools, or too old for
    backend=) gets one line and exit 1 before anything is trained or written."""

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("Backend `pycocotools` in metric `MeanAveragePrecision` requires pycocotools")

    monkeypatch.setattr("torchmetrics.detection.MeanAveragePrecision", missing)  # map_metric imports it on use
    out = tmp_path / "o"
    code, err = run_cli(train_detection, ["--data", str(voc), "--out", str(out), "--no-progress"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "needs torchmetrics with pycocotools" in err, err
    assert not out.exists()


@pytest.mark.parametrize("task", list(EVERY_TASK))
def test_every_task_stops_at_the_time_limit_and_resumes(task, request, tmp_path, capsys):
    """--max-minutes ends a run after the epoch that passes it; --resume then finishes it,
    on every trainer (the engine's, not each task's)."""
    module, data, flags = EVERY_TASK[task]
    data = request.getfixturevalue(data)
    flags = [f.format(small=request.getfixturevalue("small")) for f in flags]
    out = tmp_path / "o"
    argv = ["--data", str(data), "--out", str(out), *flags, "--workers", "0", "--threads", "1", "--no-progress"]
    code, err = run_cli(module, [*argv, "--epochs", "3", "--max-minutes", "1e-6"], capsys)
    assert code == 0 and "stopping: --max-minutes 1e-06 reached" in err, err
    assert len(read_csv(out / "metrics.csv")) == 1
    code, err = run_cli(module, [*argv, "--epochs", "2", "--resume", str(out)], capsys)
    assert code == 0 and "resumed from" in err and "epoch 2/2" in err and "epoch 1/2" not in err, err
    assert [r["epoch"] for r in read_csv(out / "metrics.csv")] == ["1", "2"]
    assert json.loads((out / "model.json").read_text())["metrics"]["epochs_run"] == 2


def test_force_overwrites_an_existing_run(small, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "model.pt").write_bytes(b"old")
    code, err = run_cli(train, train_cli_args(small, out, "--epochs", "1", "--batch-size", "8", "--force"), capsys)
    assert code == 0, err
    assert load_trained(out)[1]["arch"] == "small_cnn"


def test_default_out_folders_do_not_collide(small, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--data", str(small), *CLS, "--epochs", "1", "--batch-size", "8"]
    assert run_cli(train, argv, capsys)[0] == 0
    first = list((tmp_path / "runs").iterdir())
    assert len(first) == 1 and first[0].name.startswith("small_cnn-")
    import time

    time.sleep(1.1)
    assert run_cli(train, argv, capsys)[0] == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2


# -- names and records ------------------------------------------------------------------------


def test_class_names_with_spaces_in_both_label_layouts(labels_txt_data, small, tmp_path, capsys):
    # labels.txt with a tab: "file<TAB>digit 0"
    out = tmp_path / "ltxt"
    code, err = run_cli(train, train_cli_args(labels_txt_data, out, "--epochs", "1", "--batch-size", "8"), capsys)
    assert code == 0, err
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == ["digit 0", "digit 1", "digit 2"] and meta["multi_label"] is False
    # one label file per image, names listed in classes.txt, written with plain spaces
    root = tmp_path / "lf"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for p in sorted(small.glob("*/*.png")):
        stem = f"{p.parent.name}_{p.stem}"
        shutil.copy(p, root / "images" / f"{stem}.png")
        (root / "labels" / f"{stem}.txt").write_text(f"hand written {p.parent.name}\n")
    (root / "classes.txt").write_text("hand written 0\nhand written 1\nhand written 2\n")
    spec = read_dataset(root)
    assert spec.classes == ["hand written 0", "hand written 1", "hand written 2"] and not spec.multi_label
    assert all(len(s.labels) == 1 for s in spec.samples)


def test_skipped_images_are_named_in_the_record(small, tmp_path, capsys):
    data = tmp_path / "d"
    shutil.copytree(small, data)
    broken = data / "1" / "broken.png"
    broken.write_bytes(b"not a png" * 50)
    out = tmp_path / "o"
    code, err = run_cli(train, train_cli_args(data, out, "--epochs", "1", "--batch-size", "8"), capsys)
    assert code == 0, err
    metrics = json.loads((out / "model.json").read_text())["metrics"]
    assert metrics["skipped_images"] == 1 and metrics["skipped_files"] == [str(broken)]
    assert str(broken) in err


# -- BatchNorm recalibration ------------------------------------------------------------------


def eval_vs_batch_stats(run, images) -> tuple[float, float]:
    model, meta = load_trained(run)
    cfg = data_config_from_meta(meta)
    x = torch.stack([eval_transform(cfg)(load_image(p, cfg.channels)) for p, _ in images])
    y = torch.tensor([meta["classes"].index(label) for _, label in images])
    with torch.no_grad():
        eval_acc = (model(x).argmax(1) == y).float().mean().item()
        model.train()
        batch_acc = (model(x).argmax(1) == y).float().mean().item()
    return eval_acc, batch_acc


def test_batchnorm_recalibration_makes_eval_mode_match_batch_statistics(digits_dir, tmp_path, capsys):
    """128 images, batch 64: 2 steps an epoch, the case where BatchNorm's running averages
    never catch up. The saved model's eval-mode accuracy on its training images matches its
    batch-statistics accuracy within 2 points; without recalibration it does not."""
    data = subset(digits_dir, tmp_path / "d", {"0": 32, "1": 32, "2": 32, "3": 32})
    images = [(p, p.parent.name) for p in sorted(data.glob("*/*.png"))]
    flags = ("--model", "lenet5_bn", "--epochs", "3", "--batch-size", "64", "--val-data", str(data), "--lr", "2e-2")
    runs = {}
    for name, extra in (("recalibrated", ()), ("plain", ("--bn-recalibration-batches", "0"))):
        argv = [
            "--data",
            str(data),
            "--out",
            str(tmp_path / name),
            "--channels",
            "1",
            "--hflip-prob",
            "0",
            "--workers",
            "0",
            "--no-progress",
            *flags,
            *extra,
        ]
        code, err = run_cli(train, argv, capsys)
        assert code == 0, err
        assert "warning:" in err and "2 step(s) per epoch" in err
        runs[name] = eval_vs_batch_stats(tmp_path / name, images)
    eval_acc, batch_acc = runs["recalibrated"]
    assert batch_acc > 0.5 and abs(eval_acc - batch_acc) <= 0.02, runs
    plain_eval, plain_batch = runs["plain"]
    assert plain_batch - plain_eval > 0.02, runs  # the problem the recalibration solves is real here


# -- diagnostics ------------------------------------------------------------------------------


def test_activation_stats_flag_exactly_the_layers_a_zeroed_conv_kills():
    torch.manual_seed(0)
    model = get_model("small_cnn", num_classes=3, in_channels=1)
    with torch.no_grad():
        model.features[3].weight.zero_()
        model.features[3].bias.zero_()
    rows = {r["layer"]: r for r in activation_stats(model, torch.randn(4, 1, 32, 32))}
    leaves = [n for n, m in model.named_modules() if n and not list(m.children())]
    assert list(rows) == leaves  # every layer, in call order
    dead = {k for k, r in rows.items() if r["flag"]}
    # conv 2 outputs zeros; its ReLU, the pools and the flatten carry them; the Linear adds its bias
    assert dead == {"features.3", "features.4", "features.5", "features.6", "classifier.0"}
    assert rows["features.4"]["flag"] == "dead ReLU" and rows["features.3"]["zero_fraction"] == 1.0
    assert rows["features.1"]["zero_fraction"] < 0.9 and rows["features.1"]["std"] > 0


def test_grad_norms_flag_vanishing_and_exploding_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
    model(torch.randn(16, 4)).pow(2).sum().backward()
    norms = layer_grad_norms(model)
    assert set(norms) == {"0", "2", "4"}
    assert grad_flags(norms) == {"0": "vanishing", "2": "vanishing"}  # nothing flows back through the zeroed layer
    model.zero_grad()
    with torch.no_grad():
        model[2].weight.normal_(0, 1e4)
        model[2].bias.fill_(1.0)
    model(torch.randn(16, 4)).pow(2).sum().backward()
    assert grad_flags(layer_grad_norms(model)).get("0") == "exploding"


def test_weighted_sampler_splits_one_balanced_draw_over_the_ranks(monkeypatch):
    from training import distributed

    weights = [1.0] * 90 + [9.0] * 10  # 90 images of class a, 10 of class b: b 9x as likely each
    draws = {}
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        monkeypatch.setattr(distributed, "rank", lambda r=rank: r)
        sampler = distributed.WeightedDistributedSampler(weights, seed=3)
        sampler.set_epoch(2)
        draws[rank] = list(sampler)
        assert len(draws[rank]) == len(sampler) == 50
    both = draws[0] + draws[1]
    assert 0.35 < sum(i >= 90 for i in both) / len(both) < 0.65  # classes drawn about equally often
    assert draws[0] != draws[1]
    g = torch.Generator().manual_seed(3 + 2)
    whole = torch.multinomial(torch.tensor(weights, dtype=torch.double), 100, replacement=True, generator=g).tolist()
    assert draws[0] == whole[0::2] and draws[1] == whole[1::2]  # one draw, split


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_diagnostics_written_into_the_run_folder(small, tmp_path, capsys):
    out = tmp_path / "o"
    argv = train_cli_args(
        small, out, "--epochs", "2", "--batch-size", "8", "--log-grad-norms", "--activation-stats", "--profile", "3"
    )
    code, err = run_cli(train, argv, capsys)
    assert code == 0, err
    model = get_model("small_cnn", num_classes=3, in_channels=1)
    layers_with_params = {n for n, m in model.named_modules() if n and list(m.parameters(recurse=False))}
    grads = read_csv(out / "grad_norms.csv")
    assert {r["layer"] for r in grads} == layers_with_params and {r["epoch"] for r in grads} == {"1", "2"}
    assert all(float(r["grad_norm"]) > 0 for r in grads)
    acts = read_csv(out / "activations.csv")
    assert [r["layer"] for r in acts if r["epoch"] == "1"] == [
        n for n, m in model.named_modules() if n and not list(m.children())
    ]
    for name in ("grad_norms.png", "activations.png"):
        with Image.open(out / name) as img:
            img.verify()
    (trace_file,) = (out / "profile").glob("*.pt.trace.json")  # TensorBoard's and Perfetto's format
    trace = json.loads(trace_file.read_text())
    assert any("conv" in e.get("name", "") for e in trace["traceEvents"])
    assert any(e.get("name") == "[memory]" for e in trace["traceEvents"])  # profile_memory
    top = (out / "profile" / "top_ops.txt").read_text()
    assert "aten::" in top and "Self CPU" in top and "Self CPU Mem" in top


def test_no_diagnostics_by_default(digits_run):
    for name in ("grad_norms.csv", "activations.csv", "profile"):
        assert not (digits_run / name).exists()


# -- decode cache -------------------------------------------------------------------------------


@pytest.fixture
def decodes(monkeypatch) -> Counter:
    """Every image decode of this test (decode_image: what load_image calls), by path."""
    calls, real = Counter(), preprocessing.decode_image

    def counted(source, *args, **kwargs):
        calls[str(source)] += 1
        return real(source, *args, **kwargs)

    monkeypatch.setattr(preprocessing, "decode_image", counted)
    return calls


CACHED_RUNS = {task: EVERY_TASK[task] for task in ("classification", "detection", "segmentation")}


@pytest.mark.parametrize("task", list(CACHED_RUNS))
def test_the_cache_decodes_each_image_once_and_changes_no_batch(task, request, decodes, tmp_path, capsys):
    """Over two epochs (training, BatchNorm recalibration, validation) --cache memory and
    --cache disk decode each image once, where no cache decodes it every epoch; detection
    and segmentation, whose cache holds the transforms' own resize, train on the very same
    batches (the same losses to the last digit) with their flips and jitter on."""
    module, data, flags = CACHED_RUNS[task]
    data = request.getfixturevalue(data)
    images = {p for p in data.rglob("*") if p.suffix in (".png", ".jpg") and p.parent.name != "masks"}
    counts, rows = {}, {}
    for mode in ("none", "memory", "disk"):
        decodes.clear()
        out = tmp_path / mode
        argv = ["--data", str(data), "--out", str(out), *flags, "--epochs", "2", "--threads", "1"]
        code, err = run_cli(module, [*argv, "--workers", "0", "--no-progress", "--cache", mode], capsys)
        assert code == 0, err
        assert set(decodes) == {str(p) for p in images}
        counts[mode] = sum(decodes.values())
        rows[mode] = [{k: v for k, v in r.items() if k != "seconds"} for r in read_csv(out / "metrics.csv")]
    assert counts["memory"] == counts["disk"] == len(images)  # once each
    assert counts["none"] >= 2 * len(images)  # every epoch again
    assert len(list((tmp_path / "disk" / "cache").glob("*.npz"))) == len(images)
    assert not (tmp_path / "none" / "cache").exists() and not (tmp_path / "memory" / "cache").exists()
    if task != "classification":  # a classifier's random crop is taken from the shrunk image
        assert rows["memory"] == rows["disk"] == rows["none"]
    if task != "classification":
        return
    decodes.clear()  # a second run into the same folder reads the disk cache
    argv = ["--data", str(data), "--out", str(tmp_path / "disk"), *flags, "--epochs", "1", "--workers", "0"]
    assert run_cli(module, [*argv, "--no-progress", "--cache", "disk", "--force"], capsys)[0] == 0
    assert not decodes


def test_a_cached_item_is_the_uncached_item(voc, masks, small, tmp_path):
    """Item by item, with the same seed: the same pixels, boxes and masks with or without
    the cache (memory, then disk, each read twice: once decoded, once kept), with the random
    flips, crops and jitter on; and the random steps still differ between two reads."""
    det = read_detection(voc).samples
    seg_cfg = get_entry("unet", task="segmentation").data_config.replace(input_size=32, resize_size=32)
    eval_seg = segmentation_transform(seg_cfg)
    cls_cfg = get_entry("small_cnn", task="classification").data_config.replace(input_size=20, resize_size=24)
    cls = read_dataset(small).samples
    for cache in (DecodeCache("memory"), DecodeCache("disk", tmp_path / "cache")):
        pairs = [
            (DetectionDataset(det, tf, 64), DetectionDataset(det, tf, 64, cache))
            for tf in (detection_train_transform(64, 0.5, 0.5), detection_eval_transform(64))
        ] + [
            (
                SegmentationDataset(read_masks(masks).samples, tf, 3, seg_cfg, full_masks=full),
                SegmentationDataset(read_masks(masks).samples, tf, 3, seg_cfg, full_masks=full, cache=cache),
            )
            for tf, full in (
                (segmentation_train_transform(seg_cfg, hflip_prob=0.5, min_scale=0.5), False),
                (lambda image, mask: (eval_seg(image), mask), True),
            )
        ]
        pairs.append(
            (
                ImageDataset(cls, 3, False, 1, eval_transform(cls_cfg)),
                ImageDataset(cls, 3, False, 1, eval_transform(cls_cfg), cache.image_loader(cls_cfg)),
            )
        )
        for plain, cached in pairs:
            for i in range(len(plain)):
                for _ in range(2):
                    torch.manual_seed(i)
                    a = plain[i]
                    torch.manual_seed(i)
                    b = cached[i]
                    for x, y in zip(a, b):
                        if isinstance(x, dict):
                            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                        else:
                            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y)), (type(plain).__name__, i)
    flips = DetectionDataset(det, detection_train_transform(64, 0.5, 0.5), 64, DecodeCache("memory"))
    assert any(not torch.equal(flips[0][0], flips[0][0]) for _ in range(5))  # augmentation runs on every read
    assert any((tmp_path / "cache").glob("*.npz"))  # the disk cache was written
