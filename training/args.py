"""The flags every trainer shares, declared once with one name, one default and one help text,
and their checks: a value out of range, a device that is not there or an --out folder that
would be overwritten is one UsageError line before anything is read or written. A trainer
builds its parser from `task_parser` and the `add_*_args` groups; training.engine runs it."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

import torch

from model_defs.usage import OneLineParser, UsageError
from training import distributed as dist
from training.cache import CACHE_MODES

# Defaults a task may set to suit its models; every other shared flag has one default everywhere.
TASK_DEFAULTS = {
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "patience",
    "clip_grad_norm",
    "warmup_epochs",
    "min_lr_ratio",
    "bn_recalibration_batches",
}

# A default --batch-size is lowered to give BatchNorm at least MIN_STEPS steps per epoch.
MIN_STEPS, MIN_AUTO_BATCH = 10, 8


class TaskDefault(int):
    """A default the engine may adapt to the data, told apart from the same number given on
    the command line (argparse keeps a non-string default as it is)."""


def task_parser(task: object) -> argparse.ArgumentParser:
    """A trainer's parser: its module's docstring as the description; a usage mistake (an
    unknown flag, a value of the wrong type) is one line and exit 2, like every other mistake."""
    module = sys.modules[type(task).__module__]
    return OneLineParser(
        prog=f"python -m training.{Path(module.__file__).stem}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_data_args(p, data_help: str, layouts=(), layout_help="dataset layout", val: bool = True):
    """--data, --layout, --val-data and --val-fraction: one name, default and help everywhere."""
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help=f"{data_help} (required)")
    if layouts:
        g.add_argument("--layout", default="auto", choices=layouts, help=f"{layout_help} (default: auto, detected)")
    if val:
        g.add_argument(
            "--val-data",
            default=None,
            help="validation dataset, same layout; if not given --val-fraction of --data is held out (default: None)",
        )
        g.add_argument(
            "--val-fraction",
            type=float,
            default=0.2,
            help="share of --data held out for validation without --val-data, per class for classifiers "
            "(default: %(default)s)",
        )
    return g


def add_model_args(
    p, task: str, model: str, *, example="", channels=True, input_size="", hflip=0.5, min_scale=None, pictures=""
):
    """--model, --model-arg, --channels, --input-size, --hflip-prob, --min-scale and --pictures
    (the picture file drawn at the end): one name and help everywhere; the defaults that differ
    by task are the task's."""
    g = p.add_argument_group("model and augmentation")
    g.add_argument(
        "--model", default=model, help=f"registered {task} model, see `python -m model_defs` (default: {model})"
    )
    g.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra keyword argument for the model builder, value parsed as YAML; repeatable (default: none"
        + (f"; e.g. {example})" if example else ")"),
    )
    if channels:
        g.add_argument(
            "--channels",
            type=int,
            choices=(1, 3),
            default=None,
            help="1 = grey images, 3 = RGB (default: the model's data config)",
        )
    if input_size:
        g.add_argument(
            "--input-size", type=int, default=None, help=f"{input_size} in pixels (default: the model's data config)"
        )
    if hflip is not None:
        g.add_argument(
            "--hflip-prob",
            type=float,
            default=hflip,
            help="horizontal-flip probability in training; 0 for digits and text (default: %(default)s)",
        )
    if min_scale is not None:
        g.add_argument(
            "--min-scale",
            type=float,
            default=min_scale,
            help="smallest area share of the training random resized crop; 1 = no crop (default: %(default)s)",
        )
    if pictures:
        g.add_argument(
            "--pictures",
            "--vis-count",
            type=int,
            default=8,
            help=f"validation images drawn into {pictures} at the end; 0 = none (default: 8)",
        )
    return g


def add_rotation_arg(g) -> None:
    """--rotation, the one random-rotation flag of the trainers that augment whole images."""
    g.add_argument(
        "--rotation",
        type=float,
        default=0.0,
        metavar="DEG",
        help="largest random rotation of a training image in degrees, either way, the uncovered corners black; "
        "0 = off (default: 0)",
    )


