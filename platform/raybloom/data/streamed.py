"""Splits read from their Parquet shards batch by batch, never whole: for data bigger than a process's
memory (in-process training with `data.stream`, Ray workers' validation with `ingest: ray_data`, the
federated clients' partitions)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raybloom.data.dataset import Arrays, empty_split
from raybloom.data.shards import check_schema, load_files, x_tensor, x_to_tensor, x_values, y_to_tensor, y_values

READ_ROWS = 8192  # rows per record batch read from a shard


class ShardedSplit:
    """One split as its shard files: iterated in order (evaluation), by label (partitions), or by row index."""

    def __init__(self, files: list[Path], rows: int, meta: dict):
        self.files, self.rows, self.meta = list(files), rows, meta

    def __len__(self) -> int:
        return self.rows

    def _record_batches(self, path: Path, columns=("x", "y"), batch_size: int = READ_ROWS) -> Iterator[pa.RecordBatch]:
        shard = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering reads every row group of the shard at once
        check_schema(shard.schema_arrow, path)
        yield from shard.iter_batches(batch_size=batch_size, columns=list(columns))

    def _arrays(self, batch: pa.RecordBatch | pa.Table, path: Path) -> Arrays:
        return Arrays(x_to_tensor(batch.column("x"), self.meta, path), y_to_tensor(batch.column("y"), self.meta))

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every row once, in order, `batch_size` at a time (a shard's last batch may be shorter)."""
        for path in self.files:
            for rb in self._record_batches(path, batch_size=batch_size):
                a = self._arrays(rb, path)
                yield a.x, a.y

    def labels(self) -> np.ndarray:
        """The y column alone (what partitioning by label needs), read shard by shard."""
        parts = [rb.column("y").to_numpy(zero_copy_only=False) for p in self.files for rb in self._record_batches(p, ("y",))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def take(self, indices: np.ndarray) -> Arrays:
        """The rows at these (global) indices, in the order given, reading one shard at a time."""
        indices = np.asarray(indices, dtype=np.int64)
        order = np.argsort(indices, kind="stable")
        wanted = indices[order]
        pieces, start = [], 0
        for path in self.files:
            n = pq.ParquetFile(path).metadata.num_rows
            lo, hi = np.searchsorted(wanted, [start, start + n])
            if hi > lo:
                table = pq.read_table(path, columns=["x", "y"])
                pieces.append(self._arrays(table.take(pa.array(wanted[lo:hi] - start)), path))
            start += n
        if not pieces:
            return empty_split(self.meta)
        got = pieces[0] if len(pieces) == 1 else Arrays(torch.cat([p.x for p in pieces]), torch.cat([p.y for p in pieces]))
        back = torch.from_numpy(np.argsort(order, kind="stable"))
        return got.subset(back)

    def head(self, n: int) -> Arrays:
        return self.take(np.arange(min(n, self.rows)))

    def load(self) -> Arrays:
        """The whole split in memory (callers check that it fits first)."""
        return load_files(self.files, self.rows, self.meta)


class ShuffleBuffer:
    """Rows mixed before they leave, in a buffer of `rows` rows allocated once and kept in the stored dtype
    (uint8 images stay uint8: a quarter of float32). Rows fill it as they come; while it is full, a batch of
    randomly chosen rows leaves and the rows above the new end fill the holes. `drain` empties it at the end
    of an epoch. Every row pushed leaves exactly once. Memory: the buffer and one batch."""

    def __init__(self, rows: int, batch_size: int, rng: np.random.Generator):
        self.capacity, self.batch_size, self.rng = max(rows, batch_size), batch_size, rng
        self.x: np.ndarray | None = None
        self.y: np.ndarray | None = None
        self.count = 0

    def push(self, x: np.ndarray, y: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Take rows in (copied: the caller may drop its arrays); yield the batches that leave meanwhile."""
        if self.x is None and len(x):  # the first rows say the width (an empty block may not)
            self.x = np.empty((self.capacity, *x.shape[1:]), dtype=x.dtype)
            self.y = np.empty((self.capacity, *y.shape[1:]), dtype=y.dtype)
        at = 0
        while at < len(x):
            n = min(len(x) - at, self.capacity - self.count)
            self.x[self.count:self.count + n], self.y[self.count:self.count + n] = x[at:at + n], y[at:at + n]
            self.count, at = self.count + n, at + n
            if self.count == self.capacity:
                yield self._take(self.batch_size)

    def drain(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while self.count:
            yield self._take(min(self.batch_size, self.count))

    def _take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        picked = self.rng.choice(self.count, size=n, replace=False)
        x, y = self.x[picked], self.y[picked]
        end = self.count - n
        holes = picked[picked < end]  # as many as the rows above `end` that stay
        stay = np.setdiff1d(np.arange(end, self.count), picked, assume_unique=True)
        self.x[holes], self.y[holes] = self.x[stay], self.y[stay]
        self.count = end
        return x, y


def shuffled_batches(record_batches: Iterable[tuple[Path | str, pa.RecordBatch | pa.Table]], meta: dict, batch_size: int,
                     buffer_rows: int, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Record batches (or tables) of x, y, each with where it comes from (for errors), through a
    ShuffleBuffer, as model-ready (x, y) tensor batches."""
    buffer = ShuffleBuffer(buffer_rows, batch_size, rng)
    for where, rb in record_batches:
        for x, y in buffer.push(x_values(rb.column("x"), meta, where), y_values(rb.column("y"), meta)):
            yield x_tensor(x, meta), torch.from_numpy(y)
    for x, y in buffer.drain():
        yield x_tensor(x, meta), torch.from_numpy(y)


class StreamedBatches:
    """Training batches streamed from a split's shards, shuffled each epoch (deterministic by seed and epoch):
    the shard order is reshuffled, and rows pass through a ShuffleBuffer of `buffer_rows`. Memory: the
    buffer (in the stored dtype) and one record batch, whatever the split's size."""

    def __init__(self, split: ShardedSplit, batch_size: int, *, seed: int = 0, buffer_rows: int = 16384):
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.buffer_rows = buffer_rows
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        files = [self.split.files[i] for i in rng.permutation(len(self.split.files))]
        record_batches = ((path, rb) for path in files for rb in self.split._record_batches(path))
        yield from shuffled_batches(record_batches, self.split.meta, self.batch_size, self.buffer_rows, rng)
