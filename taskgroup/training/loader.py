"""Training batches built ahead of the steps by DataLoader worker processes (``data.workers``).

The engine's sampler decides every step's (task, positions); it stays the one source of truth
(its state is what checkpoints hold, so a resumed run takes the very same steps). A copy of it,
taken when training starts or resumes, runs ahead in the main process and hands each plan to a
``torch.utils.data.DataLoader`` whose workers build the batch (decode, resize, normalise: the
same :meth:`SplitData.batch` the engine calls without workers); the engine then draws the step
from its own sampler and takes the next built batch, which must be that plan's (checked). With
preloaded data a batch is a few tensor gathers and workers bring little; they matter for data
decoded on the fly (``data.preload: false``, real data at 224 px).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from taskgroup.data import Batch
from taskgroup.training.data import SplitData

Plan = tuple[str, tuple[int, ...]]


class _Plans(Sampler):
    """The next ``steps`` plans of a copy of the engine's sampler (sharded like the engine's)."""

    def __init__(self, sampler: Any, steps: int, rank: int, world: int) -> None:
        self.sampler, self.steps, self.rank, self.world = copy.deepcopy(sampler), steps, rank, world

    def __iter__(self) -> Iterator[Plan]:
        for _ in range(self.steps):
            task, positions = self.sampler.next_batch()
            if self.world > 1:
                positions = positions[self.rank :: self.world]
            yield task, tuple(positions)

    def __len__(self) -> int:
        return self.steps


class _PlannedBatches(Dataset):
    def __init__(self, split: SplitData) -> None:
        self.split = split

    def __getitem__(self, plan: Plan) -> Batch:
        task, positions = plan
        return self.split.batch(task, list(positions))

    def __len__(self) -> int:  # not used: the plans are the index
        return 0


def _as_is(batch: Batch) -> Batch:
    return batch


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # a worker decodes; the training process keeps the cores


def batch_iterator(
    split: SplitData, sampler: Any, steps: int, workers: int, pin_memory: bool, rank: int = 0, world: int = 1
) -> Iterator[Batch]:
    """The batches of the sampler's next ``steps`` plans, built by ``workers`` processes."""
    loader = DataLoader(
        _PlannedBatches(split),
        sampler=_Plans(sampler, steps, rank, world),
        batch_size=None,
        collate_fn=_as_is,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=_one_thread,
        prefetch_factor=2,
    )
    return iter(loader)
