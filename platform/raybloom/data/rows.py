"""Rows of a source, as every reader hands them out: a `Source` (what the rows are: shape, dtype, task,
classes) of `Part`s (rows counted up front, read chunk by chunk)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

CHUNK_ROWS = 4096  # rows a source hands out at a time
Chunks = Iterator[tuple[np.ndarray, np.ndarray]]


@dataclass
class Part:
    """Rows of a source, counted up front (the split needs the count), read chunk by chunk."""

    rows: int
    read: Callable[[], Chunks]


@dataclass
class Source:
    meta: dict  # shape, dtype (uint8 | float32), scale (stored value -> model input), task, num_classes, classes
    parts: dict[str, Part] = field(default_factory=dict)  # "all", or the source's own "train" / "val" / "test"


def in_memory(x: np.ndarray, y: np.ndarray) -> Part:
    """A part whose rows are already arrays."""
    def read() -> Chunks:
        for i in range(0, len(x), CHUNK_ROWS):
            yield x[i:i + CHUNK_ROWS], y[i:i + CHUNK_ROWS]

    return Part(len(x), read)


def labels_meta(y: np.ndarray) -> dict:
    if np.issubdtype(y.dtype, np.integer):
        return {"task": "classify", "num_classes": int(y.max(initial=-1)) + 1}
    return {"task": "regress"}
