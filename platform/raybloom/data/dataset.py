"""A dataset in memory: its splits as tensors, and the ways the training paths reshape it (train+val as one
pool, k folds of that pool) so that every path does it the same way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from raybloom import regularization


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


@dataclass
class Dataset:
    train: Arrays
    val: Arrays
    test: Arrays
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
        """Train and validation as one pool (cross-validation's, and a final retrain's)."""
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

