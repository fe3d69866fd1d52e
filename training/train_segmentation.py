"""Train a registered segmentation model on images + PNG class-index masks.

    python -m training.shapes --out data/shapes_masks --layout masks --n 400
    python -m training.train_segmentation --data data/shapes_masks --model unet --out runs/unet

The data is root/images/* + root/masks/<stem>.png (uint8 class index per pixel, 0 =
background, 255 = ignored) + root/classes.txt, read and checked by
training.det_datasets.read_masks (a mask of the wrong size or a missing file is an error
naming the file, before training starts). Each epoch reports mean IoU and pixel accuracy
on the validation images, scored at their original size exactly as the segmentation
handler answers: whole image resized to the input size, logits scaled back, argmax.
`predictions.png` shows validation images with the best model's mask over them, the true
mask and the predicted one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from model_defs import get_entry, get_model
from model_defs.checkpoint import atomic_write_bytes, read_meta, save_model_files
from model_defs.preprocessing import load_image, logits_to_mask, segmentation_train_transform, segmentation_transform
from training.common import add_run_args, cosine_with_warmup, package_versions, parse_model_args, run_cli, start_run, write_metrics
from training.datasets import DatasetError
from training.det_datasets import IGNORE_INDEX, SegmentationDataset, read_masks


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="dataset folder: images/ + masks/ + classes.txt (required)")
    g.add_argument("--val-data", default=None, help="validation dataset folder, same layout (default: a share of --data)")
    g.add_argument("--val-fraction", type=float, default=0.2, help="share of --data held out when --val-data is not given (default: 0.2)")
    g.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="data-loading processes (default: min(2, cores))")

    g = p.add_argument_group("model and augmentation")
    g.add_argument("--model", default="unet", help="registered segmentation model, see `python -m model_defs` (default: unet)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword argument for the model builder, value parsed as YAML, e.g. depth=3; repeatable (default: none)")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None, help="1 = grey, 3 = RGB (default: the model's data config)")
    g.add_argument("--input-size", type=int, default=None, help="side of the square the whole image is resized to (default: the model's data config)")
    g.add_argument("--hflip-prob", type=float, default=0.5, help="horizontal-flip probability in training (default: 0.5)")
    g.add_argument("--min-scale", type=float, default=1.0, help="smallest area share of a random square crop; 1 = no crop (default: 1.0)")

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=30, help="maximum number of epochs (default: 30)")
    g.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    g.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (default: 3e-3)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up before the cosine decay (default: 1.0)")
    g.add_argument("--patience", type=int, default=0, help="stop after this many epochs without a better mIoU; 0 disables (default: 0)")
    g.add_argument("--max-minutes", type=float, default=0, help="stop after the epoch that passes this many minutes of training; 0 = no limit (default: 0)")

    g = p.add_argument_group("run")
    add_run_args(g)
    g.add_argument("--out", default="runs/segmentation", help="output folder (default: runs/segmentation)")
    g.add_argument("--vis-count", type=int, default=8, help="validation images drawn in predictions.png (default: 8)")
    return p


def collate(batch: list):
    """Stack the readable (image, mask) pairs; returns (images, masks, skipped)."""
    good = [b for b in batch if b is not None]
    if not good:
        return None, None, len(batch)
    return torch.stack([g[0] for g in good]), [g[1] for g in good], len(batch) - len(good)


def train_one_epoch(model, loader, criterion, optimizer, scheduler, device, desc, no_progress) -> dict:
    model.train()
    loss_sum, seen, skipped = 0.0, 0, 0
    bar = tqdm(loader, desc=desc, leave=False, disable=True if no_progress else None, dynamic_ncols=True)
    for images, masks, n_skipped in bar:
        skipped += n_skipped
        if images is None:
            continue
        images, masks = images.to(device), torch.stack(masks).to(device)
        loss = criterion(model(images), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item() * images.shape[0]
        seen += images.shape[0]
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    return {"loss": loss_sum / max(1, seen), "skipped": skipped}


def scores(confusion: np.ndarray) -> dict:
    """mIoU over the classes present in truth or prediction, pixel accuracy, per-class IoU."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return {"miou": float(np.nanmean(iou)) if np.any(union > 0) else 0.0,
            "pixel_accuracy": float(tp.sum() / max(1, confusion.sum())),
            "iou": [None if math.isnan(v) else float(v) for v in iou]}


