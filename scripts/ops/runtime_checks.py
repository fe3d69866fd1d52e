"""How an optimized runtime of a segmenter, an embedder or a detector is checked against eager.

A classifier's runtime is checked by its top-1 on labelled images (scripts/ops/optimize.py).
The other tasks are checked by how closely the runtime's answers follow the eager model's on
the same images, each with its own measure, as a percentage where 100 is the same answer:

- segmentation: the mean IoU of the runtime's class masks with eager's (`miou_agreement`);
- embedding:    the mean cosine similarity of the two embeddings of each image (`cosine`);
- detection:    the share of boxes both answer with the same label at IoU >= 0.5, among the
                boxes either keeps at the archive's score threshold (`box_agreement`).
Masks and boxes are compared with the code scripts/models compare uses for two versions
(scripts/ops/task_metrics.py, training/scores.py).

The images are the run's own: the validation split model.json records (segmentation,
detection), or a seeded sample of the training images for an embedder (a run on unlabeled
images has no validation split); `--val-data DIR` replaces them with every image under DIR.
int8 calibrates on the training images. Each input is made exactly as the task's handler
makes it (the model's data config through the task's transform).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from model_defs.checkpoint import data_config_from_meta
from model_defs.preprocessing import detection_input, eval_transform, segmentation_transform
from scripts.ops.task_metrics import matched_boxes
from training.datasets import DatasetError, SkipCollate, parse_split_source, random_split
from training.det_datasets import read_detection, read_masks
from training.scores import segmentation_scores
from training.unlabeled import UnlabeledImages, find_images

METRICS = {"segmentation": "miou_agreement", "embedding": "cosine", "detection": "box_agreement"}
EMBEDDING_IMAGES = 256  # the training images an embedder is checked on
DEFAULT_SCORE_THRESHOLD = 0.5  # the detector handler's, when the archive sets none


class RuntimeCheckError(ValueError):
    """The runtime cannot be built or checked, or it answers further from eager than allowed."""


def recorded_paths(meta: dict) -> tuple[list[Path], list[Path]]:
    """The run's (training, validation) image paths, rebuilt as its trainer made them."""
    ds, task = meta.get("dataset") or {}, meta["task"]
    if not ds.get("root"):
        raise DatasetError("model.json records no training dataset")
    if task == "embedding":
        paths = find_images(ds["root"])
        return paths, random.Random(0).sample(paths, min(EMBEDDING_IMAGES, len(paths)))
    read = read_masks if task == "segmentation" else partial(read_detection, layout=ds.get("layout", "auto"))
    if not ds.get("val_source"):
        raise DatasetError("model.json records no validation split")
    spec = read(ds["root"])
    split = parse_split_source(ds["val_source"])
    if split:
        train, val = random_split(spec.samples, *split, ds["root"])
    else:
        train, val = spec.samples, read(ds["val_source"], classes=meta["classes"]).samples
    if (len(train), len(val)) != (ds.get("train_images", len(train)), ds.get("val_images", len(val))):
        raise DatasetError(
            f"{ds['root']} changed since training: {len(train)} train / {len(val)} validation "
            f"images now, model.json says {ds['train_images']} / {ds['val_images']}"
        )

    def paths(samples: list) -> list[Path]:  # a MaskSample's image, a DetSample's path
        return [s.image if task == "segmentation" else s.path for s in samples]

    return paths(train), paths(val)


def check_images(meta: dict, kind: str, val_data: Path | None, calibration_images: int, int8: bool):
    """(check images, calibration images, where the check images come from)."""
    try:
        recorded = None if val_data and not int8 else recorded_paths(meta)
    except DatasetError as e:
        need = "training images for int8 calibration" if val_data else "images for the check"
        hint = "" if val_data else "; give --val-data DIR"
        raise RuntimeCheckError(f"cannot rebuild the run's {need}: {e}{hint}") from None
    if val_data:
        try:
            images = find_images(val_data)
        except DatasetError as e:
            raise RuntimeCheckError(f"--val-data: {e}") from None
        source = str(val_data)
    else:
        images = recorded[1]
        ds = meta["dataset"]
        source = (
            f"{len(images)} of the training images of --data {ds['root']} (seed 0)"
            if meta["task"] == "embedding"
            else f"{ds['val_source']}, --data {ds['root']}"
        )
    calibration = []
    if int8:
        train = recorded[0]
        calibration = random.Random(0).sample(train, min(max(1, calibration_images), len(train)))
    return images, calibration, source


