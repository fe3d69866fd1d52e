"""Transfer learning on torchvision classifiers: local weights, a new head, a frozen backbone.

The models are registered from one table, `TRANSFER_MODELS`: each row names the torchvision
constructor, its first conv (stem) and its classifier (head), and its data config, and
every row gets the same builder (`adapt_torchvision_classifier`). Nothing is downloaded:
the starting weights come from a state_dict file the user has (the original 1000-class one).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn as nn
import torchvision

from model_defs.registry import IMAGENET, DataConfig, register_model

M = TypeVar("M", bound=nn.Module)

# torchvision's ConvNeXt-Tiny weights are evaluated with a 236 px resize and a 224 px crop.
CONVNEXT_IMAGENET = DataConfig(input_size=224, resize_size=236, channels=3)


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


def pair(values: tuple[int, ...]) -> tuple[int, int]:
    """A Conv2d's size attribute (kept as tuple[int, ...]) as the 2-tuple its constructor takes."""
    height, width = values
    return height, width


def weight_for_in_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A conv weight (out, in, kh, kw) for `in_channels` inputs: conv_with_in_channels' average."""
    return weight.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) * (weight.shape[1] / in_channels)


def conv_with_in_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of `conv` taking `in_channels` inputs, its weights the old ones averaged over the inputs.

    The average is repeated for every new input channel and scaled by 3 / in_channels, so an
    image whose channels are all equal (grey) gives the same activations as the RGB original.
    """
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=pair(conv.kernel_size),
        stride=pair(conv.stride),
        padding=conv.padding if isinstance(conv.padding, str) else pair(conv.padding),
        dilation=pair(conv.dilation),
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(weight_for_in_channels(conv.weight, in_channels))
        if conv.bias is not None and new.bias is not None:
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
    set_in_channels(model, stem, in_channels)
    model.set_submodule(head, nn.Linear(submodule(model, head, nn.Linear).in_features, num_classes))
    if freeze_backbone:
        for param in model.parameters():
            param.requires_grad = False
        for param in model.get_submodule(head).parameters():
            param.requires_grad = True
    return model


def submodule(model: nn.Module, name: str, kind: type[M]) -> M:
    """`model`'s submodule `name`, which must be a `kind` (a registry entry naming the wrong layer fails here)."""
    module = model.get_submodule(name)
    if not isinstance(module, kind):
        raise TypeError(f"{type(model).__name__}.{name} is a {type(module).__name__}, not an nn.{kind.__name__}")
    return module


def set_in_channels(model: nn.Module, stem: str, in_channels: int) -> None:
    """Swap the first conv (`stem`, its dotted name) for one taking `in_channels`, unless it already does."""
    conv = submodule(model, stem, nn.Conv2d)
    if conv.in_channels != in_channels:
        model.set_submodule(stem, conv_with_in_channels(conv, in_channels))


@dataclass(frozen=True)
class TransferModel:
    """One row of the table: a torchvision classifier and where its ends are."""

    name: str
    constructor: Callable[..., nn.Module]  # a torchvision.models builder, called with weights=None
    stem: str  # the first nn.Conv2d's dotted name: swapped for a grey (1-channel) input
    head: str  # the final nn.Linear's: swapped for a num_classes one, the only part trained when frozen
    data_config: DataConfig
    title: str  # the model's name in words, for `python -m model_defs`
    options: dict = field(default_factory=dict)  # constructor keyword arguments a user may set, with defaults


TRANSFER_MODELS = (
    TransferModel(
        "resnet18", torchvision.models.resnet18, stem="conv1", head="fc", data_config=IMAGENET, title="ResNet-18"
    ),
    TransferModel(
        "resnet50", torchvision.models.resnet50, stem="conv1", head="fc", data_config=IMAGENET, title="ResNet-50"
    ),
    TransferModel(
        "vit_b_16",
        torchvision.models.vit_b_16,
        stem="conv_proj",
        head="heads.head",
        data_config=IMAGENET,
        title="ViT-B/16",
        # ImageNet weights only load at image_size 224: the position embedding has one entry per patch.
        options={"image_size": 224},
    ),
    TransferModel(
        "convnext_tiny",
        torchvision.models.convnext_tiny,
        stem="features.0.0",
        head="classifier.2",
        data_config=CONVNEXT_IMAGENET,
        title="ConvNeXt-Tiny",
    ),
)
TRANSFER = {spec.name: spec for spec in TRANSFER_MODELS}


class TransferBuilder:
    """The registry builder of one table row. It takes the common keyword arguments plus the
    row's `options`, and its signature says so (training checks --model-arg against it)."""

    def __init__(self, spec: TransferModel):
        self.spec = spec
        self.__doc__ = f"torchvision {spec.title} with a new head; optional local ImageNet weights and frozen backbone."
        common = list(inspect.signature(self.__call__).parameters.values())[:-1]
        extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in spec.options.items()]
        self.__signature__ = inspect.Signature(common + extra, return_annotation=nn.Module)

    def __call__(
        self,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        weights_path: str | None = None,
        freeze_backbone: bool = False,
        **options,
    ) -> nn.Module:
        unknown = sorted(set(options) - set(self.spec.options))
        if unknown:
            raise TypeError(f"{self.spec.name}() got an unexpected keyword argument {unknown[0]!r}")
        return adapt_torchvision_classifier(
            self.spec.constructor(weights=None, **{**self.spec.options, **options}),
            head=self.spec.head,
            stem=self.spec.stem,
            num_classes=num_classes,
            weights_path=weights_path,
            freeze_backbone=freeze_backbone,
            in_channels=in_channels,
        )


for _spec in TRANSFER_MODELS:
    register_model(_spec.name, task="classification", data_config=_spec.data_config, stem=_spec.stem, head=_spec.head)(
        TransferBuilder(_spec)
    )
