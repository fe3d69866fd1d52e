"""DCGAN (Radford et al., 2016): a generator (latent vector -> image) and its discriminator.

The generator is the registered, served model ("dcgan"); the discriminator only exists
during training (training/train_gan.py) and is built from this module directly. The
generator ends in tanh, so its images live in [-1, 1]: the data config's mean and std of
0.5 map them to pixel values (model_defs.preprocessing.tensor_to_images).
`latent_vectors(seed, n, latent_dim)` is the one way a seed becomes latent vectors, used
by training's sample grids, the generator handler and the tests alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from model_defs.registry import DataConfig, register_model

GAN_IMAGE = DataConfig(input_size=32, resize_size=32, channels=1, mean=(0.5,), std=(0.5,))


def _check_size(image_size: int) -> int:
    """Number of 2x up/down-sampling steps between 4x4 and image_size."""
    steps = math.log2(image_size) - 2 if image_size > 0 else -1
    if steps < 1 or steps != int(steps):
        raise ValueError(f"DCGAN image_size must be a power of two, at least 8; got {image_size}")
    return int(steps)


class DCGANGenerator(nn.Module):
    """z (N, latent_dim) -> 4x4 -> ... -> image_size: transposed convs, BatchNorm, ReLU, tanh."""

    def __init__(self, latent_dim: int = 64, channels: int = 1, image_size: int = 32, width: int = 64):
        super().__init__()
        steps = _check_size(image_size)
        self.latent_dim = latent_dim
        ch = width * 2 ** (steps - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, ch, kernel_size=4, stride=1, padding=0, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(inplace=True),
        ]
        for _ in range(steps - 1):
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, kernel_size=4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ch // 2),
                nn.ReLU(inplace=True),
            ]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, kernel_size=4, stride=2, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], self.latent_dim, 1, 1))


class DCGANDiscriminator(nn.Module):
    """image -> one real/fake logit: strided convs, BatchNorm (not on the first), LeakyReLU."""

    def __init__(self, channels: int = 1, image_size: int = 32, width: int = 64):
        super().__init__()
        steps = _check_size(image_size)
        layers: list[nn.Module] = [
            nn.Conv2d(channels, width, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        ch = width
        for _ in range(steps - 1):
            layers += [
                nn.Conv2d(ch, ch * 2, kernel_size=4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ch * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, kernel_size=4, stride=1, padding=0), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def dcgan_init(model: nn.Module) -> None:
    """The DCGAN paper's initialization: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def latent_vectors(seed: int, n: int, latent_dim: int) -> torch.Tensor:
    """n standard-normal latent vectors from `seed`: the same seed gives the same vectors."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, latent_dim, generator=generator)


@register_model("dcgan", task="generation", data_config=GAN_IMAGE, test_kwargs={"width": 8})
def dcgan(*, latent_dim: int = 64, channels: int = 1, image_size: int = 32, width: int = 64) -> nn.Module:
    """DCGAN generator: latent vector -> image (tanh); image_size a power of two >= 8."""
    return DCGANGenerator(latent_dim=latent_dim, channels=channels, image_size=image_size, width=width)


def dcgan_discriminator(*, channels: int = 1, image_size: int = 32, width: int = 64) -> nn.Module:
    """The generator's training partner (not registered: it is never served)."""
    return DCGANDiscriminator(channels=channels, image_size=image_size, width=width)