@torch.no_grad()
def evaluate(model, loader, num_classes: int, device, desc="", no_progress=True) -> dict:
    """Scores at each image's original size: the served mask against the true mask."""
    model.eval()
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for images, masks, _ in tqdm(loader, desc=desc, leave=False, disable=True if no_progress else None):
        if images is None:
            continue
        logits = model(images.to(device)).float().cpu()
        for item, truth in zip(logits, masks):
            truth = truth.numpy()
            pred = logits_to_mask(item, truth.shape)
            keep = truth != IGNORE_INDEX
            confusion += np.bincount(truth[keep].astype(np.int64) * num_classes + pred[keep],
                                     minlength=num_classes**2).reshape(num_classes, num_classes)
    return scores(confusion)


def colour_mask(mask: np.ndarray) -> Image.Image:
    """Class-index mask → RGB, in the overlay colours of training.draw (background black)."""
    from training.draw import colour

    lut = np.array([(0, 0, 0)] + [colour(k - 1) for k in range(1, 256)], dtype=np.uint8)
    return Image.fromarray(lut[mask])


@torch.no_grad()
def draw_predictions(model, samples, classes, cfg, device, path: Path, cell: int = 256) -> None:
    """One row per validation image: the prediction over the image, the true mask, the
    predicted mask (each scaled up to `cell` pixels so small images stay readable)."""
    from training.draw import draw_mask, grid

    model.eval()
    tf = segmentation_transform(cfg)
    tiles = []
    for s in samples:
        image = load_image(s.image, cfg.channels)
        with Image.open(s.mask) as m:
            truth = np.asarray(m, dtype=np.uint8).copy()
        truth[truth == IGNORE_INDEX] = 0
        pred = logits_to_mask(model(tf(image)[None].to(device))[0].cpu(), (image.height, image.width))
        scale = max(1.0, cell / max(image.size))
        size = (round(image.width * scale), round(image.height * scale))
        tiles += [draw_mask(image, pred, classes).resize(size, Image.Resampling.BILINEAR),
                  colour_mask(truth).resize(size, Image.Resampling.NEAREST),
                  colour_mask(pred).resize(size, Image.Resampling.NEAREST)]
    grid(tiles, columns=3, cell=cell).save(path)


