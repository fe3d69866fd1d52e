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
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torchvision.models.segmentation.deeplabv3 import ASPPPooling

from model_defs import get_entry
from model_defs.checkpoint import load_trained
from model_defs.preprocessing import load_image, logits_to_mask, segmentation_train_transform, segmentation_transform
from training import engine
from training.args import add_data_args, add_engine_args, add_model_args, task_parser
from training.det_datasets import IGNORE_INDEX, SegmentationDataset, read_masks
from training.draw import grid, mask_row
from training.pretrained import add_pretrained_args, check_pretrained, start_from_pretrained
from training.scores import segmentation_scores


class Segmentation(engine.Task):
    name, monitor, metric_name, drop_last = "segmentation", "miou", "miou", True
    panels = {"loss": ["train_loss"], "validation": ["val_miou", "val_pixel_accuracy"]}

    def parser(self) -> argparse.ArgumentParser:
        p = task_parser(self)
        add_data_args(p, "dataset folder: images/ + masks/ + classes.txt")
        g = add_model_args(
            p,
            "segmentation",
            "unet",
            example="depth=3",
            input_size="side of the square the whole image is resized to",
            min_scale=1.0,
            pictures="predictions.png",
        )
        add_pretrained_args(g)
        return add_engine_args(p, epochs=30, batch_size=8, lr=3e-3)

    def check(self, args) -> None:
        check_pretrained(args)

    def setup(self, args) -> None:
        cfg = get_entry(args.model, task="segmentation").data_config.replace(
            channels=args.channels, input_size=args.input_size
        )
        self.cfg = cfg = cfg.replace(resize_size=cfg.input_size)  # segmentation resizes the whole image, no crop
        spec = read_masks(args.data)
        need = "a segmentation model needs the background and at least 1 other class"
        self.classes = engine.require_classes(args, spec, 2, need)
        train_samples, self.val_samples, dataset = self.split(args, spec, read_masks)
        self.model, arch_args = engine.build_model(
            args.model, "segmentation", args.model_arg, num_classes=len(self.classes), in_channels=cfg.channels
        )
        if args.batch_size < 2 and any(isinstance(m, ASPPPooling) for m in self.model.modules()):
            raise engine.UsageError(
                f"--batch-size {args.batch_size}: {args.model}'s ASPP pooling branch normalizes one value per "
                "image and channel, which BatchNorm cannot train on one image; give --batch-size 2 or more"
            )
        pretrained = start_from_pretrained(args, self.model, "segmentation")
        train_tf = segmentation_train_transform(cfg, hflip_prob=args.hflip_prob, min_scale=args.min_scale)
        eval_tf = segmentation_transform(cfg)
        self.train_set = SegmentationDataset(train_samples, train_tf, cfg.channels, cfg, cache=self.cache)
        self.val_set = SegmentationDataset(
            self.val_samples,
            lambda image, mask: (eval_tf(image), mask),
            cfg.channels,
            cfg,
            full_masks=True,
            cache=self.cache,
        )
        self.criterion = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        self.meta = self.record(args, arch_args, cfg, self.classes, dataset, pretrained=pretrained)
        self.details = [f"{cfg.channels}x{cfg.input_size}px"]

    @staticmethod
    def collate(items):
        """Images stacked; masks kept as a list (validation masks keep each image's own size)."""
        return torch.stack([g[0] for g in items]), [g[1] for g in items]

    def step(self, batch, models, update):
        images, masks = batch
        loss = self.criterion(models["model"](images).float(), torch.stack(masks))
        update(loss)
        return len(images), {"loss": loss.item()}

    def evaluate(self, model) -> dict:
        """Scores at each image's original size: the served mask against the true mask."""
        n = len(self.classes)
        confusion = np.zeros((n, n), dtype=np.int64)
        for images, masks in self.batches(self.loader(self.val_set), "val"):
            for item, truth in zip(model(images).float().cpu(), masks):
                truth = truth.cpu().numpy()
                keep = truth != IGNORE_INDEX
                pred = logits_to_mask(item, truth.shape)
                confusion += np.bincount(truth[keep].astype(np.int64) * n + pred[keep], minlength=n**2).reshape(n, n)
        s = segmentation_scores(confusion)
        per_class = dict(zip(self.classes, s["iou"]))
        return {"miou": s["miou"], "pixel_accuracy": s["pixel_accuracy"], "iou_per_class": per_class}

    @torch.no_grad()
    def finish(self, out: Path, cell: int = 256) -> None:
        """predictions.png, one row per validation image: the prediction over the image, the
        true mask, the predicted mask."""
        if self.args.pictures <= 0:
            return
        model, _ = load_trained(out)
        tf, tiles = segmentation_transform(self.cfg), []
        for s in self.val_samples[: self.args.pictures]:
            image = load_image(s.image, self.cfg.channels)
            with Image.open(s.mask) as m:
                truth = np.asarray(m, dtype=np.uint8)
            pred = logits_to_mask(model(tf(image)[None])[0], (image.height, image.width))
            tiles += mask_row(image, truth, pred, self.classes, cell)
        grid(tiles, columns=3, cell=cell).save(out / "predictions.png")


cli, get_args_parser = engine.entry_points(Segmentation)

if __name__ == "__main__":
    sys.exit(cli())
