"""Train any registered classifier on an image dataset and write a servable checkpoint.

    python -m training.train --data data/digits/train --model small_cnn --channels 1 --out runs/digits

The output folder receives `model.pt` (the best epoch's state_dict), `model.json` (how to
rebuild and preprocess it, its classes and metrics), `checkpoint.pt` (the last epoch, for
--resume), `metrics.csv` and `curves.png`. `scripts/archive` packs the first two. The loop,
devices and torchrun are training/engine.py's; the shared flags training/args.py's.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from functools import partial

import torch

from model_defs import get_entry
from model_defs.preprocessing import eval_transform, train_transform
from training import engine
from training.args import add_data_args, add_engine_args, add_model_args, add_rotation_arg, task_parser
from training.datasets import LABEL_FORMATS, LAYOUTS, ImageDataset, read_dataset
from training.losses import FOCAL_GAMMA, LOSSES, classification_loss
from training.scores import batch_scores, multilabel_scores


def color_jitter(text: str) -> tuple[float, float, float, float]:
    """--color-jitter B[,C,S,H] → (brightness, contrast, saturation, hue); those not given are 0."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 4 or not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not 1 to 4 comma-separated numbers >= 0 (brightness[,contrast,saturation,hue])"
        )
    values += [0.0] * (4 - len(values))
    if values[3] > 0.5:
        raise argparse.ArgumentTypeError(f"hue {values[3]} is over 0.5 (a shift of half the colour circle)")
    return (values[0], values[1], values[2], values[3])


