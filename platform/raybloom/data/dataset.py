"""A dataset in memory: its splits as tensors, and the ways the training paths reshape it (train+val as one
pool, k folds of that pool) so that every path does it the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from raybloom import regularization
from raybloom.errors import DataError


@dataclass
class Arrays:
    """One split in memory: x shaped (N, *shape) float32, y (N,) int64 or (N, 1) float32."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx: Any) -> "Arrays":
        return Arrays(self.x[idx], self.y[idx])

    def concat(self, other: "Arrays") -> "Arrays":
        return Arrays(torch.cat([self.x, other.x]), torch.cat([self.y, other.y]))

    # the same reading calls as a split streamed from its shards (`streamed.ShardedSplit`)
    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every row once, in order, `batch_size` at a time."""
        for i in range(0, len(self), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]

    def labels(self) -> np.ndarray:
        return self.y.numpy()

    def take(self, indices: np.ndarray) -> "Arrays":
        return self.subset(torch.as_tensor(np.asarray(indices), dtype=torch.int64))

    def head(self, n: int) -> "Arrays":
        return self.subset(slice(0, n))

    def load(self) -> "Arrays":
        return self


class Split(Protocol):
    """What every reader of a split uses: `Arrays` (in memory) and `streamed.ShardedSplit` (from disk)."""

    def __len__(self) -> int: ...
    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def labels(self) -> np.ndarray: ...
    def take(self, indices: np.ndarray) -> "Arrays": ...
    def head(self, n: int) -> "Arrays": ...
    def load(self) -> "Arrays": ...


@dataclass
class Dataset:
    """The three splits, each in memory (`Arrays`) or streamed from its shards (`streamed.ShardedSplit`:
    the same `len`, `batches`, `labels`, `take`, `head`); what needs rows in memory (folds, merging,
    partitions) works on `Arrays`."""

    train: Split
    val: Split
    test: Split
    meta: dict[str, Any]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta["shape"])

    @property
    def is_classification(self) -> bool:
        return self.meta["task"] == "classify"

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes") or 0)

    def train_val(self) -> Arrays:
        """Train and validation as one pool (cross-validation's, and a final retrain's); both in memory."""
        if not (isinstance(self.train, Arrays) and isinstance(self.val, Arrays)):
            raise DataError("train + validation as one pool (train.cv_folds, search.cv_folds, search.retrain_best) "
                            "needs the data in memory, and it is streamed (data.stream: true): leave data.stream unset")
        return self.train.concat(self.val)

    def with_train(self, train: Arrays, val: Arrays | None = None) -> "Dataset":
        """The same dataset with another training split (and validation split, if given)."""
        return Dataset(train, self.val if val is None else val, self.test, self.meta)

    def folds(self, k: int, seed: int) -> list["Dataset"]:
        """k datasets over the train+val pool: fold i holds out the i-th part as its validation split."""
        pool = self.train_val()
        return [self.with_train(pool.subset(torch.from_numpy(train)), pool.subset(torch.from_numpy(held)))
                for train, held in regularization.kfold_indices(len(pool), k, seed)]


def empty_split(meta: dict[str, Any]) -> Arrays:
    """A split with no rows, shaped like the dataset's."""
    x = torch.empty((0, *meta["shape"]), dtype=torch.float32)
    y = torch.empty(0, dtype=torch.int64) if meta["task"] == "classify" else torch.empty((0, 1), dtype=torch.float32)
    return Arrays(x, y)

