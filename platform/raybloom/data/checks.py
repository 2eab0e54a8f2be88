"""Data that cannot train, refused before anything is recorded, naming the file and the problem.

While a source is prepared, every chunk of rows is checked (`check_rows`): features must be finite numbers,
regression targets too, and class labels integers in 0..K-1. When a job opens its dataset (`check_splits`,
from `job.prepare_job`, before any run is opened), the splits it asked for must hold rows, a classifier's
training split at least two classes, and data held in memory (an earlier or hand-made prepared folder,
which no prepare checked) the same values as a prepared one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from raybloom.data.dataset import Arrays, Dataset
from raybloom.errors import DataError

FRACTIONS = {"val": "data.val_fraction", "test": "data.test_fraction"}


def _first_bad(values: np.ndarray) -> tuple[int, str] | None:
    """The first row holding a NaN or an infinite value, and which of the two."""
    flat = values.reshape(len(values), -1)
    bad = ~np.isfinite(flat).all(axis=1)
    if not bad.any():
        return None
    row = int(np.flatnonzero(bad)[0])
    return row, ("NaN" if np.isnan(flat[row]).any() else "inf")


def check_rows(x: np.ndarray, y: np.ndarray, meta: dict[str, Any], where: str, first_row: int) -> None:
    """One chunk of a source's rows (rows first_row.. of `where`) as it is prepared."""
    if np.issubdtype(x.dtype, np.floating) and (bad := _first_bad(x)):
        raise DataError(f"{where}: the features of row {first_row + bad[0]} hold {bad[1]}; every feature must be a "
                        "finite number: fill or drop such rows, then prepare again")
    if meta["task"] != "classify":
        if (bad := _first_bad(np.asarray(y, dtype=np.float64))):
            raise DataError(f"{where}: the regression target of row {first_row + bad[0]} is {bad[1]}; targets must be "
                            "finite numbers: fill or drop such rows")
        return
    check_labels(y, meta, where, first_row)


def check_labels(y: np.ndarray, meta: dict[str, Any], where: str, first_row: int = 0) -> None:
    k = int(meta.get("num_classes") or 0)
    if not len(y) or (y.min() >= 0 and (not k or y.max() < k)):
        return
    row = int(np.flatnonzero((y < 0) | (y >= k) if k else y < 0)[0])
    allowed = f"0..{k - 1} (the dataset's {k} classes)" if k else "0 or more"
    raise DataError(f"{where}: label {int(y[row])} at row {first_row + row} is out of range for the model: class labels "
                    f"must be integers {allowed}")


def check_splits(dataset: Dataset, where: str, fractions: dict[str, float], classify: bool) -> None:
    """The splits a job trains and evaluates on, before any run is opened (`fractions`: data.val_fraction and
    data.test_fraction; a split asked for with 0 may be empty)."""
    own = set(dataset.meta.get("own_splits", ()))
    for name, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test)):
        if len(split) or (name != "train" and not fractions.get(name)):
            continue
        if name == "train":
            raise DataError(f"{where}: the training split has no rows; bring data for it (or lower data.val_fraction "
                            "and data.test_fraction)")
        cause = (f"the source's own {name} part is empty" if name in own
                 else f"{FRACTIONS[name]} {fractions[name]:g} of so few samples rounds to none")
        raise DataError(f"{where}: the {'validation' if name == 'val' else name} split has no rows ({cause}); bring "
                        f"data for it, or set {FRACTIONS[name]}: 0 to run without one")
    for name, split in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test)):
        if isinstance(split, Arrays) and len(split):  # in memory: perhaps a folder no prepare checked
            _check_in_memory(split, dataset.meta, f"{where} ({name} split)")
    if classify:
        present = np.unique(dataset.train.labels())
        if len(present) < 2:
            names = dataset.meta.get("classes")
            label = names[int(present[0])] if names and 0 <= int(present[0]) < len(names) else int(present[0])
            raise DataError(f"{where}: the training split holds a single class ({label!r}, {len(dataset.train)} rows); "
                            "a classifier needs samples of at least two classes to learn from")


def _check_in_memory(split: Arrays, meta: dict[str, Any], where: str) -> None:
    finite = torch.isfinite(split.x.reshape(len(split), -1)).all(dim=1)
    if not bool(finite.all()):
        row = int(torch.nonzero(~finite)[0, 0])
        raise DataError(f"{where}: the features of row {row} are not finite (NaN or inf); every feature must be a "
                        "finite number: prepare the data again from a clean source")
    if meta["task"] == "classify":
        check_labels(split.y.numpy(), meta, where)
    elif not bool(torch.isfinite(split.y).all()):
        raise DataError(f"{where}: a regression target is NaN or inf; targets must be finite numbers")
