"""Small plain convolutional networks: quick baselines for small images (digits, CIFAR-like data).

They train in minutes on a CPU, so they are the models to reach for first when checking
that data, training and serving work end to end before moving to a ResNet, ViT or ConvNeXt.
Each ends in adaptive pooling, so it is not tied to one input size.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model_defs.registry import SMALL_IMAGE, register_model


class SmallCNN(nn.Module):
    """Two conv blocks, pooled to a fixed 4x4 grid, then a two-layer classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, hidden: int = 256):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 4 * 4, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def conv_bn_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv -> BatchNorm -> ReLU -> 2x2 max-pool (halves the spatial size)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class DropoutCNN(nn.Module):
    """Three conv-BN blocks, pooled to 4x4, dropout, then a two-layer classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, hidden: int = 256, p: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_block(in_channels, 64),
            conv_bn_block(64, 128),
            conv_bn_block(128, 256),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(p),
            nn.Linear(256 * 4 * 4, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class LeNet5BN(nn.Module):
    """LeNet-5 with BatchNorm after each conv; pooled to 5x5 so any input of 16 px or more runs."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(5),  # a no-op for the classic 32 px input
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("small_cnn", task="classification", data_config=SMALL_IMAGE, stem="features.0", head="classifier.3")
def small_cnn(*, num_classes: int = 10, in_channels: int = 3, hidden: int = 256) -> nn.Module:
    """Small CNN: two conv+max-pool blocks and a two-layer classifier; any input size."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, hidden=hidden)


@register_model("dropout_cnn", task="classification", data_config=SMALL_IMAGE, stem="features.0.0", head="classifier.5")
def dropout_cnn(*, num_classes: int = 10, in_channels: int = 3, hidden: int = 256, p: float = 0.5) -> nn.Module:
    """Deeper CNN: three conv+BatchNorm blocks, dropout (p) before the classifier; any input size."""
    return DropoutCNN(num_classes=num_classes, in_channels=in_channels, hidden=hidden, p=p)


@register_model("lenet5_bn", task="classification", data_config=SMALL_IMAGE, stem="features.0", head="classifier.5")
def lenet5_bn(*, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """LeNet-5 with BatchNorm (conv 6, conv 16, fc 120, 84); made for 32 px, runs from 16 px up."""
    return LeNet5BN(num_classes=num_classes, in_channels=in_channels)
