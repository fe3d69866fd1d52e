"""What served answers are worth, for every task: the labels a dataset folder holds, the
standard metric of the answers against them, the agreement of two versions' answers, and one
readable line per answer.

scripts/predict and scripts/models compare / promote --if-better score with this module
alone, so both give the same figures. The datasets are read with training's own readers
(training/datasets.py, training/det_datasets.py), the validation split is rebuilt from what
model.json records, and each metric is training's own code (multi-label F1, torchmetrics mAP,
the segmentation confusion scores, the k-NN vote), so a figure over REST on the validation
split equals the one in model.json.

Metrics per task (the first is the one `promote --if-better` gates on):
- classification, single-label: accuracy (top-1)
- classification, multi-label: f1 (micro), f1_macro, exact_match
- detection: map_50, map (mAP@[.5:.95])
- segmentation: miou, pixel_accuracy
- embedding: knn_accuracy, against a labelled reference folder
Agreement between two versions: same top-1; same label set; box-matching F1 at IoU 0.5;
mask mIoU of one version against the other; same k-NN class.
"""

from __future__ import annotations

import base64
import io
import json
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from model_defs.preprocessing import IMAGE_EXTENSIONS
from training.datasets import DatasetError, parse_split_source, random_split, read_dataset, stratified_split
from training.det_datasets import IGNORE_INDEX, read_detection, read_masks
from training.scores import knn_predict, map_metric, multilabel_scores, segmentation_scores

SHOWN_SCORE = 0.5  # detections at or above this score are shown and matched between versions
KNN_K = 20  # training's --knn-k default, for a model.json that records none
LAYOUT_NAMES = {
    "classification": "labelled classification dataset (class folders, labels.txt or images/ + labels/)",
    "voc": "VOC detection dataset (Annotations/)",
    "coco": "COCO detection dataset (annotations JSON)",
    "masks": "segmentation dataset (images/ + masks/)",
    "unlabelled": "folder of unlabelled images",
}
TASK_LAYOUTS = {
    "classification": ("classification",),
    "detection": ("voc", "coco"),
    "segmentation": ("masks",),
    "embedding": ("classification",),
}


class MetricsError(ValueError):
    """Input that does not fit the model (layout, class names, split); the message says why."""


# -- the served model --------------------------------------------------------------------


