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
import sys
from functools import partial
from pathlib import Path

import torch

from model_defs import get_entry
from model_defs.checkpoint import load_trained
from model_defs.detection import detect_answers
from model_defs.preprocessing import (
    boxes_to_original,
    detection_eval_transform,
    detection_input,
    detection_size,
    detection_train_transform,
    load_image,
)
from training import engine
from training.args import add_data_args, add_engine_args, add_model_args, task_parser
from training.det_datasets import DETECTION_LAYOUTS, DetectionDataset, read_detection
from training.draw import draw_detections, enlarge_small, grid
from training.pretrained import add_pretrained_args, check_pretrained, start_from_pretrained
from training.scores import map_metric


class Detection(engine.Task):
    name = "detection"
    panels = {"loss": ["train_loss"], "validation mAP": ["val_map_50", "val_map"]}

    def parser(self) -> argparse.ArgumentParser:
        p = task_parser(self)
        add_data_args(
            p, "training dataset: VOC folder, COCO folder or COCO .json", DETECTION_LAYOUTS, "annotation layout"
        )
        g = add_model_args(
            p,
            "detection",
            "fasterrcnn_mobilenet_320",
            channels=False,
            input_size="longer image side the model sees",
            pictures="detections.png",
        )
        g.add_argument(
            "--vflip-prob", type=float, default=0.0, help="vertical-flip probability in training (default: 0.0)"
        )
        g.add_argument(
            "--select-metric",
            default="map_50",
            choices=("map_50", "map"),
            help="validation metric that picks the saved epoch (default: map_50)",
        )
        add_pretrained_args(g)
        # No BatchNorm recalibration by default: torchvision's detection references keep BatchNorm
        # frozen, and a detector trained a few steps from scratch answers nothing once recalibrated.
        return add_engine_args(
            p, epochs=12, batch_size=8, lr=1e-3, min_lr_ratio=0.02, clip_grad_norm=10.0, bn_recalibration_batches=0
        )

    def check(self, args) -> None:
        """The mAP needs torchmetrics with pycocotools: a machine without them (or with a
        torchmetrics too old for `backend=`) is told now, not after the first epoch."""
        check_pretrained(args)
        try:
            map_metric()
        except (ImportError, TypeError, ValueError) as e:
            raise engine.TrainingError(
                f"detection's mAP needs torchmetrics with pycocotools (the train dependency group pins both): "
                f"{str(e).splitlines()[0]}"
            ) from None

    def setup(self, args) -> None:
        self.monitor = self.metric_name = args.select_metric
        spec = read_detection(args.data, args.layout)
        classes = engine.require_classes(args, spec, 1, "it names no object class, and a detector needs at least 1")
        train_samples, self.val_samples, dataset = self.split(args, spec, partial(read_detection, layout=args.layout))
        cfg = get_entry(args.model, task="detection").data_config.replace(
            input_size=args.input_size, resize_size=args.input_size
        )
        self.size, self.classes = cfg.input_size, classes
        self.model, arch_args = engine.build_model(
            args.model, "detection", args.model_arg, num_classes=len(classes), image_size=self.size
        )
        pretrained = start_from_pretrained(args, self.model, "detection")
        train_tf = detection_train_transform(self.size, args.hflip_prob, args.vflip_prob)
        self.train_set = DetectionDataset(train_samples, train_tf, self.size, self.cache)
        self.val_set = DetectionDataset(self.val_samples, detection_eval_transform(self.size), self.size, self.cache)
        self.meta = self.record(
            args,
            arch_args,
            cfg,
            classes,
            {**dataset, "train_boxes": sum(len(s.boxes) for s in train_samples)},
            classes_note="background excluded: model label k is classes[k - 1]",
            preprocessing_note="resize so the longer side is input_size (no crop), float [0, 1]; the model "
            "normalizes with mean/std",
            versions=engine.package_versions("torchmetrics", "pycocotools"),
            pretrained=pretrained,
        )
        self.details = [f"longer side {self.size}px"]

    @staticmethod
    def collate(items):
        return [b[0] for b in items], [b[1] for b in items], [b[2] for b in items]

    def probe_input(self):
        return self.collate([self.val_set[i] for i in range(min(4, len(self.val_set)))])[0]

    def step(self, batch, models, update):
        images, targets, _ = batch
        losses = models["model"](images, targets)
        loss = sum(losses.values())
        update(loss)
        return len(images), {"loss": loss.item(), **{k: v.item() for k, v in losses.items()}}

    def evaluate(self, model) -> dict:
        """mAP in the original images' pixels: predictions go back through boxes_to_original."""
        metric = map_metric()
        for images, _, indices in self.batches(self.loader(self.val_set), "val"):
            preds, truths = [], []
            for out, i in zip(model(images), indices):
                s = self.val_samples[i]
                w, h = detection_size(s.width, s.height, self.size)
                boxes = boxes_to_original(out["boxes"], (w / s.width, h / s.height), (s.width, s.height))
                preds.append({"boxes": boxes, "scores": out["scores"].float().cpu(), "labels": out["labels"].cpu()})
                truth = torch.tensor(s.boxes, dtype=torch.float32).reshape(-1, 4)
                truths.append({"boxes": truth, "labels": torch.tensor(s.labels, dtype=torch.int64) + 1})
            metric.update(preds, truths)
        return {k: float(v) for k, v in metric.compute().items() if k in ("map_50", "map")}

    @torch.no_grad()
    def finish(self, out: Path) -> None:
        """detections.png: the best model's answers (score >= 0.5) on the first validation images."""
        if not self.args.pictures:
            return
        model, _ = load_trained(out)
        pictures = []
        for s in self.val_samples[: self.args.pictures]:
            image = load_image(s.path, 3)
            x, scale = detection_input(image, self.size)
            answers = detect_answers(model([x])[0], scale, image.size, self.classes, 0.5, 100)
            pictures.append(draw_detections(*enlarge_small(image, answers), self.classes))
        grid(pictures).save(out / "detections.png")


cli, get_args_parser = engine.entry_points(Detection)

if __name__ == "__main__":
    sys.exit(cli())
