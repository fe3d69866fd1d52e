"""Train any registered classifier on an image dataset and write a servable checkpoint.

    python -m training.train --data data/digits/train --model small_cnn --channels 1 --out runs/digits

The output folder receives `model.pt` (the best epoch's state_dict), `model.json` (how to
rebuild and preprocess it, its classes and metrics), `checkpoint.pt` (the last epoch, for
--resume), `metrics.csv` and `curves.png`. `scripts/archive` packs the first two.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm import tqdm

from model_defs import get_entry, get_model
from model_defs.checkpoint import CheckpointError, atomic_torch_save, atomic_write_bytes, save_model_files, unwrap
from model_defs.preprocessing import eval_transform, train_transform
from training.common import add_run_args, cosine_with_warmup, package_versions, parse_model_args, run_cli, start_run, write_metrics
from training.datasets import (
    LAYOUTS,
    ImageDataset,
    collate_skipping,
    read_dataset,
    split_source,
    stratified_split,
)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="training dataset folder (required)")
    g.add_argument("--layout", default="auto", choices=LAYOUTS,
                   help="dataset layout: class folders, images/ + labels.txt, or images/ + labels/*.txt (default: auto, detected)")
    g.add_argument("--val-data", default=None, help="validation dataset folder; if not given a stratified share of --data is held out (default: None)")
    g.add_argument("--val-fraction", type=float, default=0.2, help="share of each class held out for validation when --val-data is not given (default: 0.2)")
    g.add_argument("--balance", action="store_true", help="sample classes equally often (weighted sampler) for class-imbalanced data (default: off)")
    g.add_argument("--multi-label", action="store_true",
                   help="train with sigmoid/BCE and multi-label output even if every image has one label (default: off; on automatically when an image has several labels)")
    g.add_argument("--threshold", type=float, default=0.5, help="probability over which a label is predicted, multi-label only (default: 0.5)")
    g.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="data-loading processes (default: min(2, cores))")

    g = p.add_argument_group("model and preprocessing")
    g.add_argument("--model", default="small_cnn", help="registered model name, see `python -m model_defs` (default: small_cnn)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword argument for the model builder, value parsed as YAML; repeatable (default: none)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None, help="1 = train on grey images, 3 = RGB (default: the model's data config)")
    g.add_argument("--input-size", type=int, default=None, help="center-crop / training crop size in pixels (default: the model's data config)")
    g.add_argument("--resize-size", type=int, default=None, help="shorter side before the center crop at eval (default: the model's data config)")
    g.add_argument("--weights-path", default=None, help="local state_dict to start from (transfer learning; models that accept it) (default: None)")
    g.add_argument("--freeze-backbone", action="store_true", help="train only the new head (models that accept it) (default: off)")
    g.add_argument("--hflip-prob", type=float, default=0.5, help="horizontal-flip probability in training augmentation; 0 for digits and text (default: 0.5)")
    g.add_argument("--min-scale", type=float, default=0.6, help="smallest area share of the random resized crop (default: 0.6)")

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=15, help="maximum number of epochs (default: 15)")
    g.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of AdamW (default: 2e-3)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default: 0.05)")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up length before the cosine decay (default: 1.0)")
    g.add_argument("--min-lr-ratio", type=float, default=0.01, help="final learning rate as a share of --lr (default: 0.01)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the cross-entropy loss (default: 0.0)")
    g.add_argument("--clip-grad-norm", type=float, default=1.0, help="clip the gradient norm to this value; 0 disables (default: 1.0)")
    g.add_argument("--patience", type=int, default=5, help="stop after this many epochs without a better validation metric; 0 disables (default: 5)")
    g.add_argument("--no-amp", action="store_true", help="disable mixed precision on CUDA (AMP is never used on CPU) (default: AMP on when on CUDA)")

    g = p.add_argument_group("run")
    add_run_args(g)
    g.add_argument("--out", default=None, help="output folder (default: runs/<model>)")
    g.add_argument("--resume", default=None, help="checkpoint.pt (or an output folder holding one) to continue from; give the same flags as the interrupted run (default: None)")
    return p


# -- set-up ---------------------------------------------------------------------------


def build_model(args, num_classes: int, data_config) -> tuple[nn.Module, dict]:
    """Build through the registry; returns the model and the arguments to rebuild it."""
    entry = get_entry(args.model)
    accepted = inspect.signature(entry.builder).parameters
    kwargs = {"num_classes": num_classes, **parse_model_args(args.model_arg)}
    if "in_channels" in accepted:
        kwargs["in_channels"] = data_config.channels
    elif data_config.channels != 3:
        raise ValueError(f"model {args.model} takes RGB input only; drop --channels {data_config.channels}")
    if "image_size" in accepted:
        kwargs.setdefault("image_size", data_config.input_size)
    for flag, key in ((args.weights_path, "weights_path"), (args.freeze_backbone, "freeze_backbone")):
        if flag:
            if key not in accepted:
                raise ValueError(f"model {args.model} does not support --{key.replace('_', '-')}")
            kwargs[key] = flag
    model = get_model(args.model, **kwargs)
    # The starting weights are folded into model.pt; rebuilding needs only the architecture.
    rebuild_args = {k: v for k, v in kwargs.items() if k not in ("weights_path", "freeze_backbone")}
    return model, rebuild_args


# -- one epoch of training, one evaluation ----------------------------------------------


def batch_metric(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool, threshold: float) -> tuple[float, float]:
    """(numerator, denominator): correct/total for accuracy, 2TP/(2TP+FP+FN) for micro-F1."""
    if multi_label:
        pred = torch.sigmoid(logits) >= threshold
        truth = targets >= 0.5
        tp = (pred & truth).sum().item()
        return 2 * tp, 2 * tp + (pred & ~truth).sum().item() + (~pred & truth).sum().item()
    return (logits.argmax(1) == targets).sum().item(), targets.numel()


def run_epoch(model, loader, criterion, device, args, multi_label, *, optimizer=None, scheduler=None, scaler=None, desc=""):
    """Train (when an optimizer is given) or evaluate over one pass of `loader`."""
    training = optimizer is not None
    model.train(training)
    loss_sum, seen, num, den, skipped = 0.0, 0, 0.0, 0.0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=True if args.no_progress else None, dynamic_ncols=True)
    use_amp = scaler is not None and scaler.is_enabled() or (not training and device.type == "cuda" and not args.no_amp)
    with torch.set_grad_enabled(training):
        for images, targets, n_skipped in bar:
            skipped += n_skipped
            if images is None:
                continue
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                logits = model(images)
                loss = criterion(logits.float(), targets)
            if training:
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if args.clip_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
            n = images.shape[0]
            loss_sum += loss.item() * n
            seen += n
            a, b = batch_metric(logits.detach().float(), targets, multi_label, args.threshold)
            num, den = num + a, den + b
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    return {"loss": loss_sum / max(1, seen), "metric": num / den if den else 0.0, "skipped": skipped}


# -- outputs ------------------------------------------------------------------------------


# -- main ---------------------------------------------------------------------------------


def main(args) -> dict:
    """Train; returns the metadata written to model.json."""
    device = start_run(args)
    out = Path(args.out or f"runs/{args.model}")

    train_spec = read_dataset(args.data, args.layout)
    classes = train_spec.classes
    if args.val_data:
        val_spec = read_dataset(args.val_data, args.layout, classes=classes)
        train_samples, val_samples = train_spec.samples, val_spec.samples
    else:
        train_samples, val_samples = stratified_split(train_spec.samples, args.val_fraction, args.seed)
    multi_label = args.multi_label or train_spec.multi_label

    entry = get_entry(args.model, task="classification")
    data_config = entry.data_config.replace(channels=args.channels, input_size=args.input_size, resize_size=args.resize_size)
    model, arch_args = build_model(args, len(classes), data_config)
    model.to(device)
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be good

    train_set = ImageDataset(train_samples, len(classes), multi_label, data_config.channels,
                             train_transform(data_config, hflip_prob=args.hflip_prob, min_scale=args.min_scale))
    val_set = ImageDataset(val_samples, len(classes), multi_label, data_config.channels, eval_transform(data_config))
    if multi_label:
        criterion = nn.BCEWithLogitsLoss()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    metric_name = "f1" if multi_label else "accuracy"

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    scheduler = cosine_with_warmup(optimizer, round(args.warmup_epochs * steps_per_epoch),
                                   args.epochs * steps_per_epoch, args.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and not args.no_amp)

    state = {"epoch": 0, "best_metric": -1.0, "best_epoch": 0, "stale_epochs": 0, "history": []}
    if args.resume:
        path = Path(args.resume)
        path = path / "checkpoint.pt" if path.is_dir() else path
        if not path.is_file():
            raise CheckpointError(f"resume checkpoint {path} does not exist")
        ckpt = torch.load(path, map_location=device, weights_only=True)
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["lr_scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        state = ckpt["state"]
        print(f"resumed from {path} after epoch {state['epoch']}", file=sys.stderr)

    fingerprint = train_spec.fingerprint()
    meta = {
        "arch": args.model,
        "arch_args": arch_args,
        "task": "classification",
        "multi_label": multi_label,
        "threshold": args.threshold,
        "classes": classes,
        "preprocessing": data_config.to_dict(),
        "dataset": {"root": str(Path(args.data).resolve()), "layout": train_spec.layout,
                    "train_images": len(train_samples), "val_images": len(val_samples),
                    "val_source": args.val_data or split_source(args.val_fraction, args.seed),
                    "fingerprint": fingerprint},
        "init_weights": args.weights_path,
        "versions": package_versions(),
    }
    print(f"{args.model}: {len(classes)} classes, {len(train_samples)} train / {len(val_samples)} val images, "
          f"{'multi-label' if multi_label else 'single-label'}, {data_config.channels}x{data_config.input_size}px, on {device}",
          file=sys.stderr)

    loader_kw = dict(batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_skipping,
                     pin_memory=device.type == "cuda")
    val_loader = DataLoader(val_set, shuffle=False, **loader_kw)
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        start = time.time()
        # Every epoch's randomness depends only on (seed, epoch), so a resumed run repeats it.
        torch.manual_seed(args.seed + epoch)
        generator = torch.Generator().manual_seed(args.seed + epoch)
        if args.balance and not multi_label:
            counts = Counter(s.labels[0] for s in train_samples)
            weights = [1.0 / counts[s.labels[0]] for s in train_samples]
            sampler = WeightedRandomSampler(weights, len(weights), replacement=True, generator=generator)
            train_loader = DataLoader(train_set, sampler=sampler, **loader_kw)
        else:
            train_loader = DataLoader(train_set, shuffle=True, generator=generator, **loader_kw)
        tr = run_epoch(model, train_loader, criterion, device, args, multi_label, optimizer=optimizer,
                       scheduler=scheduler, scaler=scaler, desc=f"epoch {epoch}/{args.epochs} train")
        va = run_epoch(model, val_loader, criterion, device, args, multi_label, desc=f"epoch {epoch}/{args.epochs} val")
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": tr["loss"], "train_metric": tr["metric"],
               "val_loss": va["loss"], "val_metric": va["metric"], "skipped_images": tr["skipped"] + va["skipped"],
               "seconds": round(time.time() - start, 2)}
        state["history"].append(row)
        state["epoch"] = epoch
        improved = va["metric"] > state["best_metric"]
        if improved:
            state.update(best_metric=va["metric"], best_epoch=epoch, stale_epochs=0)
        else:
            state["stale_epochs"] += 1
        meta["metrics"] = {"name": metric_name, "best_val": state["best_metric"], "best_epoch": state["best_epoch"],
                           "epochs_run": epoch, "skipped_images": sum(h["skipped_images"] for h in state["history"])}
        meta["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        if improved:
            save_model_files(out, model, meta)
        atomic_torch_save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                           "lr_scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                           "state": state, "args": {k: v for k, v in vars(args).items()}}, out / "checkpoint.pt")
        write_metrics(out, state["history"], {"loss": ["train_loss", "val_loss"], metric_name: ["train_metric", "val_metric"]})
        skipped = f" | skipped {row['skipped_images']} unreadable" if row["skipped_images"] else ""
        print(f"epoch {epoch}/{args.epochs}  train loss {tr['loss']:.4f} {metric_name} {tr['metric']:.4f}  |  "
              f"val loss {va['loss']:.4f} {metric_name} {va['metric']:.4f}{' *' if improved else ''}  |  "
              f"lr {row['lr']:.2e}  {row['seconds']:.1f}s{skipped}", file=sys.stderr)
        if args.patience and state["stale_epochs"] >= args.patience and epoch < args.epochs:
            print(f"early stop: no better validation {metric_name} for {args.patience} epochs", file=sys.stderr)
            break

    # model.json always describes model.pt (the best epoch) and the whole run's history.
    meta_path = out / "model.json"
    final = json.loads(meta_path.read_text())
    final["metrics"]["epochs_run"] = state["epoch"]
    final["metrics"]["skipped_images"] = meta["metrics"]["skipped_images"]
    atomic_write_bytes(meta_path, (json.dumps(final, indent=2) + "\n").encode())
    print(f"best validation {metric_name} {state['best_metric']:.4f} at epoch {state['best_epoch']}; wrote {out}/model.pt and model.json",
          file=sys.stderr)
    return final


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, get_args_parser(), argv, interrupted_hint="; continue with --resume <out>/checkpoint.pt")


if __name__ == "__main__":
    sys.exit(cli())
