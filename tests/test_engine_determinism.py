"""The training engine's arithmetic is pinned: a fixed seed on the CPU gives the same weights,
bit for bit, as the recorded fingerprints below, for a classifier on the digits and a detector
on the shapes data. A change to the engine that reorders a random draw, a step of the
optimizer, the schedule, BatchNorm recalibration or the choice of the saved epoch changes a
fingerprint. The fingerprints hold for the torch version and CPU kernel family named beside
them (another CPU's vector kernels round differently); elsewhere the test says so and skips."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from training import train, train_detection
from training.shapes import generate

pytestmark = pytest.mark.unit

# The weights the engine gives for these runs and seeds with torch 2.14.1+cu130 on an AVX512
# CPU, one thread: (model.pt, the best epoch; checkpoint.pt's model, the last epoch).
PINNED_TORCH, PINNED_CPU = "2.14.1+cu130", "AVX512"
FINGERPRINTS = {
    "classification": (
        "4f61c6dbe86d826e61ce39bb3d545fcdcbebe80aa431efc48ce586be7f832e58",
        "dfe2dd3c61ef040a0c477827aec889a2c2e6c8874f795b2481a291b392189e5c",
    ),
    "detection": (
        "eb487060ee7f7f2d53ebd0b7232f7a4589cf9bae3a2017bc563c3b22fb152d54",
        "ab0ef5b65f3ac8a08fb3b1b485dc909cf85b8d5a409d70b6e2bf5f988e053b33",
    ),
}


def fingerprint(state_dict: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_fingerprints(out: Path) -> tuple[str, str]:
    best = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    last = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    return fingerprint(best), fingerprint(last)


@pytest.fixture(scope="module")
def digits(digits_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("det_digits")
    for label in ("0", "1", "2"):
        (root / label).mkdir()
        for src in sorted((digits_dir / "train" / label).glob("*.png"))[:10]:
            shutil.copy(src, root / label / src.name)
    return root


COMMON = ["--workers", "0", "--threads", "1", "--no-progress", "--seed", "7"]
RUNS = {
    "classification": (
        train,
        "digits",
        ["--model", "lenet5_bn", "--channels", "1", "--hflip-prob", "0", "--epochs", "2", "--batch-size", "8"]
        + ["--clip-grad-norm", "1", "--bn-recalibration-batches", "2", "--warmup-epochs", "0.5"],
    ),
    "detection": (
        train_detection,
        "shapes",
        ["--model", "fcos_resnet", "--input-size", "64", "--epochs", "2", "--batch-size", "2", "--pictures", "0"]
        + ["--bn-recalibration-batches", "2"],
    ),
}


def same_machine_as_the_record() -> str | None:
    here = (torch.__version__, torch.backends.cpu.get_cpu_capability())
    if here != (PINNED_TORCH, PINNED_CPU):
        return f"fingerprints recorded with torch {PINNED_TORCH} on {PINNED_CPU}; this is {here[0]} on {here[1]}"
    return None


@pytest.mark.parametrize("task", list(RUNS))
def test_a_fixed_seed_gives_the_recorded_weights(task, digits, tmp_path):
    reason = same_machine_as_the_record()
    if reason:
        pytest.skip(reason)
    module, data, flags = RUNS[task]
    root = generate(tmp_path / "shapes", "voc", 6, 96, seed=3, progress=False) if data == "shapes" else digits
    threads = torch.get_num_threads()
    try:
        assert module.cli(["--data", str(root), "--out", str(tmp_path / "o"), *flags, *COMMON]) == 0
    finally:
        torch.set_num_threads(threads)
    assert run_fingerprints(tmp_path / "o") == FINGERPRINTS[task]
