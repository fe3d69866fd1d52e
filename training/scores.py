"""The scores the trainers record each epoch and scripts/predict reports over REST, one
definition each: multi-label F1 and exact match, detection mAP, segmentation mIoU and pixel
accuracy, embedding k-NN accuracy, and a generator's Inception Score under a trained
classifier.

torchmetrics is imported where it is used: importing it loads all of its domains (scipy's
signal processing among them), about 5 s of every trainer's and every CLI's start-up.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from model_defs.checkpoint import data_config_from_meta, load_trained
from model_defs.preprocessing import eval_transform, tensor_to_images, to_model_mode
from training.datasets import Skipped

if TYPE_CHECKING:
    from torchmetrics.detection import MeanAveragePrecision


def batch_scores(logits: torch.Tensor, targets: torch.Tensor, criterion, threshold: float | None) -> dict:
    """A classifier's loss (a tensor, for the update) and its batch figure: top-1 accuracy, or
    for multi-label (a `threshold` given) the micro F1 of the labels over the threshold."""
    logits = logits.float()
    loss = criterion(logits, targets)
    if threshold is None:
        return {"loss": loss, "accuracy": (logits.argmax(1) == targets).float().mean().item()}
    pred, truth = torch.sigmoid(logits) >= threshold, targets >= 0.5
    tp = (pred & truth).sum().item()
    return {"loss": loss, "f1": 2 * tp / max(1, 2 * tp + (pred ^ truth).sum().item())}


def multilabel_scores(predicted: torch.Tensor, truth: torch.Tensor) -> dict:
    """Micro F1 ("f1"), macro F1 and exact match of boolean (images, classes) label sets; the
    figures training records and scripts/predict reports over REST (torchmetrics)."""
    from torchmetrics.classification import MultilabelExactMatch, MultilabelF1Score

    n = truth.shape[1]
    predicted, truth = predicted.long(), truth.long()
    return {
        "f1": MultilabelF1Score(n, average="micro")(predicted, truth).item(),
        "f1_macro": MultilabelF1Score(n, average="macro")(predicted, truth).item(),
        "exact_match": MultilabelExactMatch(n)(predicted, truth).item(),
    }


def map_metric() -> MeanAveragePrecision:
    """The mAP training records and scripts/predict reports (boxes xyxy in the original
    image's pixels, labels 1-based); computed on one process (rank 0 alone)."""
    from torchmetrics.detection import MeanAveragePrecision

    return MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools", sync_on_compute=False)


def segmentation_scores(confusion: np.ndarray) -> dict:
    """mIoU over the classes present in truth or prediction, pixel accuracy, per-class IoU."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return {
        "miou": float(np.nanmean(iou)) if np.any(union > 0) else 0.0,
        "pixel_accuracy": float(tp.sum() / max(1, confusion.sum())),
        "iou": [None if math.isnan(v) else float(v) for v in iou],
    }


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    k: int,
    num_classes: int,
    temperature: float = 0.1,
) -> float:
    """Cosine k-NN with exp(similarity / T) weighted votes (Wu et al., 2018), top-1 accuracy."""
    return (knn_predict(bank, bank_labels, query, k, num_classes, temperature) == query_labels).float().mean().item()


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    k: int,
    num_classes: int,
    temperature: float = 0.1,
) -> torch.Tensor:
    """The class each query embedding gets from its k most similar bank embeddings' votes."""
    sim = query @ bank.T
    top_sim, top_idx = sim.topk(min(k, bank.shape[0]), dim=1)
    votes = torch.zeros(query.shape[0], num_classes)
    votes.scatter_add_(1, bank_labels[top_idx], (top_sim / temperature).exp())
    return votes.argmax(1)


class InceptionScorer:
    """Scores generated images with a trained classifier, the way its handler would see
    them (PNG pixels, its own preprocessing): the Inception Score exp(E[KL(p(y|x) || p(y))]),
    between 1 and the number of classes, high when each image is clearly one class and the
    classes are evenly covered; and how many classes are the top-1 of at least 1% of them."""

    def __init__(self, run_dir: str, gen_cfg):
        self.model, meta = load_trained(run_dir)
        if meta["task"] != "classification":
            raise ValueError(f"--score-classifier {run_dir} is a {meta['task']} model, not a classifier")
        self.cfg = data_config_from_meta(meta)
        self.transform, self.classes, self.gen_cfg = eval_transform(self.cfg), meta["classes"], gen_cfg

    def reference(self, dataset, samples: int) -> dict:
        """The score of up to `samples` real images of `dataset`, spread evenly over its sorted
        files (so every class folder is represented): what the generated images aim at."""
        picks = torch.linspace(0, len(dataset) - 1, min(len(dataset), samples)).round().long().unique()
        return self(torch.stack([x for i in picks.tolist() if not isinstance(x := dataset[i], Skipped)]))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict:
        pil = tensor_to_images(images, self.gen_cfg)
        x = torch.stack([self.transform(to_model_mode(im, self.cfg.channels)) for im in pil])
        p = torch.cat([torch.softmax(self.model(chunk).float(), 1) for chunk in x.split(256)])
        marginal = p.mean(0, keepdim=True)
        kl = (p * (torch.log(p + 1e-12) - torch.log(marginal + 1e-12))).sum(1)
        share = torch.bincount(p.argmax(1), minlength=p.shape[1]).float() / p.shape[0]
        return {"inception_score": kl.mean().exp().item(), "classes_covered": int((share >= 0.01).sum())}
