"""The training loader's workers persist across epochs and still draw each epoch's
augmentation from (seed, epoch, worker) alone: different every epoch, the same for the same
seed, the same for a run resumed at that epoch, and the same as workers started afresh each
epoch would draw."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from training import engine
from training.datasets import SkipCollate

pytestmark = pytest.mark.unit


class Augmented(Dataset):
    """Stands in for a random augmentation: each item is a draw from torch's random stream,
    with the process that drew it."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i):
        return torch.rand(()).item(), os.getpid()


class Epochs(SequentialSampler):
    def set_epoch(self, epoch: int) -> None:
        pass


def as_list(items: list) -> list:
    return items


class Draws(engine.Task):
    collate = staticmethod(as_list)


def task(workers: int) -> engine.Task:
    t = Draws()
    t.args = argparse.Namespace(batch_size=2, workers=workers, seed=5)
    t.device, t.train_set = torch.device("cpu"), Augmented()
    return t


def epochs(first: int, last: int, workers: int = 2) -> dict[int, tuple[list[float], set[int]]]:
    """Each epoch's draws and worker processes from one training loader."""
    t = task(workers)
    sampler, loader = engine.training_loader(t, t.args, Epochs(t.train_set), drop_last=False)
    seen = {}
    for epoch in range(first, last + 1):
        sampler.set_epoch(epoch)
        items = [item for batch, _ in loader for item in batch]
        seen[epoch] = ([v for v, _ in items], {pid for _, pid in items})
    return seen


def fresh_workers(epoch: int) -> list[float]:
    """The draws of workers started for this epoch alone, seeded by a generator of seed + epoch."""
    t = task(2)
    loader = DataLoader(
        t.train_set,
        batch_size=2,
        num_workers=2,
        generator=torch.Generator().manual_seed(t.args.seed + epoch),
        collate_fn=SkipCollate(as_list),
    )
    return [v for batch, _ in loader for v, _ in batch]


def test_workers_persist_and_draw_per_epoch_as_fresh_workers_would():
    run = epochs(1, 3)
    pids = run[1][1]
    assert len(pids) == 2 and os.getpid() not in pids
    assert run[2][1] == run[3][1] == pids  # the same two processes every epoch
    draws = [run[e][0] for e in (1, 2, 3)]
    assert len({tuple(d) for d in draws}) == 3  # augmentation differs per epoch
    assert epochs(1, 3)[3][0] == draws[2]  # the same seed, the same draws
    assert epochs(3, 3)[3][0] == draws[2]  # a run resumed at epoch 3 draws as one that did not stop
    assert [fresh_workers(e) for e in (1, 2, 3)] == draws


def test_without_workers_the_loader_reads_in_the_training_process():
    sampler, loader = engine.training_loader(task(0), task(0).args, Epochs(Augmented()), drop_last=False)
    assert not loader.persistent_workers and loader.num_workers == 0
