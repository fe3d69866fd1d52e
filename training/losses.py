"""The classifier trainer's losses: cross-entropy, and focal loss (Lin et al., 2017,
"Focal Loss for Dense Object Detection") for data where a few classes are rare.

Focal loss multiplies each image's (or label's) cross-entropy by (1 - p_t)^gamma, p_t being
the probability the model gives the true answer: the images it already gets right count
little, so the rare, hard ones weigh more in each step. gamma = 0 is plain cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("ce", "focal")
FOCAL_GAMMA = 2.0


class FocalLoss(nn.Module):
    """Focal loss of logits (N, C) against class indices (N,) (softmax, single-label) or 0/1
    targets (N, C) (sigmoid, multi-label), averaged over the batch (and the labels).

    `alpha`, single-label: a constant factor on the loss (FocalLoss(alpha, gamma) as PyTorch
    tutorials write it). Multi-label: the weight of a present label, 1 - alpha that of an
    absent one, as torchvision.ops.sigmoid_focal_loss weighs them. None: no weighting.

    Multi-label it gives torchvision.ops.sigmoid_focal_loss's values (tests/test_losses.py
    checks it); it is not called because it takes 1 - p_t from the probability, which is
    exactly 0 for a logit over about 17, and 0 to a fractional gamma has no gradient: one such
    label makes every weight NaN. Here 1 - p_t comes from the cross-entropy (-log p_t) and
    is kept above 0.
    """

    def __init__(self, gamma: float = FOCAL_GAMMA, alpha: float | None = None, multi_label: bool = False):
        super().__init__()
        self.gamma, self.alpha, self.multi_label = gamma, alpha, multi_label

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            targets = targets.to(logits.dtype)
            ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        else:
            ce = F.cross_entropy(logits, targets, reduction="none")
        not_pt = (-torch.expm1(-ce)).clamp(min=torch.finfo(ce.dtype).tiny)  # 1 - p_t
        loss = not_pt**self.gamma * ce
        if self.alpha is not None:
            loss = loss * (self.alpha * targets + (1 - self.alpha) * (1 - targets) if self.multi_label else self.alpha)
        return loss.mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}, multi_label={self.multi_label}"


def classification_loss(
    name: str,
    multi_label: bool,
    *,
    label_smoothing: float = 0.0,
    gamma: float | None = None,
    alpha: float | None = None,
) -> tuple[nn.Module, dict]:
    """The criterion `--loss name` asks for and model.json's record of it."""
    if name == "focal":
        gamma = FOCAL_GAMMA if gamma is None else gamma
        return FocalLoss(gamma, alpha, multi_label), {"name": "focal", "gamma": gamma, "alpha": alpha}
    if multi_label:
        return nn.BCEWithLogitsLoss(), {"name": "ce", "function": "binary cross-entropy"}
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing), {
        "name": "ce",
        "function": "cross-entropy",
        "label_smoothing": label_smoothing,
    }
