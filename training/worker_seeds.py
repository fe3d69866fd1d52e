"""Per-epoch random seeds for DataLoader workers that persist across epochs.

A DataLoader seeds its worker processes once, when it starts them; with
`persistent_workers=True` they live through every epoch, so their augmentation would run on
from wherever the last epoch left the random streams, and a run resumed at epoch k would
draw differently from one that got there without stopping. Here the sampler tags each index
with its epoch, and each worker reseeds itself at the first item of an epoch exactly as
torch seeds a fresh worker (python's `random` and torch with base_seed + worker id, the base
seed drawn from a generator seeded with seed + epoch): each epoch's augmentation depends on
(seed, epoch, worker) alone, as it does when the workers restart every epoch.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info


def base_seed(seed: int, epoch: int) -> int:
    """The base seed a DataLoader draws from its generator seeded with seed + epoch."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=torch.Generator().manual_seed(seed + epoch)).item())


class EpochTagged(Sampler):
    """A sampler's indices as (epoch, index)."""

    def __init__(self, sampler: Sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class EpochSeeded(Dataset):
    """`dataset` read by (epoch, index); a worker reseeds its random streams at its first item
    of each epoch."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        epoch, index = item
        if epoch != self.epoch:
            info = get_worker_info()
            seed = base_seed(self.seed, epoch) + (info.id if info else 0)
            random.seed(seed)
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            self.epoch = epoch
        return self.dataset[index]
