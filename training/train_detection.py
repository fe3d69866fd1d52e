"""Train a registered detector on a VOC or COCO dataset and write a servable checkpoint.

    python -m training.shapes --out data/shapes/train --layout voc --n 400 --size 320 --seed 0
    python -m training.train_detection --data data/shapes/train --model fasterrcnn_mobilenet_320 --out runs/shapes_det

Each epoch reports the standard detection metrics, mAP@0.5 and mAP@[.5:.95] (COCO
protocol, torchmetrics MeanAveragePrecision with pycocotools), computed in the original
images' pixel coordinates exactly as the served handler answers. The output folder holds
model.pt (best epoch by --select-metric), model.json (task "detection"; classes exclude the
background: model label k is classes[k - 1]), checkpoint.pt (the last epoch), metrics.csv,
curves.png and detections.png (the best model on a few validation images).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torchmetrics.detection import MeanAveragePrecision
from tqdm import tqdm

from model_defs import get_entry, get_model
from model_defs.checkpoint import atomic_torch_save, save_model_files, unwrap
from model_defs.detection import detect_answers
from model_defs.preprocessing import boxes_to_original, detection_eval_transform, detection_size, detection_train_transform, load_image
from training.common import cosine_with_warmup, package_versions, parse_model_args, seed_everything, write_metrics, run_cli
from training.datasets import DatasetError
from training.det_datasets import DETECTION_LAYOUTS, DetectionDataset, DetSample, read_detection
from training.draw import draw_detections, enlarge_small, grid


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="training dataset: VOC folder, COCO folder or COCO .json (required)")
    g.add_argument("--layout", default="auto", choices=DETECTION_LAYOUTS, help="annotation layout (default: auto, detected)")
    g.add_argument("--val-data", default=None, help="validation dataset; if not given --val-fraction of --data is held out (default: None)")
    g.add_argument("--val-fraction", type=float, default=0.2, help="share of the images held out for validation without --val-data (default: 0.2)")
    g.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="data-loading processes (default: min(2, cores))")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="fasterrcnn_mobilenet_320", help="registered detection model, see `python -m model_defs` (default: fasterrcnn_mobilenet_320)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="extra builder argument, value parsed as YAML; repeatable (default: none)")
    g.add_argument("--input-size", type=int, default=None, help="longer image side the model sees, in pixels (default: the model's data config)")
    g.add_argument("--hflip-prob", type=float, default=0.5, help="horizontal-flip probability in training (default: 0.5)")
    g.add_argument("--vflip-prob", type=float, default=0.0, help="vertical-flip probability in training (default: 0.0)")

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=12, help="number of epochs (default: 12)")
    g.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW (default: 1e-3)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: 1e-4)")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up before the cosine decay (default: 1.0)")
    g.add_argument("--min-lr-ratio", type=float, default=0.02, help="final learning rate as a share of --lr (default: 0.02)")
    g.add_argument("--clip-grad-norm", type=float, default=10.0, help="clip the gradient norm; 0 disables (default: 10.0)")
    g.add_argument("--select-metric", default="map_50", choices=("map_50", "map"), help="validation metric that picks the saved epoch (default: map_50)")
    g.add_argument("--max-minutes", type=float, default=0, help="stop after the epoch that passes this much training time; 0 = no limit (default: 0)")

    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output folder (default: runs/<model>)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms only (default: off)")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default (all cores). On a busy machine 1 can be several times faster: threads of several processes fighting over few cores stall each other (default: 0)")
    g.add_argument("--pictures", type=int, default=8, help="validation images drawn into detections.png at the end; 0 = none (default: 8)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars, one line per epoch (default: progress bars on)")
    return p


def collate(batch: list):
    good = [b for b in batch if b is not None]
    return [b[0] for b in good], [b[1] for b in good], [b[2] for b in good], len(batch) - len(good)


def train_one_epoch(model, loader, optimizer, scheduler, args, desc: str) -> dict:
    model.train()
    total, seen, skipped = 0.0, 0, 0
    parts: dict[str, float] = {}
    bar = tqdm(loader, desc=desc, leave=False, disable=True if args.no_progress else None, dynamic_ncols=True)
    for images, targets, _, n_skipped in bar:
        skipped += n_skipped
        if not images:
            continue
        losses = model(images, targets)
        loss = sum(losses.values())
        if not math.isfinite(loss.item()):
            raise ValueError(f"training diverged (loss {loss.item()}); try a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
        optimizer.step()
        scheduler.step()
        n = len(images)
        total, seen = total + loss.item() * n, seen + n
        for k, v in losses.items():
            parts[k] = parts.get(k, 0.0) + v.item() * n
        bar.set_postfix(loss=f"{total / seen:.3f}")
    return {"loss": total / max(1, seen), **{k: v / max(1, seen) for k, v in parts.items()}, "skipped": skipped}


@torch.no_grad()
def evaluate(model, loader, samples: list[DetSample], input_size: int, args, desc: str) -> dict:
    """mAP in the original images' pixels: predictions go back through boxes_to_original."""
    model.eval()
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    skipped = 0
    for images, _, indices, n_skipped in tqdm(loader, desc=desc, leave=False, disable=True if args.no_progress else None):
        skipped += n_skipped
        if not images:
            continue
        preds, truths = [], []
        for out, i in zip(model(images), indices):
            s = samples[i]
            w, h = detection_size(s.width, s.height, input_size)
            preds.append({"boxes": boxes_to_original(out["boxes"], (w / s.width, h / s.height), (s.width, s.height)),
                          "scores": out["scores"].cpu(), "labels": out["labels"].cpu()})
            truths.append({"boxes": torch.tensor(s.boxes, dtype=torch.float32).reshape(-1, 4),
                           "labels": torch.tensor(s.labels, dtype=torch.int64) + 1})
        metric.update(preds, truths)
    result = metric.compute()
    return {"map_50": float(result["map_50"]), "map": float(result["map"]), "skipped": skipped}


