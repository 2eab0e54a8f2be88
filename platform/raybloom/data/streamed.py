"""Splits read from their Parquet shards batch by batch, never whole: for data bigger than a process's
memory (in-process training with `data.stream`, Ray workers' validation with `ingest: ray_data`, the
federated clients' partitions)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raybloom.data.dataset import Arrays, empty_split
from raybloom.data.shards import check_schema, load_files, x_to_tensor, y_to_tensor

READ_ROWS = 8192  # rows per record batch read from a shard


class ShardedSplit:
    """One split as its shard files: iterated in order (evaluation), by label (partitions), or by row index."""

    def __init__(self, files: list[Path], rows: int, meta: dict):
        self.files, self.rows, self.meta = list(files), rows, meta

    def __len__(self) -> int:
        return self.rows

    def _record_batches(self, path: Path, columns=("x", "y"), batch_size: int = READ_ROWS) -> Iterator[pa.RecordBatch]:
        shard = pq.ParquetFile(path)
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


class StreamedBatches:
    """Training batches streamed from a split's shards, shuffled each epoch (deterministic by seed and epoch):
    the shard order is reshuffled, and rows pass through a buffer of `buffer_rows` that is shuffled
    before batches leave it. Memory: the buffer and one record batch, whatever the split's size."""

    def __init__(self, split: ShardedSplit, batch_size: int, *, seed: int = 0, buffer_rows: int = 16384):
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.buffer_rows = max(buffer_rows, batch_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        held = 0
        for i in rng.permutation(len(self.split.files)):
            path = self.split.files[i]
            for rb in self.split._record_batches(path):
                a = self.split._arrays(rb, path)
                xs.append(a.x)
                ys.append(a.y)
                held += len(a)
                if held >= self.buffer_rows:  # hand out whole batches, keep about half the buffer to mix with what comes
                    x, y = torch.cat(xs), torch.cat(ys)
                    n = (len(x) - self.buffer_rows // 2) // self.batch_size * self.batch_size
                    yield from self._emit(x, y, rng, n)
                    xs, ys, held = [x[n:]], [y[n:]], len(x) - n
        if held:
            x, y = torch.cat(xs), torch.cat(ys)
            yield from self._emit(x, y, rng, len(x))

    def _emit(self, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, n: int):
        """Shuffle the buffer in place and hand out its first `n` rows as batches."""
        perm = torch.from_numpy(rng.permutation(len(x)))
        x.copy_(x[perm])
        y.copy_(y[perm])
        for start in range(0, n, self.batch_size):
            yield x[start:min(start + self.batch_size, n)], y[start:min(start + self.batch_size, n)]
