"""The trainer end to end: its CLI, its errors, its output folder, resume, multi-label,
class balancing, unreadable images and early stopping.

Runs use real digit PNGs (conftest's `digits_dir`), copied in small subsets so that each
training run takes a second or two on a CPU.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from model_defs.checkpoint import data_config_from_meta, load_trained
from model_defs.preprocessing import eval_transform, load_image
from tests.conftest import train_cli_args
from training import train as train_mod
from training.datasets import read_dataset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[1]


# -- helpers ------------------------------------------------------------------------------


def subset(digits_dir: Path, dest: Path, counts: dict[str, int]) -> Path:
    """Copy the first n training images of each named digit class into dest/<class>/."""
    for label, n in counts.items():
        (dest / label).mkdir(parents=True, exist_ok=True)
        for src in sorted((digits_dir / "train" / label).glob("*.png"))[:n]:
            shutil.copy(src, dest / label / src.name)
    return dest


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def run_ok(capsys, data: Path, out: Path, *extra: str) -> str:
    """Train in-process; assert exit 0; return what it wrote to stderr."""
    capsys.readouterr()
    code = train_mod.cli(train_cli_args(data, out, *extra))
    err = capsys.readouterr().err
    assert code == 0, err
    return err


def run_error(capsys, argv: list[str]) -> str:
    """Train in-process expecting bad input: exit 2 and exactly one 'error:' line on stderr."""
    capsys.readouterr()
    code = train_mod.cli(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    return lines[0]


# -- the CLI ------------------------------------------------------------------------------


def test_help_lists_every_flag_with_default():
    result = subprocess.run(
        [sys.executable, "-m", "training.train", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    actions = [a for a in train_mod.get_args_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) > 20
    for action in actions:
        flag = max(action.option_strings, key=len)
        assert flag in text, f"{flag} missing from --help"
        # Every option documents its default; the one required option says so instead.
        word = "required" if action.required else "default"
        assert word in (action.help or ""), f"help of {flag} does not mention {word!r}"
    assert text.count("default") >= len(actions) - 1


def test_cli_missing_data_folder_subprocess(tmp_path):
    missing = tmp_path / "no_such_data"
    result = subprocess.run(
        [sys.executable, "-m", "training.train", *train_cli_args(missing, tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(missing) in lines[0]


def test_cli_labels_txt_unknown_label(capsys, digits_dir, tmp_path):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    srcs = sorted((digits_dir / "train" / "3").glob("*.png"))[:3]
    for src in srcs:
        shutil.copy(src, root / "images" / src.name)
    (root / "classes.txt").write_text("three\nseven\n")
    (root / "labels.txt").write_text(f"{srcs[0].name} three\n{srcs[1].name} seven\n{srcs[2].name} eight\n")
    line = run_error(capsys, train_cli_args(root, tmp_path / "out", "--epochs", "1"))
    assert str(root / "labels.txt") in line and "line 3" in line and "'eight'" in line


def test_cli_empty_class_folder(capsys, digits_dir, tmp_path):
    data = subset(digits_dir, tmp_path / "ds", {"0": 3, "1": 3})
    (data / "2").mkdir()
    line = run_error(capsys, train_cli_args(data, tmp_path / "out", "--epochs", "1"))
    assert str(data / "2") in line


def test_cli_unknown_model(capsys, digits_dir, tmp_path):
    data = subset(digits_dir, tmp_path / "ds", {"0": 3, "1": 3})
    argv = train_cli_args(data, tmp_path / "out", "--epochs", "1")
    argv[argv.index("small_cnn")] = "no_such_net"
    line = run_error(capsys, argv)
    assert "no_such_net" in line and "small_cnn" in line  # names it and lists the known ones


# -- the output folder --------------------------------------------------------------------


def test_trained_output_folder(trained_digits, digits_dir):
    out = trained_digits
    for name in ("model.pt", "model.json", "checkpoint.pt", "metrics.csv", "curves.png"):
        assert (out / name).is_file(), name

    state = torch.load(out / "model.pt", weights_only=True)
    assert isinstance(state, dict) and state
    assert all(isinstance(v, torch.Tensor) for v in state.values())

    meta = read_json(out / "model.json")
    assert meta["arch"] == "small_cnn"
    assert meta["arch_args"]["num_classes"] == 10 and meta["arch_args"]["in_channels"] == 1
    assert meta["task"] == "classification"
    assert meta["multi_label"] is False
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["preprocessing"]["channels"] == 1
    assert meta["dataset"]["fingerprint"] == read_dataset(digits_dir / "train").fingerprint()
    assert meta["versions"]["torch"] == torch.__version__
    dt.datetime.fromisoformat(meta["created"])

    rows = read_csv(out / "metrics.csv")
    m = meta["metrics"]
    assert m["name"] == "accuracy"
    assert m["epochs_run"] == 3 and len(rows) == 3
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert m["best_val"] == pytest.approx(max(float(r["val_accuracy"]) for r in rows))
    assert int(rows[m["best_epoch"] - 1]["epoch"]) == m["best_epoch"]

    with Image.open(out / "curves.png") as img:
        assert img.format == "PNG"
        assert img.width > 100 and img.height > 100
        img.verify()

    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["epoch"] == 3
    assert set(ckpt["model"]) == set(state)


def test_trained_model_reloads_and_beats_chance(trained_digits, digits_dir):
    model, meta = load_trained(trained_digits)
    assert not model.training
    cfg = data_config_from_meta(meta)
    transform = eval_transform(cfg)
    paths = sorted((digits_dir / "test").glob("*/*.png"))
    assert len(paths) > 300
    batch = torch.stack([transform(load_image(p, cfg.channels)) for p in paths])
    with torch.no_grad():
        pred = model(batch).argmax(1).tolist()
    correct = sum(meta["classes"][k] == p.parent.name for k, p in zip(pred, paths))
    accuracy = correct / len(paths)
    assert accuracy > 0.5, accuracy  # chance is 0.1


# -- robustness and options ---------------------------------------------------------------


def test_unreadable_image_is_skipped_and_counted(capsys, digits_dir, tmp_path):
    data = subset(digits_dir, tmp_path / "ds", {"0": 10, "1": 10, "2": 10})
    (data / "1" / "broken.png").write_bytes(b"this is not a PNG file at all" * 20)
    out = tmp_path / "out"
    err = run_ok(capsys, data, out, "--epochs", "1", "--batch-size", "16")
    rows = read_csv(out / "metrics.csv")
    assert sum(int(r["skipped_images"]) for r in rows) == 1
    assert read_json(out / "model.json")["metrics"]["skipped_images"] == 1
    assert "skipped 1 unreadable" in err


def test_resume_matches_uninterrupted_run(capsys, digits_dir, tmp_path):
    data = subset(digits_dir, tmp_path / "ds", {"0": 12, "1": 12, "2": 12, "3": 12})
    common = ("--batch-size", "8", "--seed", "3")
    full, split = tmp_path / "full", tmp_path / "split"
    run_ok(capsys, data, full, "--epochs", "2", *common)

    run_ok(capsys, data, split, "--epochs", "1", *common)
    after_one = torch.load(split / "checkpoint.pt", weights_only=True)["model"]
    err = run_ok(capsys, data, split, "--epochs", "2", "--resume", str(split), *common)
    # It really continued: it said so and trained epoch 2 only.
    assert "resumed from" in err and "after epoch 1" in err
    assert "epoch 2/2" in err and "epoch 1/2" not in err

    final_full = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    final_split = torch.load(split / "checkpoint.pt", weights_only=True)["model"]
    assert any(not torch.allclose(after_one[k], final_full[k]) for k in final_full)  # epoch 2 changed it
    for k in final_full:
        torch.testing.assert_close(final_split[k], final_full[k], rtol=0, atol=1e-5, msg=f"last epoch: {k}")

    best_full = torch.load(full / "model.pt", weights_only=True)
    best_split = torch.load(split / "model.pt", weights_only=True)
    assert set(best_full) == set(best_split)
    for k in best_full:
        torch.testing.assert_close(best_split[k], best_full[k], rtol=0, atol=1e-5, msg=f"model.pt: {k}")

    rows_full, rows_split = read_csv(full / "metrics.csv"), read_csv(split / "metrics.csv")
    assert len(rows_full) == len(rows_split) == 2
    for a, b in zip(rows_full, rows_split):
        for col in ("epoch", "lr", "train_loss", "val_loss", "val_accuracy"):
            assert float(a[col]) == pytest.approx(float(b[col]), rel=1e-5, abs=1e-7), col
    meta = read_json(split / "model.json")
    assert meta["metrics"]["epochs_run"] == 2


def digit_image(digits_dir: Path, label: str, k: int) -> Image.Image:
    path = sorted((digits_dir / "train" / label).glob("*.png"))[k]
    return Image.open(path).convert("L")


def test_multi_label(capsys, digits_dir, tmp_path):
    """images/ + labels/: single digits, and pairs of digits side by side with two labels."""
    root = tmp_path / "ml"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    names = {"0": "zero", "1": "one", "2": "two"}
    n = 0

    def add(img: Image.Image, labels: list[str]):
        nonlocal n
        img.save(root / "images" / f"im{n:03d}.png")
        (root / "labels" / f"im{n:03d}.txt").write_text("\n".join(labels) + "\n")
        n += 1

    for d, name in names.items():
        for k in range(6):
            add(digit_image(digits_dir, d, k), [name])
    for a, b in (("0", "1"), ("1", "2"), ("2", "0")):
        for k in range(4):
            pair = Image.new("L", (64, 32))
            pair.paste(digit_image(digits_dir, a, 10 + k), (0, 0))
            pair.paste(digit_image(digits_dir, b, 10 + k), (32, 0))
            add(pair.resize((32, 32)), [names[a], names[b]])

    out = tmp_path / "out"
    run_ok(capsys, root, out, "--epochs", "2", "--batch-size", "8")
    meta = read_json(out / "model.json")
    assert meta["multi_label"] is True
    assert meta["dataset"]["layout"] == "label_files"
    assert meta["classes"] == ["one", "two", "zero"]
    assert meta["metrics"]["name"] == "f1"
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 2 and all(0.0 <= float(r["val_f1"]) <= 1.0 for r in rows)
    # The model has one output per class (sigmoid), and reloads.
    model, _ = load_trained(out)
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 3)


def test_balance_on_imbalanced_data(capsys, digits_dir, tmp_path):
    data = subset(digits_dir, tmp_path / "ds", {"0": 30, "1": 5, "2": 5})
    plain, balanced = tmp_path / "plain", tmp_path / "balanced"
    run_ok(capsys, data, plain, "--epochs", "1", "--batch-size", "8")
    run_ok(capsys, data, balanced, "--epochs", "1", "--batch-size", "8", "--balance")
    meta = read_json(balanced / "model.json")
    assert meta["classes"] == ["0", "1", "2"] and meta["metrics"]["epochs_run"] == 1
    assert (balanced / "model.pt").is_file()
    # Same seed and data: only the weighted sampler can make the training pass differ.
    assert read_csv(plain / "metrics.csv")[0]["train_loss"] != read_csv(balanced / "metrics.csv")[0]["train_loss"]


def test_early_stopping(capsys, digits_dir, tmp_path):
    data = subset(digits_dir, tmp_path / "ds", {"0": 8, "1": 8, "2": 8})
    out = tmp_path / "out"
    err = run_ok(capsys, data, out, "--epochs", "6", "--patience", "1", "--lr", "0", "--batch-size", "8")
    meta = read_json(out / "model.json")
    assert meta["metrics"]["epochs_run"] < 6
    assert meta["metrics"]["epochs_run"] == 2  # epoch 1 sets the best, epoch 2 cannot beat it
    assert len(read_csv(out / "metrics.csv")) == 2
    assert "early stop" in err


# -- multi-hot label files, augmentation, focal loss ----------------------------------------


def multi_hot_dataset(digits_dir: Path, root: Path, classes: list[str], rows: dict[tuple[str, ...], int]) -> Path:
    """images/ + labels/<stem>.txt holding one 0/1 per class of classes.txt ('1 0 1'): for each
    set of digits in `rows`, that many images of them side by side."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    n = 0
    for digits, count in rows.items():
        for k in range(count):
            canvas = Image.new("L", (32 * len(digits), 32))
            for i, d in enumerate(digits):
                canvas.paste(digit_image(digits_dir, d, k), (32 * i, 0))
            canvas.resize((32, 32)).save(root / "images" / f"im{n:03d}.png")
            row = " ".join("1" if str(c) in digits else "0" for c in range(len(classes)))
            (root / "labels" / f"im{n:03d}.txt").write_text(row + "\n")
            n += 1
    return root