def draw_examples(model, samples: list[DetSample], classes: list[str], input_size: int, path: Path, n: int) -> None:
    """detections.png: the model's answers (score >= 0.5) on the first `n` validation images."""
    from model_defs.preprocessing import detection_input

    model.eval()
    pictures = []
    with torch.no_grad():
        for s in samples[:n]:
            image = load_image(s.path, 3)
            x, scale = detection_input(image, input_size)
            answers = detect_answers(model([x])[0], scale, image.size, classes, 0.5, 100)
            pictures.append(draw_detections(*enlarge_small(image, answers), classes))
    grid(pictures).save(path)


def main(args) -> dict:
    seed_everything(args.seed, args.deterministic)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/{args.model}")
    entry = get_entry(args.model, task="detection")
    train_spec = read_detection(args.data, args.layout)
    classes = train_spec.classes
    if args.val_data:
        val_spec = read_detection(args.val_data, args.layout, classes=classes)
        train_samples, val_samples = train_spec.samples, val_spec.samples
    else:
        if not 0 < args.val_fraction < 1:
            raise DatasetError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
        shuffled = sorted(train_spec.samples, key=lambda s: str(s.path))
        random.Random(args.seed).shuffle(shuffled)
        n_val = max(1, round(len(shuffled) * args.val_fraction))
        if n_val >= len(shuffled):
            raise DatasetError(f"{args.data} has {len(shuffled)} image(s): too few to hold out a validation share")
        val_samples, train_samples = shuffled[:n_val], shuffled[n_val:]

    data_config = entry.data_config.replace(input_size=args.input_size, resize_size=args.input_size)
    size = data_config.input_size
    arch_args = {"num_classes": len(classes), "image_size": size, **parse_model_args(args.model_arg)}
    model = get_model(args.model, **arch_args)
    out.mkdir(parents=True, exist_ok=True)

    train_set = DetectionDataset(train_samples, detection_train_transform(size, args.hflip_prob, args.vflip_prob))
    val_set = DetectionDataset(val_samples, detection_eval_transform(size))
    loader_kw = dict(batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate)
    val_loader = DataLoader(val_set, shuffle=False, **loader_kw)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps = math.ceil(len(train_set) / args.batch_size)
    scheduler = cosine_with_warmup(optimizer, round(args.warmup_epochs * steps), args.epochs * steps, args.min_lr_ratio)

    meta = {
        "arch": args.model, "arch_args": arch_args, "task": "detection",
        "classes": classes, "classes_note": "background excluded: model label k is classes[k - 1]",
        "preprocessing": data_config.to_dict(),
        "preprocessing_note": "resize so the longer side is input_size (no crop), float [0, 1]; the model normalizes with mean/std",
        "dataset": {"root": str(Path(args.data).resolve()), "layout": train_spec.layout,
                    "train_images": len(train_samples), "val_images": len(val_samples),
                    "train_boxes": sum(len(s.boxes) for s in train_samples),
                    "val_source": args.val_data or f"random {args.val_fraction} of --data (seed {args.seed})",
                    "fingerprint": train_spec.fingerprint()},
        "versions": {**package_versions(), "torchmetrics": _version("torchmetrics"), "pycocotools": _version("pycocotools")},
    }
    print(f"{args.model}: {len(classes)} classes ({', '.join(classes)}), {len(train_samples)} train / "
          f"{len(val_samples)} val images, longer side {size}px, {torch.get_num_threads()} thread(s)", file=sys.stderr)

    # Wall time depends on what else runs on the machine; CPU time of this process does not.
    history, best, best_epoch, started, cpu_started = [], -1.0, 0, time.time(), time.process_time()
    for epoch in range(1, args.epochs + 1):
        start = time.time()
        torch.manual_seed(args.seed + epoch)
        loader = DataLoader(train_set, shuffle=True, generator=torch.Generator().manual_seed(args.seed + epoch), **loader_kw)
        tr = train_one_epoch(model, loader, optimizer, scheduler, args, f"epoch {epoch}/{args.epochs} train")
        va = evaluate(model, val_loader, val_samples, size, args, f"epoch {epoch}/{args.epochs} val")
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": round(tr["loss"], 5),
               "map_50": round(va["map_50"], 5), "map": round(va["map"], 5),
               "skipped_images": tr["skipped"] + va["skipped"], "seconds": round(time.time() - start, 1),
               "cpu_seconds": round(time.process_time() - cpu_started, 1)}
        history.append(row)
        improved = va[args.select_metric] > best
        if improved:
            best, best_epoch = va[args.select_metric], epoch
            meta["metrics"] = {"select_metric": args.select_metric, "best_epoch": epoch, "map_50": va["map_50"],
                               "map": va["map"], "epochs_run": epoch, "train_seconds": round(time.time() - started, 1),
                               "train_cpu_seconds": round(time.process_time() - cpu_started, 1)}
            meta["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            save_model_files(out, model, meta)
        atomic_torch_save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                           "lr_scheduler": scheduler.state_dict(), "history": history}, out / "checkpoint.pt")
        write_metrics(out, history, {"loss": ["train_loss"], "validation mAP": ["map_50", "map"]})
        print(f"epoch {epoch}/{args.epochs}  loss {tr['loss']:.3f}  |  val mAP@0.5 {va['map_50']:.4f}  "
              f"mAP@[.5:.95] {va['map']:.4f}{' *' if improved else ''}  |  lr {row['lr']:.2e}  {row['seconds']:.0f}s",
              file=sys.stderr)
        if args.max_minutes and time.time() - started > args.max_minutes * 60 and epoch < args.epochs:
            print(f"stopping: --max-minutes {args.max_minutes} reached", file=sys.stderr)
            break

    from model_defs.checkpoint import load_trained

    best_model, final = load_trained(out)
    if args.pictures:
        draw_examples(best_model, val_samples, classes, size, out / "detections.png", args.pictures)
    print(f"best val mAP@0.5 {final['metrics']['map_50']:.4f}, mAP@[.5:.95] {final['metrics']['map']:.4f} "
          f"(epoch {best_epoch}, {time.time() - started:.0f}s of training); wrote {out}/model.pt and model.json", file=sys.stderr)
    return final


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def cli(argv: list[str] | None = None) -> int:
    return run_cli(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
