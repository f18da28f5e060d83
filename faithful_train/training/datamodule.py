"""Seeded data streams from a task.

Training batch ``k`` of rank ``r`` is ``task.train_batch(k * world + r, ...)``: generated from its
own seed (generated tasks) or cut from a seeded permutation of the file (text), so the stream is
a pure function of the step: a resumed run starts at ``trainer.global_step``
and sees exactly the batches the uninterrupted run would have seen, and ranks never overlap.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, IterableDataset

from faithful_train.tasks.base import Batch, Task, take
from faithful_train.tasks.batch import trim_padding


class TaskStream(IterableDataset):
    """An endless stream of whole batches, starting at batch ``start``."""

    def __init__(self, task: Task, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        self.task, self.batch_size, self.seed = task, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self) -> Iterator[Batch]:
        for k in itertools.count(self.start):
            yield self.task.train_batch(k * self.world_size + self.rank, self.batch_size, self.seed)


class FixedBatches(Dataset):
    """A fixed set split into whole batches (validation); padding columns that a chunk does not
    need are cut, so a chunk costs what its longest row costs."""

    def __init__(self, data: Batch, batch_size: int):
        n = data["input_ids"].shape[0]
        self.chunks = [trim_padding(take(data, slice(i, i + batch_size))) for i in range(0, n, batch_size)]

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> Batch:
        return self.chunks[i]


class TaskDataModule(LightningDataModule):
    def __init__(self, task: Task, batch_size: int, seed: int, val_size: int = 512, val_batch_size: int = 512):
        super().__init__()
        self.task, self.batch_size, self.seed = task, batch_size, seed
        self.val_size, self.val_batch_size = val_size, val_batch_size

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # one batch per optimizer step per rank; after a restore, global_step is the resume point
        start = trainer.global_step * trainer.accumulate_grad_batches if trainer else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return DataLoader(TaskStream(self.task, self.batch_size, self.seed, start, rank, world), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """The validation rows (the held-out text's perplexity is the module's, at the epoch's end)."""
        data = self.task.validation_set(self.val_size, self.seed + 7_000_001)
        # Lightning's DistributedSampler shards this map-style dataset across ranks
        return DataLoader(FixedBatches(data, self.val_batch_size), batch_size=None)