def add_engine_args(p: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    """Every flag of the engine's loop; `defaults` are the task's own values of TASK_DEFAULTS."""
    unknown = set(defaults) - TASK_DEFAULTS
    assert not unknown, unknown
    if "batch_size" in defaults:
        defaults["batch_size"] = TaskDefault(defaults["batch_size"])
    add_optimization_args(p.add_argument_group("optimization (every trainer)"))
    add_run_args(p.add_argument_group("run (every trainer)"))
    add_diagnostics_args(p.add_argument_group("diagnostics (every trainer, written into --out)"))
    p.set_defaults(**defaults)
    return p


def add_optimization_args(g) -> None:
    g.add_argument("--epochs", type=int, default=10, help="maximum number of epochs (default: %(default)s)")
    g.add_argument(
        "--batch-size",
        type=int,
        default=TaskDefault(32),
        help="images per step and process; under torchrun the global batch is this times the processes. Left "
        f"out, the default is lowered (to no fewer than {MIN_AUTO_BATCH}) where it would give a model with "
        f"BatchNorm fewer than {MIN_STEPS} steps per epoch, and the log says so (default: %(default)s)",
    )
    g.add_argument(
        "--optimizer",
        default="adamw",
        choices=("adamw", "sgd"),
        help="AdamW, or SGD with --momentum (default: %(default)s)",
    )
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum; AdamW's beta1 (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="decoupled weight decay (default: %(default)s)")
    g.add_argument(
        "--warmup-epochs",
        type=float,
        default=1.0,
        help="linear warm-up length before the cosine decay (default: %(default)s)",
    )
    g.add_argument(
        "--min-lr-ratio",
        type=float,
        default=0.01,
        help="final learning rate as a share of --lr; 1 = constant (default: %(default)s)",
    )
    g.add_argument(
        "--clip-grad-norm",
        type=float,
        default=0.0,
        help="clip the gradient norm to this value; 0 disables (default: %(default)s)",
    )
    g.add_argument(
        "--patience",
        type=int,
        default=0,
        help="stop after this many epochs without a better validation metric; 0 disables (default: %(default)s)",
    )
    g.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop after the epoch that passes this many minutes of training; 0 = no limit (default: %(default)s)",
    )
    g.add_argument(
        "--bn-recalibration-batches",
        type=int,
        default=50,
        help="before each evaluation, recompute BatchNorm statistics (cumulative average) over this many training "
        "batches in train mode; 0 disables (default: %(default)s)",
    )
    g.add_argument(
        "--amp",
        default="none",
        choices=("none", "bf16", "fp16"),
        help="mixed precision: bf16, or fp16 with a GradScaler; on GPUs (on a CPU both run, slowly) "
        "(default: %(default)s)",
    )


def add_run_args(g) -> None:
    g.add_argument(
        "--out",
        default=None,
        help="output folder; an existing one needs --resume or --force (default: runs/<model>-<UTC date-time>)",
    )
    g.add_argument(
        "--resume",
        default=None,
        help="checkpoint.pt, or the output folder holding it, to continue from with the same flags (default: None)",
    )
    g.add_argument(
        "--force", action="store_true", help="write into an existing --out folder, replacing its files (default: off)"
    )
    g.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda or cuda:N; under torchrun each process takes its LOCAL_RANK's GPU (default: auto)",
    )
    g.add_argument(
        "--sync-bn", action="store_true", help="under torchrun, BatchNorm statistics over all processes (default: off)"
    )
    g.add_argument(
        "--workers",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="data-loading processes (default: min(2, cores))",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads; 1 is much faster on a busy shared machine; 0 = torch's default (default: %(default)s)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed for the split, initialization and augmentation (default: %(default)s)",
    )
    g.add_argument(
        "--deterministic", action="store_true", help="deterministic algorithms only (slower on GPU) (default: off)"
    )
    g.add_argument(
        "--no-progress", action="store_true", help="no progress bar, only one line per epoch (default: progress bar on)"
    )
    g.add_argument(
        "--cache",
        default="none",
        choices=CACHE_MODES,
        help="keep decoded, resized images (and their boxes or masks) in memory or in <out>/cache so later epochs "
        "skip decoding; augmentation still runs every epoch (default: %(default)s)",
    )


def add_diagnostics_args(g) -> None:
    g.add_argument(
        "--log-grad-norms",
        action="store_true",
        help="per-layer gradient norms each epoch, vanishing/exploding layers flagged: "
        "grad_norms.csv/.png (default: off)",
    )
    g.add_argument(
        "--activation-stats",
        action="store_true",
        help="per-layer output mean, std and share of zeros on a fixed validation batch, dead layers flagged: "
        "activations.csv/.png (default: off)",
    )
    g.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="profile N training steps, after --profile-wait skipped and --profile-warmup warm-up steps, with "
        "memory: a trace under <out>/profile for Perfetto (ui.perfetto.dev) and TensorBoard's profiler plugin "
        "(tensorboard --logdir <out>/profile), and profile/top_ops.txt (default: 0, off)",
    )
    g.add_argument(
        "--profile-wait",
        type=int,
        default=1,
        metavar="STEPS",
        help="with --profile, training steps run before the profiler starts (default: %(default)s)",
    )
    g.add_argument(
        "--profile-warmup",
        type=int,
        default=1,
        metavar="STEPS",
        help="with --profile, steps profiled and thrown away before the N recorded ones (default: %(default)s)",
    )


