"""Optional looks inside a training run, each off by default and written into the run folder:

- `--log-grad-norms`: per-layer gradient norms averaged over each epoch's steps
  (grad_norms.csv, grad_norms.png); layers under VANISHING or over EXPLODING are flagged, and
  so is a NaN or infinite norm (which compares false with both bounds, so it is tested apart),
  with the step it was first met.
- `--activation-stats`: forward hooks on a fixed validation batch give each layer's output
  mean, std and fraction of zeros (activations.csv, activations.png); a layer whose output
  is (almost) all zeros is flagged dead.
- `--profile N`: torch.profiler on a schedule (--profile-wait steps skipped, --profile-warmup
  steps warmed up, N recorded) with memory: a trace for TensorBoard and Perfetto under
  profile/ and profile/top_ops.txt (operators by time and by memory).
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn

VANISHING, EXPLODING = 1e-7, 1e3  # gradient norm of a layer
DEAD = 0.99  # share of zeros in a layer's output


def layer_name(param_name: str) -> str:
    """'features.3.weight' -> 'features.3' (the module that owns the parameter)."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def layer_grad_norms(model: nn.Module) -> dict[str, float]:
    """The L2 norm of each layer's gradients (all its parameters together)."""
    squares: dict[str, float] = defaultdict(float)
    for name, p in model.named_parameters():
        if p.grad is not None:
            squares[layer_name(name)] += p.grad.detach().float().pow(2).sum().item()
    return {k: v**0.5 for k, v in squares.items()}


def grad_flags(norms: dict[str, float]) -> dict[str, str]:
    """Each layer whose gradient norm is not finite (NaN or infinite), vanishing or exploding."""
    flags = {}
    for k, v in norms.items():
        if not math.isfinite(v):
            flags[k] = "not finite"
        elif v < VANISHING:
            flags[k] = "vanishing"
        elif v > EXPLODING:
            flags[k] = "exploding"
    return flags