class Classification(engine.Task):
    name, monitor = "classification", "accuracy"
    panels = {
        "loss": ["train_loss", "val_loss"],
        "accuracy": ["train_accuracy", "val_accuracy"],
        "f1": ["train_f1", "val_f1"],
    }

    def parser(self) -> argparse.ArgumentParser:
        p = task_parser(self)
        g = add_data_args(
            p,
            "training dataset folder",
            LAYOUTS,
            "dataset layout: class folders, images/ + labels.txt, or images/ + labels/*.txt",
        )
        g.add_argument(
            "--label-format",
            default="auto",
            choices=LABEL_FORMATS,
            help="how the label layouts' rows are read: class names or indices ('0 2'), or multi-hot rows of one 0/1 "
            "per class of classes.txt ('1 0 1'); auto reads rows of 0s and 1s as long as classes.txt as multi-hot "
            "and refuses a file that fits both (default: auto)",
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
        g = add_model_args(
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
            "--color-jitter",
            type=color_jitter,
            default=None,
            metavar="B[,C,S,H]",
            help="training images only: random brightness, contrast, saturation and hue changes of up to these "
            "amounts (torchvision ColorJitter; those not given are 0; saturation and hue need RGB), e.g. "
            "0.4,0.4,0.4,0.1 (default: off)",
        )
        add_rotation_arg(g)
        g = p.add_argument_group("loss")
        g.add_argument(
            "--loss",
            default="ce",
            choices=LOSSES,
            help="ce: cross-entropy (softmax; sigmoid/BCE for multi-label); focal: focal loss, which weighs the "
            "images the model still gets wrong more, for rare classes; goes with or without --balance "
            "(default: %(default)s)",
        )
        g.add_argument(
            "--focal-gamma",
            type=float,
            default=None,
            help=f"focal loss: the exponent of (1 - p_true) on each image's (label's) loss; 0 = cross-entropy "
            f"(default: {FOCAL_GAMMA})",
        )
        g.add_argument(
            "--focal-alpha",
            type=float,
            default=None,
            help="focal loss, in (0, 1]: multi-label, the weight of a present label (1 - alpha an absent one, as "
            "torchvision.ops.sigmoid_focal_loss); single-label, a constant factor on the loss (default: none)",
        )
        g.add_argument(
            "--label-smoothing",
            type=float,
            default=0.0,
            help="label smoothing of the cross-entropy loss, single-label --loss ce only (default: 0.0)",
        )
        return add_engine_args(p, epochs=15, batch_size=64, lr=2e-3, weight_decay=0.05, patience=5, clip_grad_norm=1.0)

    def check(self, args) -> None:
        for flag, key in ((args.weights_path, "weights_path"), (args.freeze_backbone, "freeze_backbone")):
            if flag and not engine.builder_accepts(args.model, "classification", key):
                raise engine.UsageError(f"--model {args.model} does not support --{key.replace('_', '-')}")
        if args.loss != "focal":
            for flag, value in (("--focal-gamma", args.focal_gamma), ("--focal-alpha", args.focal_alpha)):
                if value is not None:
                    raise engine.UsageError(f"{flag} is a focal-loss setting; give --loss focal with it")
        elif args.label_smoothing:
            raise engine.UsageError("--label-smoothing goes with --loss ce only; drop it or use --loss ce")
        if args.focal_gamma is not None and not (math.isfinite(args.focal_gamma) and args.focal_gamma >= 0):
            raise engine.UsageError(f"--focal-gamma must be >= 0, got {args.focal_gamma}")
        if args.focal_alpha is not None and not 0 < args.focal_alpha <= 1:
            raise engine.UsageError(f"--focal-alpha must be > 0 and <= 1, got {args.focal_alpha}")

    def setup(self, args) -> None:
        read = partial(read_dataset, layout=args.layout, label_format=args.label_format)
        spec = read(args.data)
        classes = engine.require_classes(args, spec, 2, "a classifier needs at least 2; is --layout right?")
        self.train_samples, val_samples, dataset = self.split(args, spec, read)
        if spec.label_format:
            dataset["label_format"] = spec.label_format
        self.multi_label = args.multi_label or spec.multi_label
        self.monitor = self.metric_name = "f1" if self.multi_label else "accuracy"
        self.criterion, loss = classification_loss(
            args.loss,
            self.multi_label,
            label_smoothing=args.label_smoothing,
            gamma=args.focal_gamma,
            alpha=args.focal_alpha,
        )
        cfg = get_entry(args.model, task="classification").data_config.replace(
            channels=args.channels, input_size=args.input_size, resize_size=args.resize_size
        )
        if cfg.channels != 3 and not engine.builder_accepts(args.model, "classification", "in_channels"):
            raise engine.UsageError(f"model {args.model} takes RGB input only; drop --channels {cfg.channels}")
        if cfg.channels == 1 and args.color_jitter and any(args.color_jitter[2:]):
            raise engine.UsageError(
                "--color-jitter: saturation and hue change nothing on grey images (--channels 1); give brightness "
                "and contrast only, e.g. --color-jitter 0.4,0.4"
            )
        start = {k: v for k, v in (("weights_path", args.weights_path), ("freeze_backbone", args.freeze_backbone)) if v}
        optional = {"in_channels": cfg.channels, "image_size": cfg.input_size}
        self.model, kwargs = engine.build_model(
            args.model, "classification", args.model_arg, optional, num_classes=len(classes), **start
        )
        arch_args = {k: v for k, v in kwargs.items() if k not in start}  # the start weights are in model.pt
        load = self.cache.image_loader(cfg)
        augmentation = {
            "min_scale": args.min_scale,
            "hflip_prob": args.hflip_prob,
            "rotation": args.rotation,
            "color_jitter": list(args.color_jitter) if args.color_jitter else None,
        }
        train_tf = train_transform(
            cfg,
            hflip_prob=args.hflip_prob,
            min_scale=args.min_scale,
            color_jitter=args.color_jitter,
            rotation=args.rotation,
        )
        n, multi, channels = len(classes), self.multi_label, cfg.channels
        self.train_set = ImageDataset(self.train_samples, n, multi, channels, train_tf, load)
        self.val_set = ImageDataset(val_samples, n, multi, channels, eval_transform(cfg), load)
        self.calibration_set = ImageDataset(self.train_samples, n, multi, channels, eval_transform(cfg), load)
        self.meta = self.record(
            args,
            arch_args,
            cfg,
            classes,
            dataset,
            multi_label=self.multi_label,
            threshold=args.threshold,
            init_weights=args.weights_path,
            loss=loss,
            augmentation=augmentation,  # training images only; "preprocessing" is what evaluation and serving do
        )
        self.details = ["multi-label" if self.multi_label else "single-label", f"{cfg.channels}x{cfg.input_size}px"]

    def sample_weights(self):
        if self.multi_label:
            return None
        counts = Counter(s.labels[0] for s in self.train_samples)
        return [1.0 / counts[s.labels[0]] for s in self.train_samples]

    def scores(self, logits, targets) -> dict:
        return batch_scores(logits, targets, self.criterion, self.args.threshold if self.multi_label else None)

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
