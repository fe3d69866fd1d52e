"""What the trainer prints, run as a user runs it (`python -m training.train`, a real process):
on a small dataset with unreadable files, the docs' example command runs clean (its default
batch size adapts and says so), names each unreadable file once and counts them per epoch."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_hundred(digits_dir, tmp_path_factory) -> Path:
    """200 digit PNGs (20 of each class) and two files named .png that no decoder reads."""
    root = tmp_path_factory.mktemp("two_hundred")
    for label in range(10):
        (root / str(label)).mkdir()
        for src in sorted((digits_dir / "train" / str(label)).glob("*.png"))[:20]:
            shutil.copy(src, root / str(label) / src.name)
    good = next((root / "3").glob("*.png")).read_bytes()
    (root / "3" / "truncated.png").write_bytes(good[: len(good) // 3])
    (root / "7" / "notes.png").write_text("shopping list, not an image\n")
    return root


def test_the_example_command_on_200_images_runs_clean_and_names_unreadable_files_once(two_hundred, tmp_path):
    out = tmp_path / "mine"
    # The docs' example (--data my_images --model resnet_small --epochs N --out runs/mine), two epochs.
    argv = ["--data", str(two_hundred), "--model", "resnet_small", "--epochs", "2", "--out", str(out)]
    argv += ["--no-progress", "--workers", "0", "--threads", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "training.train", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    err = done.stderr
    assert done.returncode == 0, err
    assert "warning" not in err.lower() and "Traceback" not in err, err
    lowered = re.search(r"^--batch-size (\d+): the default 64 gives (\d+) training images only (\d+) step", err, re.M)
    assert lowered, err
    batch, images, steps = map(int, lowered.groups())
    assert steps < 10 <= -(-images // batch), err  # the default gave too few steps; the chosen one enough
    for name in ("3/truncated.png", "7/notes.png"):
        assert err.count(name) == 1, err  # named once, not on every epoch line
    epoch_lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all(line.endswith("skipped 2 unreadable") for line in epoch_lines), err
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["global_batch_size"] == batch
    assert meta["metrics"]["skipped_images"] == 2
    assert sorted(Path(f).name for f in meta["metrics"]["skipped_files"]) == ["notes.png", "truncated.png"]


def test_a_batch_size_given_on_the_command_line_is_kept_with_a_warning(two_hundred, tmp_path):
    argv = ["--data", str(two_hundred), "--model", "resnet_small", "--epochs", "1", "--batch-size", "64"]
    argv += ["--out", str(tmp_path / "o"), "--no-progress", "--workers", "0", "--threads", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "training.train", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "warning:" in done.stderr and "--batch-size 64 give only 3 step(s) per epoch" in done.stderr
    assert json.loads((tmp_path / "o" / "model.json").read_text())["training"]["global_batch_size"] == 64
