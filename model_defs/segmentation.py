"""Semantic-segmentation models: a U-Net written here, and torchvision's LR-ASPP MobileNetV3
and DeepLabV3 (MobileNetV3-Large or ResNet-50 backbone).

All take (N, C, H, W) images and return per-pixel class logits (N, num_classes, H, W) as a
plain tensor (torchvision's dict output is unwrapped), so training, evaluation and the
segmentation handler treat them alike. Class 0 is the background. The torchvision models are
built without their auxiliary classifier: training and serving read the main output only.
All are built with random weights; model_defs.pretrained starts one from a local weights file.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from model_defs.registry import DataConfig, register_model
from model_defs.transfer import set_in_channels

# Segmentation input is the whole image resized to input_size x input_size (no crop), so
# the predicted mask covers the whole picture and is scaled back to its original size.
SEGMENTATION_IMAGE = DataConfig(input_size=128, resize_size=128, channels=3)
MOBILENET_STEM = "model.backbone.0.0"  # the first conv of the MobileNetV3 backbone, under OutOnly
RESNET_STEM = "model.backbone.conv1"


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BatchNorm -> ReLU) twice: the U-Net's building block."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """2x2 up-convolution, concatenation with the encoder's skip, then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(out_channels * 2, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        # Odd sizes lose a pixel when pooled; pad back so the skip and x line up.
        dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
        if dh or dw:
            x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net (Ronneberger et al., 2015): `depth` poolings, channels width * 2**level."""

    def __init__(self, num_classes: int = 2, in_channels: int = 3, depth: int = 4, width: int = 16):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"U-Net depth and width must be at least 1, got depth={depth}, width={width}")
        channels = [width * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, channels[0])
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(channels[i], channels[i + 1])) for i in range(depth)
        )
        self.up = nn.ModuleList(Up(channels[i + 1], channels[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(channels[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.up:
            x = up(x, skips.pop())
        return self.head(x)


class OutOnly(nn.Module):
    """Returns the "out" entry of a torchvision segmentation model's dict output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


@register_model(
    "unet",
    task="segmentation",
    data_config=SEGMENTATION_IMAGE,
    test_kwargs={"depth": 2, "width": 8},
    stem="inc.0",
    head="head",
    backbone=("inc", "down"),
    predictors=("head",),
)
def unet(*, num_classes: int = 2, in_channels: int = 3, depth: int = 4, width: int = 16) -> nn.Module:
    """U-Net: double-conv encoder, up-convolutions with skip connections; depth and width set."""
    return UNet(num_classes=num_classes, in_channels=in_channels, depth=depth, width=width)


def _torchvision_segmenter(constructor, stem: str, num_classes: int, in_channels: int, **kwargs) -> nn.Module:
    """A torchvision segmentation model built offline (weights=None), unwrapped to its "out"
    logits, its first conv swapped when the input is not RGB."""
    wrapped = OutOnly(constructor(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs))
    set_in_channels(wrapped, stem, in_channels)
    return wrapped


# LR-ASPP has two classifiers (low- and high-level features) added together, so no one head.
@register_model(
    "lraspp_mobilenet_v3",
    task="segmentation",
    data_config=SEGMENTATION_IMAGE,
    stem=MOBILENET_STEM,
    backbone=("model.backbone",),
    predictors=("model.classifier.low_classifier", "model.classifier.high_classifier"),
)
def lraspp_mobilenet_v3(*, num_classes: int = 2, in_channels: int = 3) -> nn.Module:
    """torchvision LR-ASPP with a MobileNetV3-Large backbone (weights=None, built offline)."""
    segmentation = torchvision.models.segmentation
    return _torchvision_segmenter(segmentation.lraspp_mobilenet_v3_large, MOBILENET_STEM, num_classes, in_channels)


# DeepLabV3's head is ASPP then a 3x3 conv, BatchNorm, ReLU and the 1x1 class conv ("classifier.4").
@register_model(
    "deeplabv3_mobilenet_v3",
    task="segmentation",
    data_config=SEGMENTATION_IMAGE,
    stem=MOBILENET_STEM,
    head="model.classifier.4",
    backbone=("model.backbone",),
    predictors=("model.classifier.4",),
)
def deeplabv3_mobilenet_v3(*, num_classes: int = 2, in_channels: int = 3) -> nn.Module:
    """torchvision DeepLabV3 (ASPP head) on a dilated MobileNetV3-Large (weights=None, built offline)."""
    segmentation = torchvision.models.segmentation
    return _torchvision_segmenter(
        segmentation.deeplabv3_mobilenet_v3_large, MOBILENET_STEM, num_classes, in_channels, aux_loss=False
    )


@register_model(
    "deeplabv3_resnet50",
    task="segmentation",
    data_config=SEGMENTATION_IMAGE,
    stem=RESNET_STEM,
    head="model.classifier.4",
    backbone=("model.backbone",),
    predictors=("model.classifier.4",),
)
def deeplabv3_resnet50(*, num_classes: int = 2, in_channels: int = 3) -> nn.Module:
    """torchvision DeepLabV3 (ASPP head) on a dilated ResNet-50, output stride 8 (weights=None, built offline)."""
    segmentation = torchvision.models.segmentation
    return _torchvision_segmenter(
        segmentation.deeplabv3_resnet50, RESNET_STEM, num_classes, in_channels, aux_loss=False
    )
