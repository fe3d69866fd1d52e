"""The engine's looks inside a run: a NaN or infinite gradient named by --log-grad-norms."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn as nn

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
