"""The prepared form of a dataset on disk: per split a folder of Parquet shards of bounded size, and a
manifest (`dataset.json`) with the dataset's metadata and each split's rows and files.

Each shard has two columns: `x` (a fixed-size list: uint8 for images, which keep their dtype on disk,
float32 otherwise; images flattened) and `y` (int64 class, or float32 regression target). The metadata
(shape, dtype, the scale that turns stored values into model inputs, task, classes) is in the manifest
and in each shard's schema metadata, so a shard read alone still says what it holds. A folder of the
earlier form (one `train.parquet`, `val.parquet`, `test.parquet`) still reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raybloom.data.dataset import Arrays
from raybloom.errors import DataError

SPLITS = ("train", "val", "test")
META_KEY = b"raybloom"
MANIFEST = "dataset.json"
FORMAT = 2
X_TYPES = {"uint8": pa.uint8(), "float32": pa.float32()}
# A row group is what a reader decodes at once (the streamed splits read one at a time): a few MB, not a
# whole shard, so reading a split holds a few MB of it whatever the shard size.
ROW_GROUP_BYTES = 4 * 2**20


# ------------------------------------------------------------------------------------------ writing
def to_table(x: np.ndarray, y: np.ndarray, meta: dict) -> pa.Table:
    """Rows as a two-column table, x stored in the dataset's dtype (`meta["dtype"]`, default float32)."""
    dtype = np.dtype(meta.get("dtype", "float32"))
    width = int(np.prod(meta["shape"])) if meta.get("shape") else int(np.prod(x.shape[1:]))
    flat = np.ascontiguousarray(x.reshape(len(x), width), dtype=dtype)
    xcol = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), X_TYPES[dtype.name]), flat.shape[1])
    ycol = pa.array(y.astype(np.int64) if meta["task"] == "classify" else y.astype(np.float32).reshape(-1))
    table = pa.table({"x": xcol, "y": ycol})
    return table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


class ShardWriter:
    """Writes one split as it comes, chunk by chunk, into Parquet files of at most `shard_bytes` each."""

    def __init__(self, folder: Path, split: str, meta: dict, shard_bytes: int):
        self.folder = folder / split
        self.folder.mkdir(parents=True, exist_ok=True)
        self.split, self.meta = split, meta
        row_bytes = int(np.prod(meta["shape"])) * np.dtype(meta.get("dtype", "float32")).itemsize + 8
        self.rows_per_shard = max(1, shard_bytes // row_bytes)
        self.rows_per_group = max(1, min(self.rows_per_shard, ROW_GROUP_BYTES // row_bytes))
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_rows = 0
        self.files: list[str] = []
        self.rows = 0

    def write(self, x: np.ndarray, y: np.ndarray) -> None:
        if len(x):
            self.pending.append((x, y))
            self.pending_rows += len(x)
        while self.pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def close(self) -> dict[str, Any]:
        """Write what is left; returns the split's entry of the manifest."""
        if self.pending_rows or not self.files:  # an empty split still gets one (empty) shard: it has a schema
            self._flush(self.pending_rows)
        return {"rows": self.rows, "files": self.files}

    def _flush(self, n: int) -> None:
        xs, ys, taken = [], [], 0
        while taken < n and self.pending:
            x, y = self.pending.pop(0)
            need = n - taken
            if len(x) > need:
                self.pending.insert(0, (x[need:], y[need:]))
                x, y = x[:need], y[:need]
            xs.append(x)
            ys.append(y)
            taken += len(x)
        self.pending_rows -= taken
        x = np.concatenate(xs) if xs else np.zeros((0, *self.meta["shape"]), dtype=self.meta.get("dtype", "float32"))
        y = np.concatenate(ys) if ys else np.zeros(0, dtype=np.int64 if self.meta["task"] == "classify" else np.float32)
        name = f"part-{len(self.files):05d}.parquet"
        pq.write_table(to_table(x, y, self.meta), self.folder / name, row_group_size=self.rows_per_group)
        self.files.append(f"{self.split}/{name}")
        self.rows += taken


def write_manifest(folder: Path, meta: dict, splits: dict[str, dict]) -> None:
    manifest = {"format": FORMAT, "meta": meta, "splits": splits}
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)


# ------------------------------------------------------------------------------------------ reading
def read_manifest(folder: Path) -> Optional[dict]:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable dataset manifest ({e}); prepare the data again") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: dataset format {manifest.get('format')!r}, this raybloom reads {FORMAT}; "
                        "prepare the data again")
    return manifest


def legacy_files(folder: Path) -> dict[str, Path]:
    """The split files of the earlier one-file-per-split form that exist in `folder`."""
    return {s: folder / f"{s}.parquet" for s in SPLITS if (folder / f"{s}.parquet").exists()}


def is_prepared(folder: Path) -> bool:
    """A complete prepared dataset (an unreadable manifest is not one: preparing again replaces it)."""
    if (folder / MANIFEST).is_file():
        try:
            manifest = read_manifest(folder)
        except DataError:
            return False
        return all((folder / f).exists() for s in SPLITS for f in manifest["splits"][s]["files"])
    return folder.is_dir() and len(legacy_files(folder)) == len(SPLITS)


def is_ours(folder: Path) -> bool:
    """A folder raybloom prepared (complete or not): it may be replaced by preparing again."""
    return (folder / MANIFEST).exists() or bool(legacy_files(folder))


def split_files(folder: Path, split: str) -> list[Path]:
    """The Parquet files holding one split, in order."""
    manifest = read_manifest(folder)
    if manifest is not None:
        return [folder / f for f in manifest["splits"][split]["files"]]
    path = folder / f"{split}.parquet"
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    return [path]


def split_rows(folder: Path, split: str) -> int:
    manifest = read_manifest(folder)
    if manifest is not None:
        return int(manifest["splits"][split]["rows"])
    return sum(pq.ParquetFile(p).metadata.num_rows for p in split_files(folder, split))


def check_schema(schema: pa.Schema, path: Path | str) -> dict:
    """The metadata a shard's schema says (or what its columns imply); errors name the file and column."""
    for col in ("x", "y"):
        if col not in schema.names:
            raise DataError(f"{path}: missing column '{col}' (found {schema.names}); a dataset needs columns x and y")
    xt = schema.field("x").type
    if not (pa.types.is_fixed_size_list(xt) or pa.types.is_list(xt)) or not (
            pa.types.is_floating(xt.value_type) or xt.value_type == pa.uint8()):
        raise DataError(f"{path}: column 'x' must be a list of float32 (or uint8 images), got {xt}")
    yt = schema.field("y").type
    if not (pa.types.is_integer(yt) or pa.types.is_floating(yt)):
        raise DataError(f"{path}: column 'y' must be int64 (classes) or float32 (targets), got {yt}")
    raw = (schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {"shape": None, "task": "classify" if pa.types.is_integer(yt) else "regress"}


def read_table(path: Path) -> tuple[pa.Table, dict]:
    """Read one shard, checking the schema. Errors name the file or the column."""
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e}); prepare it again with `raybloom data prepare`") from None
    return table, check_schema(table.schema, path)


