"""Tables: a Parquet or CSV file, or a folder of them, read through pyarrow's datasets (so a local path,
`file://`, `s3://` or `gs://` all work) a record batch at a time.

`data.columns` says which columns hold what: `features` (a list of numeric columns, or one list or
fixed-shape-tensor column), or `image` (encoded PNG/JPEG bytes, plain or as the `{bytes, path}` struct a
Hugging Face `datasets` Parquet export writes), and `label` (integers or strings: classes, sorted; floats:
a regression target). Without `data.columns` a table with `image` and `label` columns (Hugging Face's
names) is read as images. Files named (or in folders named) `train*`, `validation*` / `val*`, `test*`
are used as those splits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from raybloom.data.images import decode_column, image_bytes, image_format
from raybloom.data.fs import Location
from raybloom.data.rows import CHUNK_ROWS, Chunks, Part, Source
from raybloom.errors import DataError
from raybloom.spec.sections import ColumnsSpec, DataSpec

TABLE_FILE = r"\.(parquet|pq|csv)(\.gz)?$"
SPLIT_NAMES = (("train", r"^train"), ("val", r"^(validation|valid|val|dev)\b|^(validation|valid|val|dev)[-_.]"),
               ("test", r"^test"))


def _format(name: str) -> str:
    return "csv" if re.search(r"\.csv(\.gz)?$", name) else "parquet"


def is_table_source(loc: Location) -> bool:
    if not loc.is_dir():
        return bool(re.search(TABLE_FILE, loc.name))
    return bool(loc.files(TABLE_FILE))


def _split_of(loc: Location, root: Location) -> Optional[str]:
    """train / val / test by the file's name or a folder it is in (below the source), else None."""
    rel = loc.path[len(root.path.rstrip("/")) + 1:] if loc.path != root.path else loc.name
    for part in reversed(rel.split("/")):
        low = part.lower()
        for split, pattern in SPLIT_NAMES:
            if re.search(pattern, low):
                return split
    return None


def _group(loc: Location) -> dict[str, list[Location]]:
    files = [loc] if not loc.is_dir() else loc.files(TABLE_FILE)
    kinds = {_format(f.name) for f in files}
    if len(kinds) > 1:
        raise DataError(f"{loc.shown}: holds both Parquet and CSV files; use one format")
    if not loc.is_dir():
        return {"all": files}
    named = {f.shown: _split_of(f, loc) for f in files}
    if not any(named.values()):
        return {"all": files}
    loose = [shown for shown, split in named.items() if split is None]
    if loose:
        raise DataError(f"{loose[0]}: not named as a split (train*, validation*/val*, test*) while other files are; "
                        "name it, or move it out of the source folder")
    groups: dict[str, list[Location]] = {}
    for f in files:
        groups.setdefault(named[f.shown], []).append(f)
    if "train" not in groups:
        raise DataError(f"{loc.shown}: has {', '.join(sorted(groups))} files but no train* file")
    return groups


def _dataset(files: list[Location]) -> pads.Dataset:
    try:
        return pads.dataset([f.path for f in files], filesystem=files[0].fs, format=_format(files[0].name))
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{files[0].shown}: not a readable {_format(files[0].name)} table ({e})") from None


@dataclass
class Columns:
    """The mapping checked against a table's schema."""

    features: Optional[list[str]]
    image: Optional[str]
    label: str

    @property
    def read(self) -> list[str]:
        return [*(self.features or []), *([self.image] if self.image else []), self.label]


def _columns(spec: Optional[ColumnsSpec], schema: pa.Schema, where: str) -> Columns:
    names = schema.names
    if spec is None:
        if {"image", "label"} <= set(names):
            spec = ColumnsSpec(image="image", label="label")
        else:
            raise DataError(f"{where}: say which columns hold the data with data.columns (features: [..] or image: .., "
                            f"and label: ..); its columns are {names}")
    features = [spec.features] if isinstance(spec.features, str) else spec.features
    cols = Columns(features, spec.image, spec.label)
    for key, col in [*(("data.columns.features", c) for c in cols.features or []),
                     ("data.columns.image", cols.image), ("data.columns.label", cols.label)]:
        if col is not None and col not in names:
            raise DataError(f"{key}: no column {col!r} in {where}; its columns are {names}")
    return cols


def _feature_shape(cols: Columns, schema: pa.Schema, first: pa.RecordBatch, where: str) -> list[int]:
    if len(cols.features) > 1:
        for c in cols.features:
            t = schema.field(c).type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
                raise DataError(f"data.columns.features: column {c!r} of {where} is {t}; several feature columns must "
                                "each be a number (or name one list column)")
        return [len(cols.features)]
    c = cols.features[0]
    t = schema.field(c).type
    if isinstance(t, pa.FixedShapeTensorType):
        return list(t.shape)
    if pa.types.is_fixed_size_list(t):
        return [t.list_size]
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        lengths = pc.list_value_length(first.column(c)).to_numpy(zero_copy_only=False) if first.num_rows else [0]
        return [int(lengths[0])]
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return [1]
    raise DataError(f"data.columns.features: column {c!r} of {where} is {t}; use numbers, a list, or image: for image bytes")


