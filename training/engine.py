"""The one training loop of every task, split the way torchvision's references/detection
engine.py is: a trainer supplies a `Task` (its flags, data, model, one training step, its
evaluation, its pictures) and `cli(task, argv)` does all the rest:

- the shared flags of training.args, all checked before anything starts (a mistake is one
  line and exit 2, nothing written);
- device (auto, cpu, cuda, cuda:N), seed and --deterministic, AMP (--amp bf16|fp16, with a
  GradScaler for fp16), gradient clipping, AdamW with warm-up and cosine decay or SGD;
- torchrun: DDP (gloo on CPU, NCCL on CUDA), a distributed sampler, --sync-bn; training
  metrics summed over ranks, rank 0 evaluates and is the only one that writes;
- a training loader whose workers persist across epochs, reseeded per epoch;
- BatchNorm recalibration before evaluating, best epoch, --patience, --max-minutes;
- checkpoint.pt every epoch and --resume; metrics.csv (with peak GPU memory on CUDA),
  curves.png, model.pt + model.json;
- the progress bar, the per-epoch line and the diagnostics of training.diagnostics.

It reads top to bottom: the helpers a task calls, `Task`, one epoch (`train_one_epoch`,
`recalibrate_batchnorm`, `evaluate`, `end_epoch`), then the run (`prepare`, `fit`, `cli`).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import inspect
import json
import math
import os
import platform
import random
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Sampler, default_collate
from tqdm import tqdm

from model_defs import get_entry, get_model
from model_defs.checkpoint import atomic_torch_save, read_meta, save_model_files, unwrap
from model_defs.files import atomic_write
from model_defs.registry import parameter_counts
from model_defs.usage import UsageError
from training import distributed as dist
from training.args import MIN_AUTO_BATCH, MIN_STEPS, TaskDefault, check_out, check_ranges, load_resume, resolve_device
from training.cache import DecodeCache
from training.datasets import (
    DatasetError,
    DatasetSpec,
    SkipCollate,
    Skipped,
    random_split,
    split_source,
    stratified_split,
)
from training.diagnostics import ActivationLog, GradNormLog, StepProfiler, layer_grad_norms
from training.key_values import parse_key_values
from training.worker_seeds import EpochSeeded, EpochTagged


class TrainingError(RuntimeError):
    """The run itself failed (it diverged): one line on stderr, exit 1."""


def build_model(
    name: str, task: str, pairs: list[str], optional: dict | None = None, **fixed
) -> tuple[nn.Module, dict]:
    """A registered model of `task`, with the --model-arg pairs checked against its builder;
    returns it and the keyword arguments that rebuild it. `optional` arguments are given only
    to builders that take them."""
    try:
        entry = get_entry(name, task=task)
    except KeyError as e:
        raise UsageError(e.args[0]) from None
    params = inspect.signature(entry.builder).parameters
    fixed.update({k: v for k, v in (optional or {}).items() if k in params})
    extra = parse_key_values(pairs, "--model-arg", UsageError)
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        for key in [*extra, *fixed]:
            if key not in params:
                raise UsageError(f"--model {name} takes no argument {key!r}; it takes {', '.join(params)}")
    for key in set(extra) & set(fixed):
        raise UsageError(f"--model-arg {key}: the trainer sets {key} itself, from the data or its own flag")
    kwargs = {**fixed, **extra}
    try:
        return get_model(name, **kwargs), kwargs
    except (TypeError, ValueError, RuntimeError, OSError) as e:
        raise UsageError(f"--model {name} cannot be built with {kwargs}: {str(e).splitlines()[0]}") from None


def require_classes(args, spec, minimum: int, need: str) -> list[str]:
    """The classes of `spec`, read from --data; fewer than `minimum` is a DatasetError naming them."""
    n, names = len(spec.classes), f" ({', '.join(spec.classes)})" if spec.classes else ""
    if n < minimum:
        raise DatasetError(f"{args.data} (layout {spec.layout}) holds {n} class{'' if n == 1 else 'es'}{names}: {need}")
    return spec.classes


def builder_accepts(name: str, task: str, arg: str) -> bool:
    return arg in inspect.signature(get_entry(name, task=task).builder).parameters


# -- the pieces shared by every task -----------------------------------------------------


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def package_versions(*extra: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    for name in extra:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def write_metrics(out: Path, history: list[dict], panels: dict[str, list[str]]) -> None:
    """metrics.csv (one row per epoch) and curves.png (one panel per entry of `panels`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "metrics.csv", "w", newline="") as f:
        # Every row's columns: a run resumed on another device may add one (peak_gpu_memory_mb).
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for h in history for k in h)))
        writer.writeheader()
        writer.writerows(history)
    epochs = [h["epoch"] for h in history]
    panels = {t: [c for c in cols if c in history[0]] for t, cols in panels.items()}
    panels = {t: cols for t, cols in panels.items() if cols}
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