def served_meta(ts, name: str, version: str | None = None) -> dict:
    """model.json of the archive TorchServe serves as `name` (its default, or `version`)."""
    path = f"/models/{name}" + (f"/{version}" if version else "")
    mar = ts.model_store / Path(ts.manage("GET", path)[0]["modelUrl"]).name
    try:
        with zipfile.ZipFile(mar) as z:
            return json.loads(z.read("model.json"))
    except (OSError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise MetricsError(f"cannot read model.json from {mar} ({e})") from None


def kind_of(meta: dict) -> str:
    """single, multi, detection, segmentation, embedding or generation."""
    task = meta["task"]
    if task == "classification":
        return "multi" if meta.get("multi_label") else "single"
    return task


# kind_of's short names, for people.
KIND_NAMES = {
    "single": "single-label classification",
    "multi": "multi-label classification",
    "detection": "detection",
    "segmentation": "segmentation",
    "embedding": "embeddings",
    "generation": "generation",
}


def answered(evalset: EvalSet, answers: list) -> tuple[EvalSet, list]:
    """The images that got an answer (HTTP 200) and their answers: what a metric is taken over,
    so that a file the server could not read is not counted as a wrong prediction."""
    keep = [i for i, a in enumerate(answers) if a.status == 200]
    truth = None if evalset.truth is None else [evalset.truth[i] for i in keep]
    subset = replace(evalset, paths=[evalset.paths[i] for i in keep], truth=truth)
    return subset, [answers[i] for i in keep]


def primary_metric(meta: dict) -> str:
    return {
        "single": "accuracy",
        "multi": "f1",
        "detection": "map_50",
        "segmentation": "miou",
        "embedding": "knn_accuracy",
    }[kind_of(meta)]


def request_options(meta: dict) -> dict:
    """Options sent with every image: a detector answers every box it finds (as training
    scores it), and the table shows those at or above SHOWN_SCORE."""
    return {"score_threshold": 0.0} if meta["task"] == "detection" else {}


def check_images_task(meta: dict, name: str) -> None:
    """Refuse a model that does not answer images (the generator takes seeds)."""
    if meta["task"] not in TASK_LAYOUTS:
        raise MetricsError(
            f"{name} is a {meta['task']} model: it takes a seed, not images; ask it for a sample grid with "
            f"curl -H @<(scripts/serve key --header) -H 'Content-Type: application/json' "
            f'-d \'{{"seed": 7, "n": 16}}\' http://127.0.0.1:8080/predictions/{name}'
        )


# -- datasets ----------------------------------------------------------------------------


def layout_of(data: Path) -> str:
    """Which kind of dataset a folder (or COCO JSON file) holds: a key of LAYOUT_NAMES."""
    if data.is_file() and data.suffix == ".json":
        return "coco"
    if not data.is_dir():
        raise MetricsError(f"dataset folder {data} does not exist")
    if (data / "Annotations").is_dir():
        return "voc"
    if (data / "annotations.json").is_file() or (data / "annotations").is_dir():
        return "coco"
    if (data / "masks").is_dir() and (data / "images").is_dir():
        return "masks"
    if (data / "labels.txt").is_file() or ((data / "labels").is_dir() and (data / "images").is_dir()):
        return "classification"
    if any(_is_image(p) for p in data.iterdir()) or (data / "images").is_dir():
        return "unlabelled"
    return "classification"


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


@dataclass
class EvalSet:
    """The images to send, in order, and what is known about them."""

    root: Path
    paths: list[Path]
    truth: list | None = None  # per image: label indices | DetSample | mask path; None: unlabelled
    reference: list[Path] = field(default_factory=list)  # embeddings: the k-NN memory bank
    reference_labels: list[int] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)  # the names the label indices stand for

    @property
    def labelled(self) -> bool:
        return self.truth is not None