def batches(paths: list[Path], meta: dict, batch_size: int) -> Iterator:
    """Model inputs as the task's handler makes them: a float batch (segmentation, embedding)
    or a list of images of their own sizes (detection)."""
    cfg = data_config_from_meta(meta)
    task = meta["task"]
    if task == "detection":

        def transform(image):
            return detection_input(image, cfg.input_size)[0]

        collate = SkipCollate(list)
    else:
        transform = segmentation_transform(cfg) if task == "segmentation" else eval_transform(cfg)
        collate = SkipCollate()
    channels = 3 if task == "detection" else cfg.channels
    for batch, _ in DataLoader(UnlabeledImages(paths, channels, transform), batch_size=batch_size, collate_fn=collate):
        if batch is not None:
            yield batch


def compare_segmentation(eager, runner, inputs, num_classes: int) -> dict:
    """mIoU of the runtime's masks against eager's (training's segmentation scores, eager's mask
    taken as the truth), and the share of pixels of the same class."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    n = 0
    for images in inputs:
        a, b = eager(images).float().argmax(1), runner(images).float().argmax(1)
        pairs = (a.flatten() * num_classes + b.flatten()).cpu().numpy()
        confusion += np.bincount(pairs, minlength=num_classes**2).reshape(num_classes, num_classes)
        n += len(images)
    scores = segmentation_scores(confusion)
    return {"images": n, "agreement": 100 * scores["miou"], "pixel_agreement": 100 * scores["pixel_accuracy"]}


def compare_embedding(eager, runner, inputs) -> dict:
    """Cosine similarity of eager's and the runtime's embedding of each image: mean and least."""
    sims = [F.cosine_similarity(eager(x).float(), runner(x).float(), dim=1) for x in inputs]
    cos = torch.cat(sims) if sims else torch.zeros(0)
    return {
        "images": len(cos),
        "agreement": 100 * float(cos.mean()) if len(cos) else 0.0,
        "min_cosine": float(cos.min()) if len(cos) else 0.0,
    }


def shown(output: dict, score_threshold: float) -> list[dict]:
    """A detector's output as the handler's answer lists it: the boxes at `score_threshold` or more."""
    keep = output["scores"] >= score_threshold
    boxes, labels, scores = (output[k][keep].cpu().tolist() for k in ("boxes", "labels", "scores"))
    return [{"box": b, "label": c, "score": p} for b, c, p in zip(boxes, labels, scores)]


def compare_detection(eager, runner, inputs, score_threshold: float) -> dict:
    """Boxes kept at `score_threshold` that both runtimes answer (same label, IoU >= 0.5), as a
    share of the boxes either keeps (2 x matched / (eager's + runtime's), as scripts/models
    compare scores two versions); 100 when neither keeps any."""
    n = kept_eager = kept_runtime = matched = 0
    for images in inputs:
        for a, b in zip(eager(images), runner(images)):
            a, b = shown(a, score_threshold), shown(b, score_threshold)
            n, kept_eager, kept_runtime = n + 1, kept_eager + len(a), kept_runtime + len(b)
            matched += matched_boxes(a, b)
    either = kept_eager + kept_runtime
    return {
        "images": n,
        "agreement": 100 * 2 * matched / either if either else 100.0,
        "eager_boxes": kept_eager,
        "boxes": kept_runtime,
        "score_threshold": score_threshold,
    }


def compare(task: str, eager, runner, inputs, meta: dict, handler_config: dict) -> dict:
    if task == "segmentation":
        return compare_segmentation(eager, runner, inputs, len(meta["classes"]))
    if task == "embedding":
        return compare_embedding(eager, runner, inputs)
    threshold = float(handler_config.get("score_threshold", DEFAULT_SCORE_THRESHOLD))
    return compare_detection(eager, runner, inputs, threshold)


def summary(record: dict) -> str:
    """One line for the command line."""
    words = {
        "miou_agreement": "mIoU with eager's masks",
        "cosine": "mean cosine similarity with eager's embeddings",
        "box_agreement": "boxes agreeing with eager's",
    }[record["metric"]]
    extra = ""
    if record["metric"] == "box_agreement":
        extra = f" ({record['boxes']} vs eager {record['eager_boxes']} boxes at score {record['score_threshold']:g})"
    elif record["metric"] == "cosine":
        extra = f" (least {record['min_cosine']:.4f})"
    return (
        f"runtime {record['kind']}: {words} {record['agreement']:.2f}%{extra} "
        f"on {record['images']} images ({record['seconds']:.1f}s)"
    )
