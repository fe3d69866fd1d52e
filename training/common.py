"""Pieces every training entry point shares: seeding, model arguments, the learning-rate
schedule, metrics files and curves, and the package versions recorded in model.json."""

from __future__ import annotations

import csv
import math
import os
import platform
import random
import sys
from pathlib import Path

import numpy as np
import torch
import yaml


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def add_run_args(group) -> None:
    """The flags every trainer's run shares: device, threads, seed, determinism, progress."""
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto: cuda if available)")
    group.add_argument("--threads", type=int, default=0,
                       help="torch CPU threads; 1 is much faster on a busy shared machine; 0 = torch's default, all cores (default: 0)")
    group.add_argument("--seed", type=int, default=0, help="random seed for the split, initialization and augmentation (default: 0)")
    group.add_argument("--deterministic", action="store_true", help="use deterministic algorithms only (slower on GPU) (default: off)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar, only one line per epoch (default: progress bar on)")


def start_run(args) -> torch.device:
    """What every trainer does first: seed, size torch's thread pool, pick the device."""
    seed_everything(args.seed, args.deterministic)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)


def parse_model_args(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-arg expects KEY=VALUE, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def write_metrics(out: Path, history: list[dict], panels: dict[str, list[str]]) -> None:
    """metrics.csv (one row per epoch) and curves.png (one panel per entry of `panels`,
    each drawing the listed history columns against the epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, columns) in zip(axes[0], panels.items()):
        for column in columns:
            ax.plot(epochs, [h[column] for h in history], "o-", label=column)
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def run_cli(main, parser, argv: list[str] | None = None, interrupted_hint: str = "") -> int:
    """Run a trainer's `main(args)`: bad input is one `error:` line and exit 2, never a traceback.

    Dataset and checkpoint errors are ValueErrors (DatasetError, CheckpointError), an unknown
    registered model a KeyError; both name the file, folder or model at fault.
    """
    args = parser.parse_args(argv)
    try:
        main(args)
    except (ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted{interrupted_hint}", file=sys.stderr)
        return 130
    return 0


def package_versions() -> dict:
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
