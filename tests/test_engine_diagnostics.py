"""The engine's looks inside a run: a NaN or infinite gradient named by --log-grad-norms; the
--profile schedule and its trace; peak GPU memory per epoch (read from CUDA, mocked here: this
machine has no GPU); parameter counts in model.json and in `python -m model_defs`."""

from __future__ import annotations

import csv
import json
import math
import runpy
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from model_defs import get_model
from model_defs.registry import parameter_counts
from training import engine, train
from training.diagnostics import GradNormLog, grad_flags, layer_grad_norms

pytestmark = pytest.mark.unit


class SqrtOfZero(nn.Module):
    """Adds sqrt(0 * w): a finite output (0) whose gradient is NaN (0 * 1 / (2 * sqrt(0)))."""

    def __init__(self, width: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x + torch.sqrt(self.w * 0)


def nan_gradient_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), SqrtOfZero(8), nn.Linear(8, 2))


def test_nan_and_infinite_norms_are_flagged():
    assert grad_flags({"a": math.nan, "b": math.inf, "c": 1.0, "d": 0.0}) == {
        "a": "not finite",
        "b": "not finite",
        "d": "vanishing",
    }


def test_the_layer_with_a_nan_gradient_is_named_at_the_end_of_the_epoch(tmp_path):
    model, log = nan_gradient_model(), GradNormLog(tmp_path)
    for _ in range(3):
        model.zero_grad()
        loss = model(torch.randn(16, 4)).pow(2).mean()
        assert torch.isfinite(loss)
        loss.backward()
        log.record(layer_grad_norms(model))
    notes = log.end_epoch(1)
    assert notes == ["gradient norm of 2 was NaN or infinite in 3 of 3 step(s)"]
    assert log.first_not_finite == "2 at step 1: gradient norm nan"
    with open(tmp_path / "grad_norms.csv") as f:
        rows = {r["layer"]: r for r in csv.DictReader(f)}
    assert rows["2"]["flag"] == "not finite" and rows["2"]["not_finite_steps"] == "3"
    assert rows["0"]["flag"] == rows["3"]["flag"] == "" and float(rows["3"]["grad_norm"]) > 0


def test_a_run_that_diverges_after_a_nan_gradient_names_the_layer(tmp_path):
    """The engine's own update: the NaN gradient of step 1 turns the weights to NaN, the loss of
    step 2 is NaN, and the one-line error says which layer's gradient went first."""
    args = train.get_args_parser().parse_args(["--data", str(tmp_path), "--log-grad-norms"])
    task = engine.Task()
    task.device = torch.device("cpu")
    model = nan_gradient_model()
    optimization = engine.Optimization(task, args, {"model": model}, 10, GradNormLog(tmp_path))
    x = torch.randn(16, 4)
    optimization.update(model(x).pow(2).mean())
    with pytest.raises(engine.TrainingError) as error:
        optimization.update(model(x).pow(2).mean())
    assert str(error.value) == (
        "training diverged (loss nan); the first NaN or infinite gradient was in 2 at step 1: gradient norm nan"
    )
    args.log_grad_norms = False
    quiet = engine.Optimization(task, args, {"model": model}, 10, None)
    with pytest.raises(engine.TrainingError, match=r"--log-grad-norms names the layer"):
        quiet.update(model(x).pow(2).mean())


@pytest.fixture(scope="module")
def digits(digits_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diag_digits")
    for label in ("0", "1", "2"):
        (root / label).mkdir()
        for src in sorted((digits_dir / "train" / label).glob("*.png"))[:10]:
            shutil.copy(src, root / label / src.name)
    return root


def small_run(data: Path, out: Path, *extra: str) -> dict:
    argv = ["--data", str(data), "--out", str(out), "--model", "lenet5_bn", "--channels", "1", "--hflip-prob", "0"]
    assert train.cli([*argv, "--batch-size", "4", "--workers", "0", "--no-progress", *extra]) == 0
    return json.loads((out / "model.json").read_text())


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_profile_schedule_parameters_and_no_gpu_memory_on_the_cpu(digits, tmp_path):
    out = tmp_path / "o"
    meta = small_run(digits, out, "--epochs", "1", "--profile", "2", "--profile-wait", "1", "--profile-warmup", "1")
    assert meta["training"]["profile"] == {"wait": 1, "warmup": 1, "active": 2}
    model = get_model("lenet5_bn", num_classes=3, in_channels=1)
    assert meta["parameters"] == parameter_counts(model) == {"total": 61_155, "trainable": 61_155}
    (trace_file,) = (out / "profile").glob("*.pt.trace.json")
    events = json.loads(trace_file.read_text())["traceEvents"]
    # the steps after one skipped and one warmed up, and the memory each operator took
    assert {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")} == {
        "ProfilerStep#2",
        "ProfilerStep#3",
    }
    assert any(e.get("name") == "[memory]" for e in events)
    assert "peak_gpu_memory_mb" not in read_csv(out / "metrics.csv")[0]
    assert "peak_gpu_memory_mb" not in meta["metrics"]
    unprofiled = small_run(digits, tmp_path / "plain", "--epochs", "1")
    assert unprofiled["training"]["profile"] is None and not (tmp_path / "plain" / "profile").exists()


def test_peak_gpu_memory_per_epoch_with_cuda_mocked(digits, tmp_path, monkeypatch):
    """No GPU here: torch.cuda.max_memory_allocated is mocked to give the engine's reading,
    and the reading is mocked per epoch to show what metrics.csv and model.json hold."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 300 * 2**20 + 2**19)
    assert engine.peak_gpu_memory_mb(torch.device("cuda", 0)) == 300.5
    assert engine.peak_gpu_memory_mb(torch.device("cpu")) is None
    readings = iter([120.0, 250.5])
    monkeypatch.setattr(engine, "peak_gpu_memory_mb", lambda device: next(readings))
    meta = small_run(digits, tmp_path / "o", "--epochs", "2")
    assert [r["peak_gpu_memory_mb"] for r in read_csv(tmp_path / "o" / "metrics.csv")] == ["120.0", "250.5"]
    assert meta["metrics"]["peak_gpu_memory_mb"] == 250.5


def test_the_model_listing_gives_parameter_counts(capsys):
    runpy.run_module("model_defs", run_name="__main__")
    lines = {line.split("\t")[0]: line.split("\t") for line in capsys.readouterr().out.splitlines()}
    total = parameter_counts(get_model("small_cnn"))["total"]
    assert lines["small_cnn"][3] == f"{total / 1e6:.2f}M params ({total / 1e6:.2f}M trainable)"
    assert all(fields[3].endswith("M trainable)") for fields in lines.values())