def to_device(x, device: torch.device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


class Task:
    """What a trainer supplies. `setup` sets `model`, `train_set`, `meta` (and may add
    `extra_modules`, trained beside the model but not saved in model.pt, e.g. the GAN's
    discriminator); `step` runs one batch and calls `update(loss, name)` once per optimizer."""

    name = ""  # model.json's "task"
    metric_name = "loss"  # model.json's metrics "name"
    monitor: str | None = None  # evaluate()'s key that picks the saved epoch (higher is better); None: the last epoch
    drop_last = False  # drop a last incomplete batch (BatchNorm needs more than one image)
    panels: dict[str, list[str]] = {}
    details: list[str] = []  # the end of the run's first line (describe), set by setup

    def __init__(self):
        self.extra_modules: dict[str, nn.Module] = {}
        self.extra_metrics: dict = {}
        self.skipped: list[str] = []
        self.optimizer_kwargs: dict[str, dict] = {}
        self.cache = DecodeCache()  # what the datasets read through; fit() sets the one --cache names
        self.args = self.device = None

    def parser(self) -> argparse.ArgumentParser:
        raise NotImplementedError

    def describe(self) -> str:
        """The run's first line, from model.json's record: the model, its classes and images,
        then the task's `details` (its input size, its kind of output)."""
        classes, data = self.meta["classes"], self.meta["dataset"]
        names = f" ({', '.join(classes)})" if len(classes) <= 12 else ""
        parts = [f"{len(classes)} classes{names}"] if classes else []
        if "val_images" in data:
            parts.append(f"{data['train_images']} train / {data['val_images']} val images")
        else:
            parts.append(f"{data['train_images']} {data['layout']}")
        return f"{self.meta['arch']}: " + ", ".join(parts + self.details)

    def check(self, args) -> None:
        """Task-specific flag checks, before anything is read (raise UsageError)."""

    def setup(self, args) -> None:
        raise NotImplementedError

    def split(self, args, spec, read_val) -> tuple[list, list, dict]:
        """(train, validation) samples of `spec` and model.json's record of them: --val-data read
        by `read_val(path, classes=...)` with the training classes, or a seeded share of --data,
        stratified by class for labelled images. The archiver and scripts/predict rebuild the
        split from the record's `val_source`."""
        if args.val_data:
            train, val, source = spec.samples, read_val(args.val_data, classes=spec.classes).samples, args.val_data
        elif isinstance(spec, DatasetSpec):
            train, val = stratified_split(spec.samples, args.val_fraction, args.seed)
            source = split_source(args.val_fraction, args.seed)
        else:
            train, val = random_split(spec.samples, args.val_fraction, args.seed, args.data)
            source = split_source(args.val_fraction, args.seed, "random")
        record = {"layout": spec.layout, "train_images": len(train), "val_images": len(val), "val_source": source}
        return train, val, {**record, "fingerprint": spec.fingerprint()}

    def record(self, args, arch_args: dict, cfg, classes: list[str], dataset: dict, **extra) -> dict:
        """model.json's fields every task writes (how to rebuild and preprocess the model, what
        it was trained on), then the task's own `extra`."""
        return {
            "arch": args.model,
            "arch_args": arch_args,
            "task": self.name,
            "classes": classes,
            "preprocessing": cfg.to_dict(),
            **extra,
            "dataset": {"root": str(Path(args.data).resolve()), **dataset},
        }

    def datasets(self) -> list:
        """Every dataset the run reads (--cache memory decodes them all before training)."""
        found = (self.train_set, getattr(self, "val_set", None), getattr(self, "calibration_set", None))
        return list({id(d): d for d in found if d is not None}.values())

    @staticmethod
    def collate(items):
        return default_collate(items)

    def sample_weights(self) -> list[float] | None:
        """Per-image sampling weights for --balance."""
        return None

    def step(self, batch, models: dict, update) -> tuple[int, dict[str, float]]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict:
        return {}

    def probe_input(self):
        """A fixed validation batch for --activation-stats."""
        data = getattr(self, "val_set", None) or self.train_set
        items = [x for x in (data[i] for i in range(min(16, len(data)))) if not isinstance(x, Skipped)]
        return self.collate(items)[0]

    def finish(self, out: Path) -> None:
        """Pictures drawn from the saved model at the end."""

    def loader(self, dataset, sampler=None, generator=None, drop_last=False, persistent=False) -> DataLoader:
        """Batches of `dataset`, read by --workers processes; `persistent` keeps them from one
        epoch to the next (the training loader's)."""
        return DataLoader(
            dataset,
            batch_size=self.args.batch_size,
            sampler=sampler,
            shuffle=False,
            generator=generator,
            drop_last=drop_last,
            num_workers=self.args.workers,
            collate_fn=SkipCollate(type(self).collate),
            pin_memory=self.device.type == "cuda",
            persistent_workers=persistent and self.args.workers > 0,
        )

    def batches(self, loader, desc: str = ""):
        """The readable batches of `loader` behind a progress bar (rank 0); skipped files are noted."""
        off = self.args.no_progress or not dist.is_main()
        for batch, skipped in tqdm(loader, desc=desc, leave=False, disable=True if off else None, dynamic_ncols=True):
            self.skipped += skipped
            if batch is not None:
                yield to_device(batch, self.device)


# -- one epoch ----------------------------------------------------------------------------

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Optimization:
    """The optimizer, learning-rate schedule and GradScaler of each trained module, and the
    one `update(loss, name)` a task's `step` calls per optimizer: backward, unscale (for
    clipping and the gradient-norm log), clip, step, schedule."""

    def __init__(self, task: Task, args, models: dict[str, nn.Module], steps: int, grads: GradNormLog | None):
        device_type = task.device.type
        self.models, self.grads, self.clip = models, grads, args.clip_grad_norm
        self.fp16 = args.amp == "fp16"
        self.params, self.optimizers, self.schedulers, self.scalers = {}, {}, {}, {}
        for name, m in models.items():
            params = self.params[name] = [p for p in m.parameters() if p.requires_grad]
            if args.optimizer == "sgd":
                opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
            else:
                kw = {"betas": (args.momentum, 0.999), **task.optimizer_kwargs.get(name, {})}
                opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, **kw)
            self.optimizers[name] = opt
            self.schedulers[name] = cosine_with_warmup(
                opt, round(args.warmup_epochs * steps), args.epochs * steps, args.min_lr_ratio
            )
            self.scalers[name] = torch.amp.GradScaler(device_type, enabled=self.fp16)

    def update(self, loss: torch.Tensor, name: str = "model") -> None:
        if not torch.isfinite(loss) and not self.fp16:  # fp16's GradScaler skips such steps itself
            raise TrainingError(self.diverged(loss))
        opt, scaler = self.optimizers[name], self.scalers[name]
        log_grads = self.grads is not None and name == "model"
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if self.clip or log_grads:
            scaler.unscale_(opt)
        norms = layer_grad_norms(unwrap(self.models[name])) if log_grads else None
        if self.clip:
            nn.utils.clip_grad_norm_(self.params[name], self.clip)
        scale = scaler.get_scale() if norms is not None else 0.0
        scaler.step(opt)
        scaler.update()
        self.schedulers[name].step()
        # A step the fp16 GradScaler skips (it lowers its scale) overflowed on purpose: not logged.
        if self.grads is not None and norms is not None and not (self.fp16 and scaler.get_scale() < scale):
            self.grads.record(norms)

    def diverged(self, loss: torch.Tensor) -> str:
        where = self.grads.first_not_finite if self.grads is not None else ""
        if where:
            return f"training diverged (loss {loss.item()}); the first NaN or infinite gradient was in {where}"
        hint = "" if self.grads is not None else " (--log-grad-norms names the layer whose gradient was first NaN)"
        return f"training diverged (loss {loss.item()}); try a lower --lr{hint}"

    @property
    def lr(self) -> float:
        return self.optimizers["model"].param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {
            "optimizer": {n: o.state_dict() for n, o in self.optimizers.items()},
            "lr_scheduler": {n: s.state_dict() for n, s in self.schedulers.items()},
            "scaler": {n: s.state_dict() for n, s in self.scalers.items()},
        }

    def load_state_dict(self, ckpt: dict) -> None:
        for name in self.models:
            self.optimizers[name].load_state_dict(ckpt["optimizer"][name])
            self.schedulers[name].load_state_dict(ckpt["lr_scheduler"][name])
            self.scalers[name].load_state_dict(ckpt["scaler"][name])