# (lowest, highest, lowest allowed, highest allowed) of every numeric flag of every trainer
RANGES = {
    "epochs": (1, None, True, True),
    "batch_size": (1, None, True, True),
    "input_size": (8, None, True, True),
    "resize_size": (8, None, True, True),
    "latent_dim": (1, None, True, True),
    "width": (1, None, True, True),
    "knn_k": (1, None, True, True),
    "grid_size": (1, None, True, True),
    "score_samples": (2, None, True, True),
    "lr": (0, None, True, True),
    "weight_decay": (0, None, True, True),
    "momentum": (0, 1, True, False),
    "warmup_epochs": (0, None, True, True),
    "min_lr_ratio": (0, 1, True, True),
    "clip_grad_norm": (0, None, True, True),
    "patience": (0, None, True, True),
    "max_minutes": (0, None, True, True),
    "workers": (0, None, True, True),
    "threads": (0, None, True, True),
    "bn_recalibration_batches": (0, None, True, True),
    "profile": (0, None, True, True),
    "profile_wait": (0, None, True, True),
    "profile_warmup": (0, None, True, True),
    "hflip_prob": (0, 1, True, True),
    "vflip_prob": (0, 1, True, True),
    "min_scale": (0, 1, False, True),
    "label_smoothing": (0, 1, True, False),
    "threshold": (0, 1, False, False),
    "val_fraction": (0, 1, False, False),
    "eval_val_fraction": (0, 1, False, False),
    "temperature": (0, None, False, True),
    "jitter": (0, None, True, True),
    "rotation": (0, 180, True, True),
    "pictures": (0, None, True, True),
    "vis_count": (0, None, True, True),
}


def check_ranges(args) -> None:
    for dest, (lo, hi, lo_ok, hi_ok) in RANGES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        bad = (value < lo if lo_ok else value <= lo) or (hi is not None and (value > hi if hi_ok else value >= hi))
        if bad or not math.isfinite(value):
            low = f"{'>=' if lo_ok else '>'} {lo}"
            want = f"{low} and {'<=' if hi_ok else '<'} {hi}" if hi is not None else low
            raise UsageError(f"--{dest.replace('_', '-')} must be {want}, got {value}")


def resolve_device(name: str) -> torch.device:
    """auto / cpu / cuda / cuda:N, refused with one line when it is not there."""
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        match = re.fullmatch(r"cuda", name)
    if name == "cpu":
        return torch.device("cpu")
    if not match:
        raise UsageError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(
            f"--device {name}: no CUDA GPU is visible to torch {torch.__version__}; use --device cpu (or auto)"
        )
    if dist.launched():
        if match[1] is not None:
            raise UsageError(
                f"--device {name}: under torchrun give --device cuda (or auto); each process takes the "
                "GPU of its LOCAL_RANK"
            )
        index = dist.local_rank()
    else:
        index = int(match[1] or 0)
    if index >= torch.cuda.device_count():
        raise UsageError(
            f"--device cuda:{index}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}"
        )
    return torch.device("cuda", index)


def check_out(args) -> None:
    """--out: a folder (not a file) that is new unless resumed or forced."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    if not args.resume and out.is_dir() and any(out.iterdir()) and not args.force:
        raise UsageError(
            f"--out {out} already holds files; give --resume {out} to continue that run or --force to overwrite it"
        )


def load_resume(args) -> dict | None:
    """The checkpoint --resume names, checked."""
    if not args.resume:
        return None
    path = Path(args.resume)
    path = path / "checkpoint.pt" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"--resume {args.resume}: {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, pickled objects: all the same to the user
        raise UsageError(f"--resume {path} is not a readable checkpoint ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or not {"model", "state", "optimizer"} <= set(ckpt):
        raise UsageError(f"--resume {path} is not a checkpoint.pt written by these trainers")
    ckpt["path"] = str(path)
    return ckpt
