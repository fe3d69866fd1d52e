"""Transfer learning on torchvision classifiers: local weights, a new head, a frozen backbone.

Shared by resnet18/50, vit_b_16 and convnext_tiny. Nothing is downloaded: the starting
weights come from a state_dict file the user has (the original 1000-class one).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


def load_state_dict_file(model: nn.Module, weights_path: str) -> None:
    """Load a local state_dict file into `model`; errors name the file."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"could not read {path} as a state_dict: {err}") from err
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state_dict")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ValueError(
            f"{path} does not match {type(model).__name__} (is it the original torchvision state_dict?): {err}"
        ) from err


def conv_with_in_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of `conv` taking `in_channels` inputs, its weights the old ones averaged over the inputs.

    The average is repeated for every new input channel and scaled by 3 / in_channels, so an
    image whose channels are all equal (grey) gives the same activations as the RGB original.
    """
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        mean = conv.weight.mean(dim=1, keepdim=True)
        new.weight.copy_(mean.repeat(1, in_channels, 1, 1) * (conv.in_channels / in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def adapt_torchvision_classifier(
    model: nn.Module,
    *,
    head: str,
    stem: str,
    num_classes: int,
    weights_path: str | None = None,
    freeze_backbone: bool = False,
    in_channels: int = 3,
) -> nn.Module:
    """Prepare a fresh 1000-class torchvision model for fine-tuning, in place.

    `head` and `stem` are the dotted names of its final nn.Linear and its first nn.Conv2d
    (for a ResNet "fc" and "conv1"). In order: load `weights_path` (a torchvision-format
    state_dict for the original model), swap the stem conv when `in_channels` is not 3,
    swap the head for a `num_classes` Linear, and with `freeze_backbone` leave only the
    new head trainable.
    """
    if weights_path is not None:
        load_state_dict_file(model, weights_path)
    if in_channels != 3:
        model.set_submodule(stem, conv_with_in_channels(model.get_submodule(stem), in_channels))
    old_head = model.get_submodule(head)
    model.set_submodule(head, nn.Linear(old_head.in_features, num_classes))
    if freeze_backbone:
        for param in model.parameters():
            param.requires_grad = False
        for param in model.get_submodule(head).parameters():
            param.requires_grad = True
    return model
