"""The classifier trainer's focal loss against its definitions: torchvision's sigmoid focal
loss (multi-label), FocalLoss(alpha, gamma) as the PyTorch tutorials write it (single-label),
cross-entropy at gamma 0, and a finite gradient where the model is sure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from training.losses import FocalLoss, classification_loss

pytestmark = pytest.mark.unit


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(16, 5) * 3, (torch.rand(16, 5) > 0.7).float(), torch.randint(0, 5, (16,))


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [None, 0.25, 0.9])
def test_multi_label_equals_torchvision_sigmoid_focal_loss(batch, gamma, alpha):
    logits, targets, _ = batch
    ours = FocalLoss(gamma, alpha, multi_label=True)(logits, targets)
    theirs = sigmoid_focal_loss(logits, targets, alpha=-1 if alpha is None else alpha, gamma=gamma, reduction="mean")
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("alpha", [None, 0.5])
def test_single_label_equals_the_tutorial_focal_loss(batch, gamma, alpha):
    logits, _, classes = batch
    ce = F.cross_entropy(logits, classes, reduction="none")
    tutorial = ((1.0 if alpha is None else alpha) * (1 - torch.exp(-ce)) ** gamma * ce).mean()
    torch.testing.assert_close(FocalLoss(gamma, alpha)(logits, classes), tutorial)


def test_gamma_zero_is_cross_entropy(batch):
    logits, targets, classes = batch
    torch.testing.assert_close(FocalLoss(0.0)(logits, classes), F.cross_entropy(logits, classes))
    torch.testing.assert_close(
        FocalLoss(0.0, multi_label=True)(logits, targets), F.binary_cross_entropy_with_logits(logits, targets)
    )


def test_easy_images_count_less():
    """The point of it: the loss of an image the model already gets right shrinks more than
    that of one it gets wrong."""
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.5]])
    targets = torch.tensor([0, 0])
    ce = F.cross_entropy(logits, targets, reduction="none")
    focal = torch.stack([FocalLoss(2.0)(logits[i : i + 1], targets[i : i + 1]) for i in range(2)])
    shrink = focal / ce
    assert shrink[0] < 0.01 < 0.3 < shrink[1]


@pytest.mark.parametrize("multi_label", [False, True])
def test_a_sure_answer_keeps_the_gradient_finite_at_fractional_gamma(multi_label):
    # torchvision's sigmoid_focal_loss gives NaN here: (1 - p_t) is exactly 0 and 0 ** 0.5 has no gradient.
    logits = torch.tensor([[40.0, -3.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0]]) if multi_label else torch.tensor([0])
    FocalLoss(0.5, multi_label=multi_label)(logits, targets).backward()
    assert torch.isfinite(logits.grad).all()


def test_classification_loss_records_what_it_built():
    criterion, record = classification_loss("focal", True, gamma=1.5, alpha=0.25)
    assert isinstance(criterion, FocalLoss) and criterion.multi_label and criterion.gamma == 1.5
    assert record == {"name": "focal", "gamma": 1.5, "alpha": 0.25}
    assert classification_loss("focal", False)[1] == {"name": "focal", "gamma": 2.0, "alpha": None}
    criterion, record = classification_loss("ce", False, label_smoothing=0.1)
    assert isinstance(criterion, torch.nn.CrossEntropyLoss) and criterion.label_smoothing == 0.1
    assert record == {"name": "ce", "function": "cross-entropy", "label_smoothing": 0.1}
    assert isinstance(classification_loss("ce", True)[0], torch.nn.BCEWithLogitsLoss)