@pytest.mark.parametrize("loss", [[], ["--loss", "focal", "--focal-alpha", "0.25"]], ids=["ce", "focal"])
def test_multi_hot_label_files(capsys, digits_dir, tmp_path, loss):
    classes = ["zero", "one", "two"]
    rows = {("0",): 5, ("1",): 5, ("2",): 5, ("0", "2"): 4, ("1", "2"): 4}
    root = multi_hot_dataset(digits_dir, tmp_path / "ml", classes, rows)
    assert (root / "labels" / "im015.txt").read_text() == "1 0 1\n"
    out = tmp_path / "out"
    run_ok(capsys, root, out, "--epochs", "1", "--batch-size", "8", *loss)
    meta = read_json(out / "model.json")
    # Read as label sets over classes.txt's columns, not as the class indices 0 and 1.
    assert meta["classes"] == classes and meta["multi_label"] is True
    assert meta["dataset"]["label_format"] == "multi-hot"
    assert meta["loss"] == (
        {"name": "focal", "gamma": 2.0, "alpha": 0.25} if loss else {"name": "ce", "function": "binary cross-entropy"}
    )
    assert 0.0 <= meta["metrics"]["f1"] <= 1.0
    model, _ = load_trained(out)
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 3)


def test_ambiguous_label_files_are_refused_until_the_format_is_given(capsys, digits_dir, tmp_path):
    root = multi_hot_dataset(digits_dir, tmp_path / "ml", ["zero", "one"], {("0",): 4, ("1",): 4, ("0", "1"): 4})
    out = tmp_path / "out"
    line = run_error(capsys, train_cli_args(root, out, "--epochs", "1"))
    assert "--label-format multi-hot or indices" in line and str(root / "labels") in line
    assert not out.exists()
    run_ok(capsys, root, out, "--epochs", "1", "--batch-size", "8", "--label-format", "multi-hot")
    meta = read_json(out / "model.json")
    assert meta["classes"] == ["zero", "one"] and meta["multi_label"] is True
    assert meta["dataset"]["label_format"] == "multi-hot"