def no_update(loss: torch.Tensor, name: str = "model") -> None:
    """The `update` of a step that only runs forward (BatchNorm recalibration)."""


@dataclass
class Run:
    """What a training run carries from epoch to epoch. `state` is checkpoint.pt's record of
    the run (epochs done, best epoch, history), so --resume continues where it stopped."""

    task: Task
    args: argparse.Namespace
    device: torch.device
    out: Path
    models: dict[str, nn.Module]
    optimization: Optimization
    sampler: Sampler  # the training loader's: set_epoch reshuffles
    loader: DataLoader
    meta: dict
    state: dict
    grads: GradNormLog | None = None
    acts: ActivationLog | None = None
    profiler: StepProfiler | None = None
    started: float = field(default_factory=time.time)

    def autocast(self):
        dtype = AMP_DTYPES.get(self.args.amp)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def train_one_epoch(run: Run, epoch: int) -> dict[str, float]:
    """One pass over the training set; returns the image-weighted mean of each value the task's
    step reports, summed over the ranks."""
    task, args = run.task, run.args
    # Every epoch's randomness depends only on (seed, epoch, rank), so a resumed run repeats it.
    torch.manual_seed(args.seed + epoch + 100_003 * dist.rank())
    run.sampler.set_epoch(epoch)
    task.skipped, task.epoch = [], epoch
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    for m in run.models.values():
        m.train()
    sums: dict[str, float] = defaultdict(float)
    seen = 0
    for batch in task.batches(run.loader, f"epoch {epoch}/{args.epochs} train"):
        with run.autocast():
            n, values = task.step(batch, run.models, run.optimization.update)
        seen += n
        for k, v in values.items():
            sums[k] += v * n
        if run.profiler:
            run.profiler.step()
    keys = sorted(sums)
    totals = dist.sum_over_ranks([seen] + [sums[k] for k in keys], run.device)
    return {k: v / max(1, totals[0]) for k, v in zip(keys, totals[1:])}


