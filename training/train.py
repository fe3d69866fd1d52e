"""Train any registered classifier on an image dataset and write a servable checkpoint.

    python -m training.train --data data/digits/train --model small_cnn --channels 1 --out runs/digits

The output folder receives `model.pt` (the best epoch's state_dict), `model.json` (how to
rebuild and preprocess it, its classes and metrics), `checkpoint.pt` (the last epoch, for
--resume), `metrics.csv` and `curves.png`. `scripts/archive` packs the first two. The loop,
devices, torchrun and the shared flags are training/engine.py's.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

from model_defs import get_entry
from model_defs.preprocessing import eval_transform, train_transform
from training import engine
from training.datasets import LAYOUTS, DatasetError, ImageDataset, read_dataset, split_source, stratified_split
from training.scores import multilabel_scores


class Classification(engine.Task):
    name, monitor = "classification", "accuracy"
    panels = {
        "loss": ["train_loss", "val_loss"],
        "accuracy": ["train_accuracy", "val_accuracy"],
        "f1": ["train_f1", "val_f1"],
    }

    def parser(self) -> argparse.ArgumentParser:
        p = engine.task_parser(self)
        g = engine.add_data_args(
            p,
            "training dataset folder",
            LAYOUTS,
            "dataset layout: class folders, images/ + labels.txt, or images/ + labels/*.txt",
        )
        g.add_argument(
            "--balance",
            action="store_true",
            help="sample classes equally often (weighted sampler) for class-imbalanced data (default: off)",
        )
        g.add_argument(
            "--multi-label",
            action="store_true",
            help="train with sigmoid/BCE and multi-label output even if every image has one label "
            "(default: off; on automatically when an image has several labels)",
        )
        g.add_argument(
            "--threshold",
            type=float,
            default=0.5,
            help="probability over which a label is predicted, multi-label only (default: 0.5)",
        )
        g = engine.add_model_args(
            p, "classification", "small_cnn", input_size="center-crop / training crop size", min_scale=0.6
        )
        g.add_argument(
            "--resize-size",
            type=int,
            default=None,
            help="shorter side before the center crop at eval (default: the model's data config)",
        )
        g.add_argument(
            "--weights-path",
            default=None,
            help="local state_dict to start from (transfer learning; models that accept it) (default: None)",
        )
        g.add_argument(
            "--freeze-backbone",
            action="store_true",
            help="train only the new head (models that accept it) (default: off)",
        )
        g.add_argument(
            "--label-smoothing",
            type=float,
            default=0.0,
            help="label smoothing of the cross-entropy loss (default: 0.0)",
        )
        return engine.add_engine_args(
            p, epochs=15, batch_size=64, lr=2e-3, weight_decay=0.05, patience=5, clip_grad_norm=1.0
        )

    def check(self, args) -> None:
        for flag, key in ((args.weights_path, "weights_path"), (args.freeze_backbone, "freeze_backbone")):
            if flag and not engine.builder_accepts(args.model, "classification", key):
                raise engine.UsageError(f"--model {args.model} does not support --{key.replace('_', '-')}")

    def setup(self, args) -> None:
        spec = read_dataset(args.data, args.layout)
        classes = spec.classes
        if len(classes) < 2:
            raise DatasetError(
                f"{args.data} (layout {spec.layout}) holds {len(classes)} class ({', '.join(classes)}): "
                f"a classifier needs at least 2; is --layout right?"
            )
        if args.val_data:
            self.train_samples, val_samples = (
                spec.samples,
                read_dataset(args.val_data, args.layout, classes=classes).samples,
            )
        else:
            self.train_samples, val_samples = stratified_split(spec.samples, args.val_fraction, args.seed)
        self.multi_label = args.multi_label or spec.multi_label
        if self.multi_label:
            self.monitor = self.metric_name = "f1"
            self.criterion = nn.BCEWithLogitsLoss()
        else:
            self.metric_name = "accuracy"
            self.criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
        cfg = get_entry(args.model, task="classification").data_config.replace(
            channels=args.channels, input_size=args.input_size, resize_size=args.resize_size
        )
        fixed = {"num_classes": len(classes)}
        if engine.builder_accepts(args.model, "classification", "in_channels"):
            fixed["in_channels"] = cfg.channels
        elif cfg.channels != 3:
            raise engine.UsageError(f"model {args.model} takes RGB input only; drop --channels {cfg.channels}")
        if engine.builder_accepts(args.model, "classification", "image_size"):
            fixed["image_size"] = cfg.input_size
        start = {k: v for k, v in (("weights_path", args.weights_path), ("freeze_backbone", args.freeze_backbone)) if v}
        self.model, kwargs = engine.build_model(args.model, "classification", args.model_arg, **fixed, **start)
        arch_args = {k: v for k, v in kwargs.items() if k not in start}  # the start weights are in model.pt
        load = self.cache.image_loader(cfg)
        self.train_set = ImageDataset(
            self.train_samples,
            len(classes),
            self.multi_label,
            cfg.channels,
            train_transform(cfg, hflip_prob=args.hflip_prob, min_scale=args.min_scale),
            load,
        )
        self.val_set = ImageDataset(
            val_samples, len(classes), self.multi_label, cfg.channels, eval_transform(cfg), load
        )
        self.calibration_set = ImageDataset(
            self.train_samples, len(classes), self.multi_label, cfg.channels, eval_transform(cfg), load
        )
        self.meta = {
            "arch": args.model,
            "arch_args": arch_args,
            "task": "classification",
            "multi_label": self.multi_label,
            "threshold": args.threshold,
            "classes": classes,
            "preprocessing": cfg.to_dict(),
            "dataset": {
                "root": str(Path(args.data).resolve()),
                "layout": spec.layout,
                "train_images": len(self.train_samples),
                "val_images": len(val_samples),
                "val_source": args.val_data or split_source(args.val_fraction, args.seed),
                "fingerprint": spec.fingerprint(),
            },
            "init_weights": args.weights_path,
        }
        self.describe = lambda: (
            f"{args.model}: {len(classes)} classes, {len(self.train_samples)} train / {len(val_samples)} val images, "
            f"{'multi-label' if self.multi_label else 'single-label'}, {cfg.channels}x{cfg.input_size}px"
        )

    def sample_weights(self):
        if self.multi_label:
            return None
        counts = Counter(s.labels[0] for s in self.train_samples)
        return [1.0 / counts[s.labels[0]] for s in self.train_samples]

    def scores(self, logits, targets) -> dict:
        logits = logits.float()
        loss = self.criterion(logits, targets)
        if not self.multi_label:
            return {"loss": loss, "accuracy": (logits.argmax(1) == targets).float().mean().item()}
        pred, truth = torch.sigmoid(logits) >= self.args.threshold, targets >= 0.5
        tp = (pred & truth).sum().item()
        return {"loss": loss, "f1": 2 * tp / max(1, 2 * tp + (pred ^ truth).sum().item())}

    def step(self, batch, models, update):
        images, targets = batch
        values = self.scores(models["model"](images), targets)
        update(values["loss"])
        return len(images), {**values, "loss": values["loss"].item()}

    def evaluate(self, model) -> dict:
        """Loss and accuracy averaged over the images; multi-label F1 and exact match over the
        whole validation set at once (an average of per-batch F1s is not the set's F1)."""
        sums, seen, predicted, truths = Counter(), 0, [], []
        for images, targets in self.batches(self.loader(self.val_set), "val"):
            logits = model(images)
            for k, v in self.scores(logits, targets).items():
                sums[k] += float(v) * len(images)
            seen += len(images)
            if self.multi_label:
                predicted.append(torch.sigmoid(logits.float()).cpu() >= self.args.threshold)
                truths.append(targets.cpu() >= 0.5)
        result = {k: v / max(1, seen) for k, v in sums.items()}
        if self.multi_label and seen:
            result.update(multilabel_scores(torch.cat(predicted), torch.cat(truths)))
        return result


cli, get_args_parser = engine.entry_points(Classification)

if __name__ == "__main__":
    sys.exit(cli())