def test_augmentation_is_training_only(capsys, digits_dir, tmp_path):
    """With --lr 0 the weights stay at their (seeded) start, so only the pictures differ
    between the runs: the training images do, the validation ones and the served ones don't."""
    from handlers.image_classifier import ImageClassifier
    from tests.test_handler import make_context

    data = subset(digits_dir, tmp_path / "ds", {"0": 10, "1": 10, "2": 10})
    plain, augmented = tmp_path / "plain", tmp_path / "augmented"
    common = ["--epochs", "1", "--batch-size", "8", "--lr", "0"]
    run_ok(capsys, data, plain, *common)
    run_ok(capsys, data, augmented, *common, "--color-jitter", "0.5,0.5", "--rotation", "20")
    a, b = read_json(plain / "model.json"), read_json(augmented / "model.json")
    assert a["augmentation"] == {"min_scale": 0.6, "hflip_prob": 0.0, "rotation": 0.0, "color_jitter": None}
    assert b["augmentation"] == {
        "min_scale": 0.6,
        "hflip_prob": 0.0,
        "rotation": 20.0,
        "color_jitter": [0.5, 0.5, 0, 0],
    }
    assert a["preprocessing"] == b["preprocessing"]
    rows_a, rows_b = read_csv(plain / "metrics.csv")[0], read_csv(augmented / "metrics.csv")[0]
    assert rows_a["train_loss"] != rows_b["train_loss"]
    assert rows_a["val_loss"] == rows_b["val_loss"]
    # The serving transform: the real handler's, loaded from each training output folder.
    image = load_image(sorted((digits_dir / "test" / "7").glob("*.png"))[0], 1)
    tensors = []
    for run in (plain, augmented):
        handler = ImageClassifier()
        handler.initialize(make_context(run, 1))
        tensors.append(handler.transform(image))
    assert torch.equal(tensors[0], tensors[1])
    assert torch.equal(tensors[0], eval_transform(data_config_from_meta(a))(image))


