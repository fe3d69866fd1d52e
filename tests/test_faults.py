"""Faults that must lose nothing: a training run killed with SIGKILL in the middle of an epoch."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import train_cli_args

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parent.parent


def small_subset(digits_dir: Path, dest: Path, per_class: int = 25) -> Path:
    for folder in sorted((digits_dir / "train").iterdir()):
        (dest / folder.name).mkdir(parents=True)
        for f in sorted(folder.glob("*.png"))[:per_class]:
            shutil.copy(f, dest / folder.name / f.name)
    return dest


def train(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "training.train", *argv],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(digits_dir, tmp_path):
    data = small_subset(digits_dir, tmp_path / "data")
    flags = ("--epochs", "4", "--batch-size", "8", "--seed", "5")

    whole = train(train_cli_args(data, tmp_path / "whole", *flags))
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    out = tmp_path / "killed"
    run = train(train_cli_args(data, out, *flags))
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists():  # epoch 1 is done; kill it somewhere in epoch 2
        assert run.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.3)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    assert run.returncode == -signal.SIGKILL
    done = torch.load(out / "checkpoint.pt", weights_only=True)["state"]["epoch"]
    assert done < 4  # killed before the end

    resumed = train(train_cli_args(data, out, *flags, "--resume", str(out)))
    assert resumed.wait(timeout=300) == 0
    log = resumed.stderr.read()
    assert f"resumed from {out / 'checkpoint.pt'} after epoch {done}" in log
    # It trained only the epochs that were lost, not the whole run again.
    assert [line.split()[1] for line in log.splitlines() if line.startswith("epoch ")] == [
        f"{e}/4" for e in range(done + 1, 5)
    ]
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key
    assert (out / "metrics.csv").read_text().count("\n") == 5  # header + the four epochs, none twice
