"""The prepared form of a dataset: a folder holding `train.parquet`, `val.parquet` and `test.parquet`.

Each file has two columns: `x` (fixed-size list of float32; images flattened, their shape in the schema
metadata) and `y` (int64 class, or float32 regression target). The split is deterministic by seed; a
source is prepared once (atomically) and read many times. Readers convert whole columns at once (no
per-row Python loop).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raybloom.data.dataset import Arrays, Dataset, empty_split
from raybloom.data.sources import BUILTIN, load_source
from raybloom.errors import DataError
from raybloom.spec.sections import DataSpec

SPLITS = ("train", "val", "test")
META_KEY = b"raybloom"


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    return {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]), "train": np.sort(perm[n_test + n_val:])}


def to_table(x: np.ndarray, y: np.ndarray, meta: dict) -> pa.Table:
    flat = np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32)
    xcol = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    ycol = pa.array(y.astype(np.int64) if meta["task"] == "classify" else y.astype(np.float32).reshape(-1))
    table = pa.table({"x": xcol, "y": ycol})
    return table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


def write(folder: Path, x: np.ndarray, y: np.ndarray, meta: dict, val_fraction: float, test_fraction: float, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "val_fraction": val_fraction, "test_fraction": test_fraction, "split_seed": seed}
    for name, idx in split_indices(len(x), val_fraction, test_fraction, seed).items():
        tmp = folder / f".{name}.parquet.{os.getpid()}.tmp"  # processes preparing the same folder at once
        pq.write_table(to_table(x[idx], y[idx], meta), tmp)
        os.replace(tmp, folder / f"{name}.parquet")  # atomic: a killed prepare leaves no half file
    return folder


def prepare_source(source: str, out: str | Path | None = None, *, val_fraction: float = 0.15, test_fraction: float = 0.15,
                   seed: int = 0, samples: int | None = None) -> Path:
    """Convert a source to a prepared Parquet folder (`raybloom data prepare`) and return the folder."""
    x, y, meta = load_source(source, samples, seed)
    folder = Path(out) if out else default_folder(source, val_fraction, test_fraction, seed, samples)
    return write(folder, x, y, meta, val_fraction, test_fraction, seed)


def data_root() -> Path:
    return Path(os.environ.get("RAYBLOOM_DATA_DIR", ".raybloom/data"))


def default_folder(source: str, val: float, test: float, seed: int, samples: int | None) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source).name if source not in BUILTIN else source)
    suffix = f"-n{samples}" if samples else ""
    return data_root() / f"{name}-v{val:g}-t{test:g}-s{seed}{suffix}"


def is_prepared(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f"{s}.parquet").exists() for s in SPLITS)


def resolve(data_spec: DataSpec) -> Path:
    """The prepared folder for a spec's `data` section, preparing built-in and local sources on first use."""
    if data_spec.path:
        folder = Path(data_spec.path)
        if is_prepared(folder):
            return folder
        if folder.exists() and any(folder.glob("*.parquet")):
            missing = [f"{s}.parquet" for s in SPLITS if not (folder / f"{s}.parquet").exists()]
            raise DataError(f"{folder}: prepared dataset is missing {', '.join(missing)}")
    elif is_prepared(Path(data_spec.source)):
        return Path(data_spec.source)
    else:
        folder = default_folder(data_spec.source, data_spec.val_fraction, data_spec.test_fraction,
                                data_spec.split_seed, data_spec.samples)
        if is_prepared(folder):
            return folder
    return prepare_source(data_spec.source, folder, val_fraction=data_spec.val_fraction,
                   test_fraction=data_spec.test_fraction, seed=data_spec.split_seed, samples=data_spec.samples)


def read_table(path: Path) -> tuple[pa.Table, dict]:
    """Read one split file, checking the schema. Errors name the file or the column."""
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e}); prepare it again with `raybloom data prepare`") from None
    for col in ("x", "y"):
        if col not in table.column_names:
            raise DataError(f"{path}: missing column '{col}' (found {table.column_names}); a dataset needs columns x and y")
    xt = table.schema.field("x").type
    if not (pa.types.is_fixed_size_list(xt) or pa.types.is_list(xt)) or not pa.types.is_floating(xt.value_type):
        raise DataError(f"{path}: column 'x' must be a list of float32, got {xt}")
    yt = table.schema.field("y").type
    if not (pa.types.is_integer(yt) or pa.types.is_floating(yt)):
        raise DataError(f"{path}: column 'y' must be int64 (classes) or float32 (targets), got {yt}")
    raw = (table.schema.metadata or {}).get(META_KEY)
    meta = json.loads(raw) if raw else {"shape": None, "task": "classify" if pa.types.is_integer(yt) else "regress"}
    return table, meta


def table_to_arrays(table: pa.Table, meta: dict, path: Path | str = "table") -> Arrays:
    xcol = table.column("x").combine_chunks()
    n = len(xcol)
    flat = xcol.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    width = flat.size // n if n else int(np.prod(meta.get("shape") or [0]))
    if n and flat.size != n * width:
        raise DataError(f"{path}: column 'x' rows have different lengths; every row must have the same size")
    shape = tuple(meta.get("shape") or (width,))
    if n and int(np.prod(shape)) != width:
        raise DataError(f"{path}: column 'x' has {width} values per row but the metadata shape is {list(shape)}")
    x = torch.from_numpy(flat.reshape((n, *shape)).copy())
    yn = table.column("y").to_numpy()
    if meta["task"] == "classify":
        y = torch.from_numpy(yn.astype(np.int64))
    else:
        y = torch.from_numpy(yn.astype(np.float32).reshape(-1, 1))
    return Arrays(x, y)


def read_split(folder: Path, split: str) -> tuple[Arrays, dict]:
    path = folder / f"{split}.parquet"
    table, meta = read_table(path)
    return table_to_arrays(table, meta, path), meta


def load(data_spec: DataSpec, splits: Sequence[str] = SPLITS, meta: dict[str, Any] | None = None) -> Dataset:
    """Read the dataset a spec names, preparing it first if needed: the `splits` asked for (the others stay
    empty). `meta`: the dataset's metadata as a driver read it with all its splits, for a worker that reads
    only some (the class count is inferred over every split, so a worker must not infer it again)."""
    folder = resolve(data_spec)
    parts, file_meta = {}, {}
    for s in splits:
        parts[s], file_meta = read_split(folder, s)
    if meta is None:
        meta = file_meta
        if meta.get("task") == "classify":
            meta["num_classes"] = max(int(meta.get("num_classes") or 0),
                                      *(int(parts[s].y.max()) + 1 for s in parts if len(parts[s])))
    meta = {**meta, "folder": str(folder)}
    for s in SPLITS:
        parts.setdefault(s, empty_split(meta))
    train = parts["train"]
    if data_spec.train_limit:
        train = train.subset(slice(0, data_spec.train_limit))
    return Dataset(train, parts["val"], parts["test"], meta)
