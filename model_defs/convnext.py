"""ConvNeXt: a small ConvNeXt to train from scratch on 32 px images.

The small ConvNeXt is written out block by block so the architecture can be read in one
place; torchvision's ConvNeXt-Tiny, for transfer learning from a local ImageNet state_dict,
is a row of model_defs.transfer's table.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model_defs.registry import SMALL_IMAGE, register_model


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv -> LayerNorm -> 1x1 expand 4x -> GELU -> 1x1 project, layer-scaled, plus x."""

    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        # The rest runs channels-last (N, H, W, C), where 1x1 convs are Linear layers.
        self.norm = nn.LayerNorm(dim)
        self.expand = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.project = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.project(self.act(self.expand(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Patchify stem, stages of ConvNeXt blocks with 2x2 stride-2 downsampling between, pooled head."""

    def __init__(
        self,
        depths: tuple[int, ...] = (2, 2, 2),
        dims: tuple[int, ...] = (32, 64, 128),
        in_channels: int = 3,
        num_classes: int = 10,
        stem_stride: int = 2,
    ):
        super().__init__()
        depths, dims = tuple(depths), tuple(dims)
        if not depths or len(depths) != len(dims):
            raise ValueError(f"depths {depths} and dims {dims} need the same, non-zero length")

        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, dims[0], kernel_size=stem_stride, stride=stem_stride),
            LayerNorm2d(dims[0]),
        )
        layers = []
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            if i > 0:
                layers.append(
                    nn.Sequential(LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, kernel_size=2, stride=2))
                )
            layers.append(nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)]))
        self.stages = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

        for m in self.modules():  # the ConvNeXt paper's initialization
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = x.mean(dim=(2, 3))  # global average pool
        return self.head(self.norm(x))


@register_model("convnext_mini", task="classification", data_config=SMALL_IMAGE, stem="stem.0", head="head")
def convnext_mini(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    depths: tuple[int, ...] = (2, 2, 2),
    dims: tuple[int, ...] = (32, 64, 128),
    stem_stride: int = 2,
) -> nn.Module:
    """Small ConvNeXt (three stages, widths 32-64-128, 2x2 patchify stem) for 32 px images."""
    return ConvNeXt(depths, dims, in_channels=in_channels, num_classes=num_classes, stem_stride=stem_stride)