def main(args) -> dict:
    device = start_run(args)
    entry = get_entry(args.model, task="segmentation")
    cfg = entry.data_config.replace(channels=args.channels, input_size=args.input_size)
    cfg = cfg.replace(resize_size=cfg.input_size)  # segmentation resizes the whole image, no crop

    spec = read_masks(args.data)
    classes = spec.classes
    if args.val_data:
        train_samples, val_samples = spec.samples, read_masks(args.val_data, classes=classes).samples
    else:
        if not 0 < args.val_fraction < 1:
            raise ValueError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
        shuffled = sorted(spec.samples, key=lambda s: str(s.image))
        random.Random(args.seed).shuffle(shuffled)
        n_val = max(1, round(len(shuffled) * args.val_fraction))
        if n_val >= len(shuffled):
            raise DatasetError(f"{args.data} has {len(shuffled)} image(s): too few to hold out a validation share")
        val_samples, train_samples = shuffled[:n_val], shuffled[n_val:]

    arch_args = {"num_classes": len(classes), "in_channels": cfg.channels, **parse_model_args(args.model_arg)}
    model = get_model(args.model, **arch_args).to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be good

    train_set = SegmentationDataset(train_samples, segmentation_train_transform(
        cfg, hflip_prob=args.hflip_prob, min_scale=args.min_scale), channels=cfg.channels)
    eval_tf = segmentation_transform(cfg)
    val_set = SegmentationDataset(val_samples, lambda image, mask: (eval_tf(image), mask), channels=cfg.channels)
    val_loader = DataLoader(val_set, batch_size=args.batch_size, shuffle=False, num_workers=args.workers, collate_fn=collate)
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / args.batch_size)
    scheduler = cosine_with_warmup(optimizer, round(args.warmup_epochs * steps_per_epoch),
                                   args.epochs * steps_per_epoch, 0.01)

    meta = {
        "arch": args.model,
        "arch_args": arch_args,
        "task": "segmentation",
        "classes": classes,
        "preprocessing": cfg.to_dict(),
        "dataset": {"root": str(Path(args.data).resolve()), "layout": "masks", "train_images": len(train_samples),
                    "val_images": len(val_samples),
                    "val_source": args.val_data or f"random {args.val_fraction} of --data (seed {args.seed})",
                    "fingerprint": spec.fingerprint()},
        "versions": package_versions(),
    }
    print(f"{args.model}: {len(classes)} classes ({', '.join(classes)}), {len(train_samples)} train / "
          f"{len(val_samples)} val images, {cfg.channels}x{cfg.input_size}px, on {device}", file=sys.stderr)
    history, best, stale, started = [], (-1.0, 0), 0, time.time()
    for epoch in range(1, args.epochs + 1):
        start = time.time()
        torch.manual_seed(args.seed + epoch)
        train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                                  generator=torch.Generator().manual_seed(args.seed + epoch), collate_fn=collate,
                                  drop_last=len(train_set) > args.batch_size)
        tr = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, device,
                             f"epoch {epoch}/{args.epochs} train", args.no_progress)
        va = evaluate(model, val_loader, len(classes), device, f"epoch {epoch}/{args.epochs} val", args.no_progress)
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": tr["loss"], "val_miou": va["miou"],
               "val_pixel_accuracy": va["pixel_accuracy"], "skipped_images": tr["skipped"],
               "seconds": round(time.time() - start, 2)}
        history.append(row)
        improved = va["miou"] > best[0]
        if improved:
            best, stale = (va["miou"], epoch), 0
            meta["metrics"] = {"name": "miou", "best_val": va["miou"], "best_epoch": epoch,
                               "pixel_accuracy": va["pixel_accuracy"], "iou_per_class": dict(zip(classes, va["iou"])),
                               "training_minutes": round((time.time() - started) / 60, 2)}
            meta["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            save_model_files(out, model, meta)
        else:
            stale += 1
        write_metrics(out, history, {"loss": ["train_loss"], "validation": ["val_miou", "val_pixel_accuracy"]})
        print(f"epoch {epoch}/{args.epochs}  train loss {tr['loss']:.4f}  |  val mIoU {va['miou']:.4f}  "
              f"pixel acc {va['pixel_accuracy']:.4f}{' *' if improved else ''}  |  {row['seconds']:.1f}s", file=sys.stderr)
        if args.patience and stale >= args.patience:
            print(f"early stop: no better validation mIoU for {args.patience} epochs", file=sys.stderr)
            break
        if args.max_minutes and time.time() - started > args.max_minutes * 60 and epoch < args.epochs:
            print(f"--max-minutes reached: stopping after {(time.time() - started) / 60:.1f} minutes", file=sys.stderr)
            break

    final = read_meta(out)
    final["metrics"].update(epochs_run=len(history), total_training_minutes=round((time.time() - started) / 60, 2),
                            skipped_images=sum(h["skipped_images"] for h in history))
    atomic_write_bytes(out / "model.json", (json.dumps(final, indent=2) + "\n").encode())
    if args.vis_count > 0:
        from model_defs.checkpoint import load_trained

        best_model, _ = load_trained(out, map_location=device)
        draw_predictions(best_model.to(device), val_samples[: args.vis_count], classes, cfg, device, out / "predictions.png")
    print(f"best validation mIoU {best[0]:.4f} at epoch {best[1]}; wrote {out}/model.pt, model.json"
          f"{', predictions.png' if args.vis_count > 0 else ''}", file=sys.stderr)
    return final


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