class GradNormLog:
    """Averages layer_grad_norms over an epoch's steps and writes one row per layer per epoch.
    A NaN or infinite norm is counted apart from the average, flagged, and the first step
    that had one is kept for the message of a run that diverges before its epoch ends."""

    def __init__(self, out: Path):
        self.out, self.rows, self.step = out, [], 0
        self.first_not_finite = ""  # where a gradient norm was first NaN or infinite
        self.start_epoch()

    def start_epoch(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.finite: dict[str, int] = defaultdict(int)
        self.not_finite: dict[str, int] = defaultdict(int)
        self.steps = 0

    def record(self, norms: dict[str, float]) -> None:
        """One step's layer_grad_norms."""
        self.step += 1
        self.steps += 1
        bad = [k for k, v in norms.items() if not math.isfinite(v)]
        for k, v in norms.items():
            if k in bad:
                self.not_finite[k] += 1
            else:
                self.sums[k] += v
                self.finite[k] += 1
        if bad and not self.first_not_finite:
            # A NaN made in one layer reaches every layer before it on the way back; the
            # parameters come in definition order, so the last one is nearest its origin.
            before = f" (and {len(bad) - 1} layer(s) before it)" if len(bad) > 1 else ""
            self.first_not_finite = f"{bad[-1]}{before} at step {self.step}: gradient norm {norms[bad[-1]]}"

    def end_epoch(self, epoch: int) -> list[str]:
        """Write the files; returns one warning line per flagged layer."""
        layers = list({**self.sums, **self.not_finite})
        norms = {k: self.sums[k] / self.finite[k] if self.finite[k] else math.nan for k in layers}
        flags = grad_flags(norms)
        flags.update({k: "not finite" for k in self.not_finite})
        self.rows += [
            {
                "epoch": epoch,
                "layer": k,
                "grad_norm": norms[k],
                "not_finite_steps": self.not_finite[k],
                "flag": flags.get(k, ""),
            }
            for k in layers
        ]
        notes = [
            f"gradient norm of {k} was NaN or infinite in {self.not_finite[k]} of {self.steps} step(s)"
            if k in self.not_finite
            else f"gradient norm of {k} is {flags[k]} ({norms[k]:.2e})"
            for k in flags
        ]
        self.start_epoch()
        write_rows(self.out / "grad_norms.csv", self.rows)
        draw_per_layer(
            self.out / "grad_norms.png", self.rows, "grad_norm", "gradient norm per layer (log scale)", log=True
        )
        return notes


@torch.no_grad()
def activation_stats(model: nn.Module, x) -> list[dict]:
    """Mean, std and share of zeros of every leaf module's output on `x`, in call order."""
    rows, hooks = [], []

    def hook(name):
        def fn(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.is_floating_point():
                o = output.detach().float()
                zeros = (o == 0).float().mean().item()
                rows.append(
                    {
                        "layer": name,
                        "type": type(module).__name__,
                        "mean": o.mean().item(),
                        "std": o.std().item() if o.numel() > 1 else 0.0,
                        "zero_fraction": zeros,
                        "flag": ("dead ReLU" if "ReLU" in type(module).__name__ else "dead") if zeros >= DEAD else "",
                    }
                )

        return fn

    for name, m in model.named_modules():
        if name and not any(True for _ in m.children()):
            hooks.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return rows


class ActivationLog:
    def __init__(self, out: Path):
        self.out, self.rows = out, []

    def end_epoch(self, epoch: int, model: nn.Module, x) -> list[str]:
        rows = [{"epoch": epoch, **r} for r in activation_stats(model, x)]
        self.rows += rows
        write_rows(self.out / "activations.csv", self.rows)
        draw_per_layer(
            self.out / "activations.png",
            rows,
            "zero_fraction",
            f"share of zero outputs per layer, epoch {epoch}",
            second="std",
        )
        return [
            f"{r['layer']} ({r['type']}) is {r['flag']}: {r['zero_fraction']:.0%} of its outputs are 0"
            for r in rows
            if r["flag"]
        ]


def write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def draw_per_layer(
    path: Path, rows: list[dict], column: str, title: str, log: bool = False, second: str | None = None
) -> None:
    """Gradient norms: one line per layer over the epochs. Activations: bars per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if second is None:
        by_layer = defaultdict(list)
        for r in rows:
            by_layer[r["layer"]].append((r["epoch"], r[column]))
        fig, ax = plt.subplots(figsize=(8, 5))
        for layer, points in by_layer.items():
            ax.plot(*zip(*points), "o-", label=layer)
        ax.set(xlabel="epoch", title=title, yscale="log" if log else "linear")
        ax.legend(fontsize=6, ncol=2)
    else:
        fig, axes = plt.subplots(2, 1, figsize=(max(8, len(rows) * 0.35), 7), sharex=True)
        names = [r["layer"] for r in rows]
        for ax, col, t in ((axes[0], column, title), (axes[1], second, f"output {second} per layer")):
            ax.bar(
                range(len(rows)), [r[col] for r in rows], color=["tab:red" if r["flag"] else "tab:blue" for r in rows]
            )
            ax.set(title=t)
        axes[1].set_xticks(range(len(rows)), names, rotation=90, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class StepProfiler:
    """torch.profiler over the first training steps on a wait / warm-up / active schedule, with
    memory profiling. Writes profile/<host>_<pid>.<ms>.pt.trace.json (open it in Perfetto,
    ui.perfetto.dev, or in TensorBoard's profiler plugin with --logdir <out>/profile) and
    profile/top_ops.txt (operators by time, then by memory)."""

    def __init__(self, out: Path, wait: int, warmup: int, active: int, cuda: bool):
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        self.out, self.cuda, self.left = out / "profile", cuda, wait + warmup + active
        self.out.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.prof: torch.profiler.profile | None = profile(
            activities=activities,
            schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=tensorboard_trace_handler(str(self.out)),
            record_shapes=True,
            profile_memory=True,
        )
        self.prof.start()

    def step(self) -> None:
        if self.prof is None:
            return
        self.prof.step()
        self.left -= 1
        if self.left <= 0:
            self.finish()

    def finish(self) -> str | None:
        """Stop (a run shorter than the schedule keeps what its active steps recorded); returns a
        warning when the run ended before any step was recorded."""
        if self.prof is None:
            return None
        prof, self.prof = self.prof, None
        prof.stop()
        if not list(self.out.glob("*.pt.trace.json")):
            return "--profile recorded nothing: the run ended within --profile-wait + --profile-warmup steps"
        device = "cuda" if self.cuda else "cpu"
        ops = prof.key_averages()
        tables = [
            ops.table(sort_by=f"self_{device}_time_total", row_limit=25),
            ops.table(sort_by=f"self_{device}_memory_usage", row_limit=15),
        ]
        (self.out / "top_ops.txt").write_text("\n\n".join(tables) + "\n")
        return None
