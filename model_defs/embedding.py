"""SimCLR (Chen et al., 2020): a ResNet encoder plus a projection MLP, trained contrastively.

`forward` returns the encoder's representation h (the embedding that is served and used
for k-NN); `project(h)` is the projection head g(h) the NT-Xent loss is computed on during
training only, as in the paper (h transfers better than g(h)). The backbone is either the
bundle's configurable ResNet with a small-image stem (fast on a CPU) or torchvision's
ResNet-18, both without their classification layer.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model_defs.registry import SMALL_IMAGE, register_model
from model_defs.resnet import ResNet
from model_defs.transfer import TRANSFER, set_in_channels, submodule

BACKBONES = ("small", "resnet18")


class SimCLREncoder(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, proj_hidden: int, proj_dim: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, proj_hidden),
            nn.BatchNorm1d(proj_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(proj_hidden, proj_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return self.projector(h)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent: each view's positive is the other view of its image, the 2N-2 others negatives."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))  # an embedding is not its own positive or negative
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, positives)


def _backbone(name: str, in_channels: int, layers, widths) -> tuple[nn.Module, int]:
    """The encoder without its classifier (an identity in its place), and its feature size."""
    if name == "small":
        net: nn.Module = ResNet(tuple(layers), tuple(widths), num_classes=1, in_channels=in_channels, small_input=True)
        head = "fc"
    elif name == "resnet18":
        spec = TRANSFER["resnet18"]
        net, head = spec.constructor(weights=None), spec.head
        set_in_channels(net, spec.stem, in_channels)
    else:
        raise ValueError(f"unknown SimCLR backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    dim = submodule(net, head, nn.Linear).in_features
    net.set_submodule(head, nn.Identity())
    return net, dim


@register_model(
    "simclr",
    task="embedding",
    data_config=SMALL_IMAGE,
    test_kwargs={"widths": (8, 16, 32), "proj_hidden": 32, "proj_dim": 16},
)
def simclr(
    *,
    in_channels: int = 3,
    backbone: str = "small",
    layers: tuple[int, ...] = (1, 1, 1),
    widths: tuple[int, ...] = (32, 64, 128),
    proj_hidden: int = 256,
    proj_dim: int = 64,
) -> nn.Module:
    """SimCLR encoder: ResNet backbone ("small" or torchvision "resnet18") + projection MLP."""
    net, dim = _backbone(backbone, in_channels, layers, widths)
    return SimCLREncoder(net, dim, proj_hidden, proj_dim)
