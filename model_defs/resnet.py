"""Residual networks: a configurable ResNet of basic blocks.

The configurable ResNet covers the sizes between the small CNNs and torchvision's models
(e.g. a three-stage ResNet for 32 px images). torchvision's ResNet-18/50, for transfer
learning from a local ImageNet state_dict, are rows of model_defs.transfer's table.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model_defs.registry import IMAGENET, SMALL_IMAGE, register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (a 1x1 conv-BN projection when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, then one stage of BasicBlocks per entry of `layers`, global average pool, linear head.

    Stage i has `layers[i]` blocks of width `widths[i]`; every stage after the first halves
    the spatial size. `small_input` picks a 3x3 stride-1 stem without max-pool (32 px images)
    instead of the ImageNet 7x7 stride-2 stem with max-pool.
    """

    def __init__(
        self,
        layers: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_channels: int = 3,
        small_input: bool = False,
    ):
        super().__init__()
        layers, widths = tuple(layers), tuple(widths)
        if not layers or len(layers) != len(widths):
            raise ValueError(f"layers {layers} and widths {widths} need the same, non-zero length")

        if small_input:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )

        stages = []
        channels = widths[0]
        for i, (num_blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(channels, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.stages = nn.Sequential(*stages)

        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


# --- Registered models ----------------------------------------------------------------------


@register_model(
    "resnet_custom",
    task="classification",
    data_config=IMAGENET,
    test_kwargs={"layers": (1, 1, 1, 1), "widths": (8, 16, 32, 64)},
    stem="stem.0",
    head="fc",
)
def resnet_custom(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    layers: tuple[int, ...] = (2, 2, 2, 2),
    widths: tuple[int, ...] = (64, 128, 256, 512),
    small_input: bool = False,
) -> nn.Module:
    """Configurable ResNet of basic blocks (default: the ResNet-18 layout) for 224 px images."""
    return ResNet(layers, widths, num_classes=num_classes, in_channels=in_channels, small_input=small_input)


@register_model("resnet_small", task="classification", data_config=SMALL_IMAGE, stem="stem.0", head="fc")
def resnet_small(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    layers: tuple[int, ...] = (1, 1, 1),
    widths: tuple[int, ...] = (32, 64, 128),
) -> nn.Module:
    """Small three-stage ResNet with a 3x3 stride-1 stem and no max-pool, for 32 px images."""
    return ResNet(layers, widths, num_classes=num_classes, in_channels=in_channels, small_input=True)
