"""Mini-batches of an in-memory split, with the sharding contract Ray Train workers rely on."""

from __future__ import annotations

import math
from typing import Iterator

import torch

from raybloom.data.dataset import Arrays


class Batches:
    """Mini-batches of an in-memory split, reshuffled each epoch by a seeded generator.

    With `world > 1` this is rank `rank`'s shard: each global batch of `batch_size · world` samples is cut
    into `world` equal parts, so the union of the workers' batch i is exactly the 1-process batch i.
    """

    def __init__(self, arrays: Arrays, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.arrays, self.batch_size, self.shuffle, self.seed = arrays, batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.arrays) / (self.batch_size * self.world))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.arrays)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            order = torch.arange(n)
        step = self.batch_size * self.world
        x, y = self.arrays.x, self.arrays.y
        for start in range(0, n, step):
            chunk = order[start:start + step]
            if self.world > 1:
                chunk = chunk.tensor_split(self.world)[self.rank]
            yield x.index_select(0, chunk), y.index_select(0, chunk)