@torch.no_grad()
def recalibrate_batchnorm(run: Run, epoch: int) -> None:
    """Recompute every BatchNorm's running statistics as the cumulative average (momentum
    None) over --bn-recalibration-batches batches of training images in train mode (the
    task's `calibration_set`: its training images as evaluation sees them, else its training
    set), so the saved model's eval-mode answers match the weights it has, however few steps
    an epoch had (torch.optim.swa_utils.update_bn does the same for averaged weights)."""
    task, seed = run.task, run.args.seed + epoch
    calibration = getattr(task, "calibration_set", task.train_set)
    loader = task.loader(calibration, dist.train_sampler(calibration, seed))
    layers = [
        m
        for model in run.models.values()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    for model in run.models.values():
        model.train()
    for i, batch in enumerate(task.batches(loader, "BatchNorm recalibration")):
        if i >= run.args.bn_recalibration_batches:
            break
        with run.autocast():
            task.step(batch, run.models, no_update)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum


def peak_gpu_memory_mb(device: torch.device) -> float | None:
    """The most GPU memory tensors held since the epoch began (torch.cuda.max_memory_allocated,
    reset at each epoch's start), in MiB, the highest of all ranks; None off CUDA."""
    if device.type != "cuda":
        return None
    return max(dist.gather_lists([round(torch.cuda.max_memory_allocated(device) / 2**20, 1)]))


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """The task's validation metrics of the model as it is saved (eval mode, unwrapped)."""
    model = unwrap(run.models["model"]).eval()
    with run.autocast():
        return run.task.evaluate(model)


def record_epoch(
    run: Run, epoch: int, train: dict, va: dict, skipped: list[str], seconds: float, peak: float | None
) -> tuple[dict, bool]:
    """Rank 0: the epoch's row in the history; model.pt and model.json when the monitored
    metric improved; checkpoint.pt and metrics.csv always. Returns the row and whether it
    improved."""
    task, state = run.task, run.state
    state["skipped_files"] = sorted(set(state["skipped_files"]) | set(skipped))
    row = {
        "epoch": epoch,
        "lr": run.optimization.lr,
        **{f"train_{k}": v for k, v in train.items()},
        **{f"val_{k}": v for k, v in va.items() if isinstance(v, (int, float))},
        "skipped_images": len(skipped),
        "seconds": round(seconds, 2),
        **({"peak_gpu_memory_mb": peak} if peak is not None else {}),
    }
    state["history"].append(row)
    state["epoch"] = epoch
    improved = task.monitor is None or va[task.monitor] > state["best_metric"] or not state["best_epoch"]
    if improved:
        state.update(best_metric=va[task.monitor] if task.monitor else math.nan, best_epoch=epoch, stale_epochs=0)
        run.meta["metrics"] = {
            "name": task.metric_name,
            "best_val": va.get(task.monitor),
            "best_epoch": epoch,
            **va,
            **task.extra_metrics,
        }
        run.meta["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        save_model_files(run.out, run.models["model"], run.meta)
    else:
        state["stale_epochs"] += 1
    checkpoint = {
        "model": unwrap(run.models["model"]).state_dict(),
        "modules": {n: unwrap(run.models[n]).state_dict() for n in task.extra_modules},
        **run.optimization.state_dict(),
        "state": state,
        "args": vars(run.args),
    }
    atomic_torch_save(checkpoint, run.out / "checkpoint.pt")
    write_metrics(run.out, state["history"], task.panels)
    return row, improved


def diagnose(run: Run, epoch: int) -> list[str]:
    """The --log-grad-norms and --activation-stats files of the epoch; one warning per flagged layer."""
    notes = []
    if run.grads:
        notes += run.grads.end_epoch(epoch)
    if run.acts:
        model = unwrap(run.models["model"])
        notes += run.acts.end_epoch(epoch, model, to_device(run.task.probe_input(), run.device))
    return notes


def stop_reason(run: Run, epoch: int) -> str | None:
    """Why the run ends before --epochs: --patience or --max-minutes."""
    args = run.args
    if epoch >= args.epochs:
        return None
    if args.patience and run.state["stale_epochs"] >= args.patience:
        return f"early stop: no better validation {run.task.monitor} for {args.patience} epochs"
    if args.max_minutes and time.time() - run.started > args.max_minutes * 60:
        return f"stopping: --max-minutes {args.max_minutes:g} reached"
    return None


def end_epoch(
    run: Run, epoch: int, train: dict, va: dict, skipped: list[str], seconds: float, peak: float | None
) -> str | None:
    """Rank 0: record the epoch, write its diagnostics, print its line; returns why the run
    stops here, if it does. An unreadable file is named the first epoch it is met; the
    epoch lines after that give the count."""
    run.state["train_seconds"] += seconds
    named = set(run.state["skipped_files"])
    row, improved = record_epoch(run, epoch, train, va, skipped, seconds, peak)
    notes = diagnose(run, epoch)
    log(epoch_line(epoch, run.args.epochs, train, va, improved, row))
    new = [f for f in skipped if f not in named]
    if new:
        more = f" and {len(new) - 20} more (model.json lists them)" if len(new) > 20 else ""
        log(f"  {len(new)} unreadable file(s) left out: {', '.join(new[:20])}{more}")
    for note in notes:
        log(f"  warning: {note}")
    return stop_reason(run, epoch)


def epoch_line(epoch: int, epochs: int, train: dict, va: dict, improved: bool, row: dict) -> str:
    def fmt(d):
        return "  ".join(f"{k} {v:.4f}" for k, v in d.items() if isinstance(v, (int, float)))

    line = f"epoch {epoch}/{epochs}  train {fmt(train)}"
    if fmt(va):
        line += f"  |  val {fmt(va)}{' *' if improved else ''}"
    line += f"  |  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
    if row["skipped_images"]:
        line += f"  |  skipped {row['skipped_images']} unreadable"
    return line


# -- the run ------------------------------------------------------------------------------


def check_run(task: Task, args) -> torch.device:
    """Every flag checked before anything is read or written; returns the device."""
    check_ranges(args)
    task.check(args)
    device = resolve_device(args.device)
    if args.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use --amp fp16")
    if args.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA devices: torch's SyncBatchNorm runs on GPUs only")
    if args.sync_bn and not dist.launched():
        raise UsageError("--sync-bn needs several processes; start the trainer with torchrun --nproc_per_node N")
    if getattr(args, "weights_path", None) and not Path(args.weights_path).is_file():
        raise UsageError(f"--weights-path {args.weights_path} does not exist")
    return device


def claim_out(args) -> None:
    """--out (default runs/<model>-<UTC time>, one name for all ranks), checked by rank 0 alone:
    the others would see the folder it is about to fill."""
    stamp = dist.from_main(dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S"))
    args.out = args.out or f"runs/{args.model}-{stamp}"
    problem = None
    if dist.is_main():
        try:
            check_out(args)
        except UsageError as e:
            problem = str(e)
    problem = dist.from_main(problem)
    if problem:
        raise UsageError(problem)


def distribute(task: Task, args, device: torch.device) -> dict[str, nn.Module]:
    """The task's model and extra modules on the device, with SyncBatchNorm and DDP under torchrun."""
    models = {"model": task.model, **task.extra_modules}
    for name, m in models.items():
        m.to(device)
        if args.sync_bn:
            m = nn.SyncBatchNorm.convert_sync_batchnorm(m)
        if dist.world_size() > 1 and any(p.requires_grad for p in m.parameters()):
            m = nn.parallel.DistributedDataParallel(m, device_ids=[device.index] if device.type == "cuda" else None)
        models[name] = m
    return models


def steps_per_epoch(task: Task, args, sampler: Sampler, models: dict) -> tuple[int, bool]:
    """Optimizer steps per epoch and whether the last incomplete batch is dropped. Too few steps
    leave BatchNorm's running statistics behind the weights: a default --batch-size is then
    lowered, saying so; one given on the command line is kept, with a warning."""
    n, per = len(sampler), " per process" if dist.world_size() > 1 else ""
    batchnorm = any(has_batchnorm(m) for m in models.values())
    default = isinstance(args.batch_size, TaskDefault)
    args.batch_size = int(args.batch_size)  # checkpoint.pt's args hold plain values

    def count(batch_size: int) -> int:
        drop = task.drop_last and n > batch_size
        return max(1, n // batch_size if drop else math.ceil(n / batch_size))

    lowered = max(MIN_AUTO_BATCH, n // MIN_STEPS)
    if default and batchnorm and count(args.batch_size) < MIN_STEPS and lowered < args.batch_size:
        log(
            f"--batch-size {lowered}: the default {args.batch_size} gives {n} training images{per} only "
            f"{count(args.batch_size)} step(s) per epoch, too few for BatchNorm; {lowered} gives "
            f"{count(lowered)} (give --batch-size to choose)"
        )
        args.batch_size = lowered
    elif batchnorm and count(args.batch_size) < MIN_STEPS:
        log(
            f"warning: {n} training images{per} at --batch-size {args.batch_size} give only "
            f"{count(args.batch_size)} step(s) per epoch: too few for BatchNorm's running statistics to follow "
            "the weights; they are recalibrated before each evaluation, but a smaller --batch-size trains better"
        )
    return count(args.batch_size), task.drop_last and n > args.batch_size


def training_loader(task: Task, args, sampler: Sampler, drop_last: bool) -> tuple[Sampler, DataLoader]:
    """The training set's loader, made once: its --workers processes persist from epoch to
    epoch and reseed themselves at each epoch's first item (training.worker_seeds), so an
    epoch's augmentation depends on (seed, epoch, worker) alone. The generator gives the
    loader's own draw, which would otherwise come from torch's global random stream."""
    generator = torch.Generator().manual_seed(args.seed)
    if args.workers == 0:
        return sampler, task.loader(task.train_set, sampler, generator, drop_last)
    tagged = EpochTagged(sampler)
    return tagged, task.loader(EpochSeeded(task.train_set, args.seed), tagged, generator, drop_last, persistent=True)


def run_meta(task: Task, args, device: torch.device) -> dict:
    """model.json's record of the task and of how it was trained."""
    return {
        **task.meta,
        "versions": task.meta.get("versions") or package_versions(),
        "training": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "processes": dist.world_size(),
            "global_batch_size": args.batch_size * dist.world_size(),
            "amp": args.amp,
            "optimizer": args.optimizer,
            "profile": (
                {"wait": args.profile_wait, "warmup": args.profile_warmup, "active": args.profile}
                if args.profile
                else None
            ),
        },
        "parameters": parameter_counts(task.model),
    }


def fresh_state() -> dict:
    return {
        "epoch": 0,
        "best_metric": -math.inf,
        "best_epoch": 0,
        "stale_epochs": 0,
        "history": [],
        "train_seconds": 0.0,
        "train_cpu_seconds": 0.0,
        "skipped_files": [],
    }


def prepare(task: Task, args, device: torch.device) -> Run:
    """Seed, data, model, optimizers and diagnostics of a run, from --resume when given."""
    ckpt = load_resume(args)
    seed_everything(args.seed, args.deterministic)
    if args.threads:
        torch.set_num_threads(args.threads)
    task.args, task.device = args, device
    task.cache = DecodeCache(args.cache, Path(args.out) / "cache")
    task.setup(args)
    task.cache.fill(task.datasets(), not args.no_progress and dist.is_main())
    out, main = Path(args.out), dist.is_main()
    models = distribute(task, args, device)
    weights = task.sample_weights() if getattr(args, "balance", False) else None
    sampler = dist.train_sampler(task.train_set, args.seed, weights)
    steps, drop_last = steps_per_epoch(task, args, sampler, models)
    sampler, loader = training_loader(task, args, sampler, drop_last)
    grads = GradNormLog(out) if args.log_grad_norms and main else None
    optimization = Optimization(task, args, models, steps, grads)
    state = fresh_state()
    if ckpt is not None:
        try:
            for name, m in models.items():
                unwrap(m).load_state_dict(ckpt["model"] if name == "model" else ckpt["modules"][name])
            optimization.load_state_dict(ckpt)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise UsageError(
                f"--resume {ckpt['path']} does not match this model and these flags ({str(e).splitlines()[0][:160]})"
            ) from None
        state = ckpt["state"]
        log(f"resumed from {ckpt['path']} after epoch {state['epoch']}")
    acts = ActivationLog(out) if args.activation_stats and main else None
    meta = run_meta(task, args, device)
    return Run(task, args, device, out, models, optimization, sampler, loader, meta, state, grads, acts)


def fit(task: Task, args) -> dict:
    """Train `task` with `args`; returns the final model.json (on rank 0)."""
    device = check_run(task, args)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init(device)
    claim_out(args)
    run = prepare(task, args, device)
    main = dist.is_main()
    if main:
        run.out.mkdir(parents=True, exist_ok=True)  # only now: every input has been checked
    world = dist.world_size()
    log(
        f"{task.describe()}, on {device}"
        + (f" x {world} processes" if world > 1 else "")
        + (f", AMP {args.amp}" if args.amp != "none" else "")
    )
    if args.profile and main:
        run.profiler = StepProfiler(
            run.out, args.profile_wait, args.profile_warmup, args.profile, device.type == "cuda"
        )
    run.started = time.time()
    for epoch in range(run.state["epoch"] + 1, args.epochs + 1):
        start, cpu_start = time.time(), time.process_time()
        train = train_one_epoch(run, epoch)
        if args.bn_recalibration_batches and any(has_batchnorm(m) for m in run.models.values()):
            recalibrate_batchnorm(run, epoch)
        va = evaluate(run) if main else {}
        skipped = sorted(set(dist.gather_lists(task.skipped)))
        peak = peak_gpu_memory_mb(run.device)
        stop = None
        if main:
            run.state["train_cpu_seconds"] += time.process_time() - cpu_start
            stop = end_epoch(run, epoch, train, va, skipped, time.time() - start, peak)
        stop = dist.from_main(stop)
        if stop:
            log(stop)
            break
    if run.profiler and (note := run.profiler.finish()):
        log(f"warning: {note}")
    return finish(run) if main else {}


def finish(run: Run) -> dict:
    """model.json describes model.pt (the best epoch) and the whole run; the task draws its pictures."""
    state, task = run.state, run.task
    final = read_meta(run.out)
    final["metrics"].update(
        epochs_run=state["epoch"],
        train_seconds=round(state["train_seconds"], 1),
        train_cpu_seconds=round(state["train_cpu_seconds"], 1),
        skipped_images=len(state["skipped_files"]),
        skipped_files=state["skipped_files"][:1000],
    )
    peaks = [h["peak_gpu_memory_mb"] for h in state["history"] if "peak_gpu_memory_mb" in h]
    if peaks:
        final["metrics"]["peak_gpu_memory_mb"] = max(peaks)
    atomic_write(run.out / "model.json", (json.dumps(final, indent=2) + "\n").encode())
    task.finish(run.out)
    best = (
        f"best validation {task.monitor} {state['best_metric']:.4f} at epoch {state['best_epoch']}; "
        if task.monitor
        else ""
    )
    log(f"{best}wrote {run.out}/model.pt and model.json")
    return final


def cli(task: Task, argv: list[str] | None = None) -> int:
    """Parse, check, train. Mistakes are one `error:` line and exit 2, a failed run exit 1."""
    try:
        args = task.parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or a usage mistake already answered in one line (2)
        return e.code
    try:
        fit(task, args)
    except (ValueError, KeyError) as e:
        log(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
        return 2
    except TrainingError as e:
        log(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        log(f"interrupted; continue with --resume {args.out}")
        return 130
    finally:
        dist.close()
    return 0


def entry_points(task_class: type[Task]):
    """A trainer module's `cli(argv) -> exit code` and `get_args_parser()`."""
    return (lambda argv=None: cli(task_class(), argv)), (lambda: task_class().parser())


def log(message: str) -> None:
    """Print on rank 0 only (the environment tells the ranks apart before the group exists)."""
    if dist.rank() == 0 and os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