def _features(batch: pa.RecordBatch, cols: Columns, shape: list[int], where: str) -> np.ndarray:
    if len(cols.features) > 1 or pa.types.is_integer(batch.schema.field(cols.features[0]).type) or \
            pa.types.is_floating(batch.schema.field(cols.features[0]).type):
        x = np.stack([batch.column(c).to_numpy(zero_copy_only=False) for c in cols.features], axis=1)
        return x.astype(np.float32)
    col = batch.column(cols.features[0])
    if isinstance(col.type, pa.FixedShapeTensorType):
        col = col.storage
    flat = col.flatten().to_numpy(zero_copy_only=False)
    width = int(np.prod(shape))
    if flat.size != batch.num_rows * width:
        raise DataError(f"data.columns.features: the lists of column {cols.features[0]!r} in {where} differ in length "
                        f"(the first row has {width} values); every row must have the same size")
    return flat.reshape(batch.num_rows, *shape).astype(np.float32)


def _label_kind(ds: pads.Dataset, label: str, where: str) -> tuple[dict, Optional[dict]]:
    """The task and classes the label column implies; string labels are mapped to sorted class indices."""
    t = ds.schema.field(label).type
    if pa.types.is_integer(t):
        top = pc.max(ds.to_table(columns=[label]).column(label)).as_py()
        return {"task": "classify", "num_classes": int(top if top is not None else -1) + 1}, None
    if pa.types.is_floating(t):
        return {"task": "regress"}, None
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        values = pc.unique(ds.to_table(columns=[label]).column(label).cast(pa.string())).to_pylist()
        classes = sorted(v for v in values if v is not None)
        return {"task": "classify", "num_classes": len(classes), "classes": classes}, {c: i for i, c in enumerate(classes)}
    raise DataError(f"data.columns.label: column {label!r} of {where} is {t}; labels are integers, strings or floats")


def _labels(col: pa.Array, mapping: Optional[dict], meta: dict, where: str) -> np.ndarray:
    if col.null_count:
        raise DataError(f"data.columns.label: {col.null_count} empty label(s) in {where}")
    if mapping is not None:
        return np.array([mapping[v] for v in col.cast(pa.string()).to_pylist()], dtype=np.int64)
    y = col.to_numpy(zero_copy_only=False)
    return y.astype(np.int64) if meta["task"] == "classify" else y.astype(np.float32)


def _file_rows(files: list[Location], cols: "Columns") -> list[int]:
    """Each file's row count, after checking it has the mapped columns: an empty file or one without them
    is refused by its own name (a folder's files may differ)."""
    counts = []
    for f in files:
        ds = _dataset([f])
        missing = [c for c in cols.read if c not in ds.schema.names]
        if missing:
            raise DataError(f"data.columns: no column {missing[0]!r} in {f.shown}; its columns are {ds.schema.names}")
        try:
            n = ds.count_rows()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f.shown}: not a readable table ({e})") from None
        if n == 0:
            raise DataError(f"{f.shown}: no rows")
        counts.append(n)
    return counts


def _part(files: list[Location], rows: list[int], cols: Columns, meta: dict, mapping, fmt) -> Part:
    """The rows of a split's files, file by file, so that every error names the file (and the row in it)."""

    def read() -> Chunks:
        for f in files:
            row = 0
            try:
                for batch in _dataset([f]).to_batches(columns=cols.read, batch_size=CHUNK_ROWS):
                    if not batch.num_rows:
                        continue
                    if cols.image:
                        x = np.stack(list(decode_column(batch.column(cols.image).to_pylist(), fmt,
                                                        f"{f.shown}, column {cols.image!r}", row)))
                    else:
                        x = _features(batch, cols, meta["shape"], f.shown)
                    yield x, _labels(batch.column(cols.label), mapping, meta, f.shown)
                    row += batch.num_rows
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{f.shown}: cannot read it past row {row} ({e})") from None

    return Part(sum(rows), read)


def table_source(loc: Location, spec: DataSpec) -> Source:
    groups = _group(loc)
    datasets = {part: _dataset(files) for part, files in groups.items()}
    where = next(iter(groups.values()))[0].shown
    cols = _columns(spec.columns, next(iter(datasets.values())).schema, where)
    rows = {part: _file_rows(files, cols) for part, files in groups.items()}  # every file: its columns, some rows
    try:
        label_meta, mapping = _label_kind(pads.dataset(list(datasets.values())), cols.label, where)
    except pa.ArrowException as e:  # e.g. the label column has another type in another file
        raise DataError(f"data.columns.label: column {cols.label!r} cannot be read across {loc.shown} ({e})") from None
    first = next(iter(next(iter(datasets.values())).to_batches(columns=cols.read, batch_size=1)), None)
    if first is None or not first.num_rows:
        raise DataError(f"{where}: no rows")
    schema = next(iter(datasets.values())).schema
    if cols.image:
        raw = image_bytes(first.column(cols.image)[0].as_py())
        if raw is None:
            raise DataError(f"data.columns.image: column {cols.image!r} of {where} holds no image bytes")
        fmt = image_format(bytes(raw), f"{where}, column {cols.image!r}, row 0", spec.image_size)
        meta = {"shape": fmt.shape, "dtype": "uint8", "scale": 1.0 / 255.0, **label_meta}
    else:
        fmt = None
        meta = {"shape": _feature_shape(cols, schema, first, where), "dtype": "float32", "scale": 1.0, **label_meta}
    return Source(meta, {part: _part(groups[part], rows[part], cols, meta, mapping, fmt) for part in groups})