def test_focal_loss_beside_balance(capsys, digits_dir, tmp_path):
    data = subset(digits_dir, tmp_path / "ds", {"0": 30, "1": 5, "2": 5})
    ce, focal = tmp_path / "ce", tmp_path / "focal"
    run_ok(capsys, data, ce, "--epochs", "1", "--batch-size", "8", "--balance")
    run_ok(
        capsys,
        data,
        focal,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--balance",
        "--loss",
        "focal",
        "--focal-gamma",
        "1.5",
    )
    assert read_json(ce / "model.json")["loss"] == {"name": "ce", "function": "cross-entropy", "label_smoothing": 0.0}
    assert read_json(focal / "model.json")["loss"] == {"name": "focal", "gamma": 1.5, "alpha": None}
    # Same seed, data and sampler: only the loss differs; focal's is below cross-entropy's on every image.
    assert float(read_csv(focal / "metrics.csv")[0]["train_loss"]) < float(
        read_csv(ce / "metrics.csv")[0]["train_loss"]
    )


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--color-jitter", "bright"], "argument --color-jitter: 'bright' is not 1 to 4"),
        (["--color-jitter", "0.1,-0.2"], "argument --color-jitter: '0.1,-0.2' is not 1 to 4"),
        (["--color-jitter", "0.4,0.4,0.4,0.9"], "hue 0.9 is over 0.5"),
        (["--color-jitter", "0.4,0.4,0.4"], "saturation and hue change nothing on grey images"),
        (["--rotation", "181"], "--rotation must be >= 0 and <= 180, got 181.0"),
        (["--loss", "huber"], "argument --loss: invalid choice: 'huber'"),
        (["--focal-gamma", "2"], "--focal-gamma is a focal-loss setting; give --loss focal with it"),
        (["--loss", "focal", "--focal-gamma", "-1"], "--focal-gamma must be >= 0, got -1.0"),
        (["--loss", "focal", "--focal-alpha", "1.5"], "--focal-alpha must be > 0 and <= 1, got 1.5"),
        (["--loss", "focal", "--label-smoothing", "0.1"], "--label-smoothing goes with --loss ce only"),
        (["--label-format", "one-hot"], "argument --label-format: invalid choice: 'one-hot'"),
    ],
)
def test_bad_augmentation_loss_and_label_format_values(capsys, digits_dir, tmp_path, flags, words):
    data = subset(digits_dir, tmp_path / "ds", {"0": 3, "1": 3})
    out = tmp_path / "out"
    line = run_error(capsys, train_cli_args(data, out, "--epochs", "1", *flags))
    assert words in line
    assert not out.exists()