def load(data: Path, meta: dict, name: str, split: str = "all", reference: Path | None = None) -> EvalSet:
    """The images of `data` for model `name` (its model.json `meta`), labels checked against
    the model's before any request; split "val" keeps the validation split training used."""
    check_images_task(meta, name)
    task = meta["task"]
    if reference is not None and task != "embedding":
        raise MetricsError(f"--reference is for embedding models; {name} is a {task} model")
    layout = layout_of(data)
    if layout != "unlabelled" and layout not in TASK_LAYOUTS[task]:
        allowed = " or ".join(LAYOUT_NAMES[k] for k in TASK_LAYOUTS[task])
        raise MetricsError(
            f"{data} is a {LAYOUT_NAMES[layout]}, but {name} is a {task} model: give it a {allowed}, "
            "or a folder of unlabelled images"
        )
    if layout == "unlabelled":
        if split != "all":
            raise MetricsError(
                f"--split {split} needs the labelled dataset {name} was trained on; {data} has no labels"
            )
        folder = (
            data / "images" if (data / "images").is_dir() and not any(_is_image(p) for p in data.iterdir()) else data
        )
        paths = sorted(p for p in folder.rglob("*") if _is_image(p))
        if not paths:
            raise MetricsError(f"no images in {folder} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
        return EvalSet(data, paths)
    try:
        if task in ("classification", "embedding"):
            return _classification(data, meta, name, split, reference)
        if task == "detection":
            spec = read_detection(data, classes=meta["classes"])
            samples = _split(spec.samples, spec.fingerprint(), meta, name, split, data, random_split)
            return EvalSet(data, [s.path for s in samples], samples)
        spec = read_masks(data)
        if (data / "classes.txt").is_file() and spec.classes != meta["classes"]:
            raise MetricsError(
                f"{data}/classes.txt names {', '.join(spec.classes)}; {name} knows {', '.join(meta['classes'])}"
            )
        spec = read_masks(data, classes=meta["classes"])
        samples = _split(spec.samples, spec.fingerprint(), meta, name, split, data, random_split)
        return EvalSet(data, [s.image for s in samples], [s.mask for s in samples])
    except DatasetError as e:
        known = f" (model {name} knows: {', '.join(meta['classes'])})" if meta["classes"] else ""
        raise MetricsError(f"{e}{known}") from None


def _classification(data: Path, meta: dict, name: str, split: str, reference: Path | None) -> EvalSet:
    if meta["task"] == "embedding":
        spec = read_dataset(data)
        if spec.multi_label:
            raise MetricsError(f"{data}: k-NN accuracy needs one label per image; some images have several")
        if split == "val":
            recorded = meta.get("dataset", {}).get("eval_val_data") or ""
            fraction_seed = parse_split_source(recorded)
            if fraction_seed is None:
                raise MetricsError(f"{name}'s model.json records no split of --eval-data to rebuild ({recorded!r})")
            _check_fingerprint(spec.fingerprint(), meta["dataset"].get("eval_fingerprint"), name, data)
            bank, query = stratified_split(spec.samples, *fraction_seed)
        else:
            query, bank = spec.samples, []
            if reference is not None:
                ref = read_dataset(reference, classes=spec.classes)
                bank = ref.samples
        return EvalSet(
            data,
            [s.path for s in query],
            [s.labels for s in query],
            [s.path for s in bank],
            [s.labels[0] for s in bank],
            spec.classes,
        )
    spec = read_dataset(data, classes=meta["classes"])
    if spec.multi_label and not meta.get("multi_label"):
        raise MetricsError(f"{data} gives some images several labels, but {name} is a single-label classifier")
    samples = _split(spec.samples, spec.fingerprint(), meta, name, split, data, stratified_split)
    return EvalSet(data, [s.path for s in samples], [s.labels for s in samples])


def _check_fingerprint(actual: str, recorded: str | None, name: str, data: Path) -> None:
    if recorded and actual != recorded:
        raise MetricsError(
            f"{data} is not the dataset {name} was trained on (its fingerprint differs from model.json's), "
            "so its validation split cannot be rebuilt"
        )


def _split(samples: list, fingerprint: str, meta: dict, name: str, split: str, data: Path, splitter) -> list:
    """All samples, or (split "val") the validation share training held out of them."""
    if split == "all":
        return samples
    recorded = meta.get("dataset", {}).get("val_source", "")
    fraction_seed = parse_split_source(recorded)
    if fraction_seed is None:
        raise MetricsError(
            f"{name} was validated on the separate folder {recorded}; give that folder, without --split val"
        )
    _check_fingerprint(fingerprint, meta["dataset"].get("fingerprint"), name, data)
    if splitter is random_split:
        return random_split(samples, *fraction_seed, str(data))[1]
    return stratified_split(samples, *fraction_seed)[1]


# -- scoring -----------------------------------------------------------------------------


def score(meta: dict, answers: list, evalset: EvalSet, reference_answers: list | None = None) -> dict:
    """The task's standard metric(s) of `answers` (one per image, Answer tuples) against the
    labels; an error answer counts as a wrong one. Embeddings need `reference_answers`."""
    kind, classes = kind_of(meta), meta["classes"]
    ok = [a.status == 200 for a in answers]
    if kind == "single":
        top1 = [top_label(a) for a in answers]
        right = sum(t == classes[y[0]] for t, y in zip(top1, evalset.truth))
        return {"accuracy": right / len(answers)}
    if kind == "multi":
        index = {c: i for i, c in enumerate(classes)}
        predicted = torch.zeros(len(answers), len(classes), dtype=torch.bool)
        truth = torch.zeros_like(predicted)
        for i, (a, labels) in enumerate(zip(answers, evalset.truth)):
            truth[i, labels] = True
            for label in label_set(a):
                predicted[i, index[label]] = True
        return multilabel_scores(predicted, truth)
    if kind == "detection":
        metric = map_metric()
        index = {c: i + 1 for i, c in enumerate(classes)}
        for a, s in zip(answers, evalset.truth):
            boxes = a.body if a.status == 200 else []
            metric.update(
                [
                    {
                        "boxes": torch.tensor([b["box"] for b in boxes], dtype=torch.float32).reshape(-1, 4),
                        "scores": torch.tensor([b["score"] for b in boxes], dtype=torch.float32),
                        "labels": torch.tensor([index[b["label"]] for b in boxes], dtype=torch.int64),
                    }
                ],
                [
                    {
                        "boxes": torch.tensor(s.boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor(s.labels, dtype=torch.int64) + 1,
                    }
                ],
            )
        result = metric.compute()
        return {"map_50": float(result["map_50"]), "map": float(result["map"])}
    if kind == "segmentation":
        n = len(classes)
        confusion = np.zeros((n, n), dtype=np.int64)
        for a, mask_path, good in zip(answers, evalset.truth, ok):
            with Image.open(mask_path) as m:
                truth = np.asarray(m, dtype=np.uint8)
            truth = truth.astype(np.int64)
            pred = served_mask(a) if good else (truth + 1) % n  # an error answer: wrong everywhere
            keep = truth != IGNORE_INDEX
            confusion += np.bincount(truth[keep] * n + pred[keep], minlength=n * n).reshape(n, n)
        s = segmentation_scores(confusion)
        return {"miou": s["miou"], "pixel_accuracy": s["pixel_accuracy"]}
    # embedding: k-NN of the answers against the reference answers, training's vote
    labels = torch.tensor([-1 if p is None else p for p in knn_labels(meta, answers, evalset, reference_answers)])
    truth = torch.tensor([y[0] for y in evalset.truth])
    return {"knn_accuracy": (labels == truth).float().mean().item()}  # as training's knn_accuracy computes it


def knn_labels(meta: dict, answers: list, evalset: EvalSet, reference_answers: list) -> list[int | None]:
    """The k-NN class of each answer's embedding (None for an error)."""
    if not reference_answers or any(a.status != 200 for a in reference_answers):
        raise MetricsError("the k-NN reference images did not all get an embedding")
    bank = torch.tensor([a.body["embedding"] for a in reference_answers])
    bank_y = torch.tensor(evalset.reference_labels)
    k = int(meta.get("metrics", {}).get("knn_k", KNN_K))
    good = [i for i, a in enumerate(answers) if a.status == 200]
    query = torch.tensor([answers[i].body["embedding"] for i in good]).reshape(len(good), -1)
    predicted = knn_predict(bank, bank_y, query, k, max(evalset.reference_labels) + 1).tolist()
    labels: list[int | None] = [None] * len(answers)
    for i, p in zip(good, predicted):
        labels[i] = p
    return labels


def agreement(meta: dict, a: list, b: list, evalset: EvalSet, ref_a=None, ref_b=None) -> float:
    """How often two versions' answers to the same requests agree (task's definition)."""
    kind = kind_of(meta)
    both = [(x, y) for x, y in zip(a, b) if x.status == 200 and y.status == 200]
    if kind == "single":
        return sum(top_label(x) == top_label(y) for x, y in both) / len(a)
    if kind == "multi":
        return sum(label_set(x) == label_set(y) for x, y in both) / len(a)
    if kind == "detection":
        matched, total = 0, 0
        for x, y in zip(a, b):
            bx, by = shown_boxes(x), shown_boxes(y)
            total += len(bx) + len(by)
            matched += matched_boxes(bx, by)
        return 1.0 if total == 0 else 2 * matched / total
    if kind == "segmentation":
        n = len(meta["classes"])
        confusion = np.zeros((n, n), dtype=np.int64)
        for x, y in both:
            confusion += np.bincount(served_mask(x).ravel() * n + served_mask(y).ravel(), minlength=n * n).reshape(n, n)
        return segmentation_scores(confusion)["miou"] * len(both) / len(a)
    if not evalset.reference:
        raise MetricsError("agreement of two embedders needs labelled data: the k-NN class is compared")
    la, lb = knn_labels(meta, a, evalset, ref_a), knn_labels(meta, b, evalset, ref_b)
    return sum(x == y and x is not None for x, y in zip(la, lb)) / len(a)


def matched_boxes(bx: list[dict], by: list[dict]) -> int:
    """Greedy one-to-one matches, best score first, of same-label boxes at IoU >= 0.5."""
    if not bx or not by:
        return 0
    iou = box_iou(torch.tensor([d["box"] for d in bx]), torch.tensor([d["box"] for d in by]))
    used, matched = set(), 0
    for i in sorted(range(len(bx)), key=lambda i: -bx[i]["score"]):
        best, best_iou = None, 0.5
        for j in range(len(by)):
            if j not in used and by[j]["label"] == bx[i]["label"] and iou[i, j] >= best_iou:
                best, best_iou = j, float(iou[i, j])
        if best is not None:
            used.add(best)
            matched += 1
    return matched


# -- reading answers ---------------------------------------------------------------------


def top_label(a) -> str | None:
    return next(iter(a.body), None) if a.status == 200 and isinstance(a.body, dict) else None


def label_set(a) -> frozenset:
    return frozenset(a.body) if a.status == 200 and isinstance(a.body, dict) else frozenset()


def shown_boxes(a) -> list[dict]:
    return [d for d in a.body if d["score"] >= SHOWN_SCORE] if a.status == 200 else []


def served_mask(a) -> np.ndarray:
    """The class-index mask of a segmentation answer (its palette PNG's pixel values)."""
    with Image.open(io.BytesIO(base64.b64decode(a.body["mask"]))) as m:
        return np.asarray(m, dtype=np.int64)


def truth_text(meta: dict, evalset: EvalSet, i: int) -> str:
    """The labels of image `i`, for people."""
    if not evalset.labelled:
        return ""
    kind, truth = kind_of(meta), evalset.truth[i]
    if kind in ("single", "multi", "embedding"):
        return ",".join((evalset.classes or meta["classes"])[k] for k in truth)
    if kind == "detection":
        return f"{len(truth.boxes)} box(es)"
    return Path(truth).name


def answer_text(meta: dict, a) -> str:
    """One readable line for one answer."""
    if a.status != 200:
        message = a.body.get("message") if isinstance(a.body, dict) else None
        return f"HTTP {a.status}: {message or json.dumps(a.body)[:80]}"
    if a.body in ({}, [], None):
        return {
            "multi": "no label at or above the threshold ({})",
            "detection": "no detections ([])",
        }.get(kind_of(meta), f"empty answer ({json.dumps(a.body)})")
    kind = kind_of(meta)
    if kind == "single":
        label = top_label(a)
        return f"{label} ({a.body[label]:.3f})"
    if kind == "multi":
        return ", ".join(f"{k} ({v:.3f})" for k, v in a.body.items())
    if kind == "detection":
        shown = shown_boxes(a)
        boxes = "; ".join(
            f"{d['label']} {d['score']:.2f} [{', '.join(f'{v:.0f}' for v in d['box'])}]" for d in shown[:3]
        )
        more = f" (+{len(shown) - 3} more)" if len(shown) > 3 else ""
        return f"{len(shown)} box(es) >= {SHOWN_SCORE}" + (f": {boxes}{more}" if shown else "")
    if kind == "segmentation":
        parts = sorted(a.body["fractions"].items(), key=lambda kv: -kv[1])
        return f"{a.body['width']}x{a.body['height']} mask: " + ", ".join(f"{k} {v:.1%}" for k, v in parts[:3])
    vector = a.body["embedding"]
    return f"embedding of {len(vector)} ({', '.join(f'{v:.3f}' for v in vector[:3])}, ...)"
