"""What the engine needs from torch.distributed, in one place (torchvision references'
utils.py): set up the process group torchrun describes in the environment, tell the ranks
apart, reduce and broadcast, and sample a share of the data per rank.

Without torchrun (no WORLD_SIZE in the environment, or 1) every helper is a no-op, so a
trainer runs unchanged in one process or in many.
"""

from __future__ import annotations

import datetime as dt
import math
import os

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the only process that prints the per-epoch line and writes files."""
    return rank() == 0


def launched() -> bool:
    """True under torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device: torch.device) -> None:
    """Join the process group torchrun set up: NCCL on CUDA, gloo on CPU. The timeout is long
    because rank 0 evaluates alone while the others wait."""
    if launched() and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=dt.timedelta(hours=2),
            device_id=device if device.type == "cuda" else None,
        )


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def from_main(obj):
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_lists(items: list) -> list:
    """Every rank's list, concatenated (for the names of skipped files)."""
    if not dist.is_initialized():
        return items
    out = [None] * world_size()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def train_sampler(dataset, seed: int, weights: list[float] | None = None) -> Sampler:
    """This rank's share of a shuffled epoch; `set_epoch` reshuffles. With `weights`, classes
    are drawn as often as the weights say (WeightedRandomSampler's draw, split over ranks)."""
    if weights is None:
        return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed)
    return WeightedDistributedSampler(weights, seed)


class WeightedDistributedSampler(Sampler):
    """Draws len(weights) indices with replacement, the same draw on every rank (seeded by
    seed + epoch), and gives each rank every world_size-th one."""

    def __init__(self, weights: list[float], seed: int):
        self.weights, self.seed, self.epoch = torch.as_tensor(weights, dtype=torch.double), seed, 0
        self.num_samples = math.ceil(len(weights) / world_size())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, self.num_samples * world_size(), replacement=True, generator=g)
        return iter(draw[rank() :: world_size()].tolist())

    def __len__(self) -> int:
        return self.num_samples