def x_values(xcol: pa.Array | pa.ChunkedArray, meta: dict, path: Path | str = "table") -> np.ndarray:
    """A column of x as stored (uint8 images stay uint8), one row of `width` values per row: (N, width).
    Zero-copy where Arrow allows it (one chunk, no nulls)."""
    if isinstance(xcol, pa.ChunkedArray):
        xcol = xcol.chunk(0) if xcol.num_chunks == 1 else xcol.combine_chunks()
    n = len(xcol)
    flat = xcol.flatten().to_numpy(zero_copy_only=False)
    width = flat.size // n if n else int(np.prod(meta.get("shape") or [0]))
    if n and flat.size != n * width:
        raise DataError(f"{path}: column 'x' rows have different lengths; every row must have the same size")
    shape = tuple(meta.get("shape") or (width,))
    if n and int(np.prod(shape)) != width:
        raise DataError(f"{path}: column 'x' has {width} values per row but the metadata shape is {list(shape)}")
    return flat.reshape(n, width)


def x_tensor(values: np.ndarray, meta: dict) -> torch.Tensor:
    """Stored rows (N, width) as model inputs: float32, shaped (N, *shape), scaled (uint8 images: x / 255)."""
    shape = tuple(meta.get("shape") or values.shape[1:])
    x = torch.from_numpy(values.reshape((len(values), *shape)).astype(np.float32, copy=True))
    scale = float(meta.get("scale", 1.0))
    return x.mul_(scale) if scale != 1.0 else x


def x_to_tensor(xcol: pa.Array, meta: dict, path: Path | str = "table") -> torch.Tensor:
    """A column of x as model inputs: float32, shaped (N, *shape), scaled (uint8 images: x / 255)."""
    return x_tensor(x_values(xcol, meta, path), meta)


def y_values(ycol: pa.Array | pa.ChunkedArray, meta: dict) -> np.ndarray:
    """A column of y as the model's targets: int64 classes (N,), or float32 targets (N, 1)."""
    yn = ycol.to_numpy() if isinstance(ycol, pa.ChunkedArray) else ycol.to_numpy(zero_copy_only=False)
    if meta["task"] == "classify":
        return yn.astype(np.int64, copy=False)
    return yn.astype(np.float32, copy=False).reshape(-1, 1)


def y_to_tensor(ycol: pa.Array, meta: dict) -> torch.Tensor:
    return torch.tensor(y_values(ycol, meta))  # one copy: Arrow's buffers are read-only


def table_to_arrays(table: pa.Table, meta: dict, path: Path | str = "table") -> Arrays:
    return Arrays(x_to_tensor(table.column("x"), meta, path), y_to_tensor(table.column("y"), meta))


def load_files(files: list[Path], rows: int, meta: dict) -> Arrays:
    """Shards read one at a time into tensors allocated once: the peak is the split plus one shard."""
    x = torch.empty((rows, *meta["shape"]), dtype=torch.float32)
    y = torch.empty(rows, dtype=torch.int64) if meta["task"] == "classify" else torch.empty((rows, 1), dtype=torch.float32)
    at = 0
    for path in files:
        table, _ = read_table(path)
        part = table_to_arrays(table, meta, path)
        if at + len(part) > rows:
            raise DataError(f"{path}: more rows than its dataset's manifest counts ({rows}); prepare the data again")
        x[at:at + len(part)], y[at:at + len(part)] = part.x, part.y
        at += len(part)
    if at != rows:
        raise DataError(f"{files[0].parent}: {at} rows in the shards, the manifest counts {rows}; prepare the data again")
    return Arrays(x, y)
