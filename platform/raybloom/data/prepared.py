"""Preparing a source (once, atomically) into its sharded Parquet form, and opening a prepared dataset.

Preparing streams the source part by part and chunk by chunk into per-split shard writers
(`shards.ShardWriter`), so no whole Parquet, CSV or image-folder source is ever in memory. The split
is deterministic by seed: a seeded permutation of the part's rows (counted up front) picks exactly
round(n × test_fraction) test and round(n × val_fraction) validation rows; rows keep their source order
within each split. A source's own test (or validation) split is kept as it is. Everything is written
into a temporary folder beside the target and renamed into place at the end: a killed prepare leaves
no half dataset.

Opening reads the manifest; each split is loaded into memory (`Arrays`, after checking it fits) or
streamed from its shards (`streamed.ShardedSplit`).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from raybloom.data.checks import check_rows
from raybloom.data.dataset import Arrays, Dataset, empty_split
from raybloom.data.shards import (MANIFEST, SPLITS, ShardWriter, is_ours, is_prepared, legacy_files, load_files,
                                  read_manifest, read_table, split_files, split_rows, table_to_arrays, write_manifest)
from raybloom.data.sources import BUILTIN, Source, open_source
from raybloom.data.streamed import ShardedSplit
from raybloom.errors import DataError
from raybloom.spec.sections import DataSpec

MEMORY_ENV = "RAYBLOOM_MEMORY_BYTES"  # the memory this process may use (default: what the system has available)
MEMORY_SHARE = 0.8  # of that, what one in-memory dataset may take


# --------------------------------------------------------------------------------------- preparing
def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test, n_val = int(round(n * test_fraction)), int(round(n * val_fraction))
    return {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]), "train": np.sort(perm[n_test + n_val:])}


def _routes(name: str, rows: int, own: set[str], spec: DataSpec) -> np.ndarray:
    """For each row of a source part, the index in SPLITS of the split it goes to."""
    if name in ("val", "test"):
        return np.full(rows, SPLITS.index(name), dtype=np.int8)
    val = spec.val_fraction if "val" not in own else 0.0
    test = spec.test_fraction if "test" not in own else 0.0
    route = np.zeros(rows, dtype=np.int8)
    for split, idx in split_indices(rows, val, test, spec.split_seed).items():
        route[idx] = SPLITS.index(split)
    return route


def _write_parts(source: Source, folder: Path, meta: dict, spec: DataSpec) -> dict[str, dict]:
    writers = {s: ShardWriter(folder, s, meta, int(spec.shard_mb * 2**20)) for s in SPLITS}
    own = set(source.parts) - {"all"}
    for name, part in source.parts.items():
        route, seen = _routes(name, part.rows, own, spec), 0
        where = spec.source if name == "all" else f"{spec.source} (its {name} part)"
        for x, y in part.read():
            if seen + len(x) > part.rows:
                raise DataError(f"{spec.source}: more rows than the {part.rows} counted (did it change while read?)")
            check_rows(x, y, meta, where, seen)
            codes = route[seen:seen + len(x)]
            for i, split in enumerate(SPLITS):
                mask = codes == i
                if mask.any():
                    writers[split].write(x[mask], y[mask])
            seen += len(x)
        if seen != part.rows:
            raise DataError(f"{spec.source}: {seen} rows read where {part.rows} were counted (did it change while read?)")
    return {s: w.close() for s, w in writers.items()}


def _publish(tmp: Path, folder: Path, replace: bool) -> None:
    """Move the finished dataset into place. A dataset another process published meanwhile (the same source,
    prepared at the same time: SuperNodes, trials) is kept and this copy dropped, unless `replace` (an
    explicit `data prepare` of an existing folder), which moves the old one aside first."""
    if folder.exists() and any(folder.iterdir()):
        if not is_ours(folder):
            raise DataError(f"{folder}: exists and is not a prepared dataset; refusing to replace it (choose another "
                            "--out / data.path)")
        if is_prepared(folder) and not replace:
            return
        old = folder.with_name(f".{folder.name}.old-{_tag()}-{secrets.token_hex(3)}")
        folder.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    elif folder.exists():
        folder.rmdir()
    try:
        tmp.rename(folder)
    except OSError:
        if not is_prepared(folder):  # anything but another process's complete dataset is an error
            raise


def _tag() -> str:
    """Which process (on which host) writes a temporary folder: part of its name."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _remove_dead_temps(folder: Path) -> None:
    """What a killed prepare of `folder` on this host left (its temporary folder): removed once its process
    is gone. Another host's are left alone (a data root may be shared): their process cannot be asked."""
    host = socket.gethostname()
    for tmp in [*folder.parent.glob(f".{folder.name}.prepare-*"), *folder.parent.glob(f".{folder.name}.old-*")]:
        try:
            owner, pid = tmp.name.split(".prepare-" if ".prepare-" in tmp.name else ".old-", 1)[1].rsplit("-", 2)[:2]
            if owner != host:
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def prepare_source(source: str | DataSpec, out: str | Path | None = None, *, val_fraction: float = 0.15,
                   test_fraction: float = 0.15, seed: int = 0, samples: int | None = None, replace: bool = True) -> Path:
    """Convert a source to a prepared, sharded Parquet folder (`raybloom data prepare`); returns the folder.
    `source` is a DataSpec, or a source name with the split settings as keywords. `replace=False`: a complete
    dataset found at the folder when this one is done (another process's) is kept."""
    spec = source if isinstance(source, DataSpec) else DataSpec(
        source=source, val_fraction=val_fraction, test_fraction=test_fraction, split_seed=seed, samples=samples)
    folder = Path(out) if out else default_folder(spec)
    src = open_source(spec)
    meta = {**src.meta, "val_fraction": spec.val_fraction, "test_fraction": spec.test_fraction,
            "split_seed": spec.split_seed, "own_splits": sorted(set(src.parts) - {"all"})}
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(folder)
    tmp = folder.with_name(f".{folder.name}.prepare-{_tag()}-{secrets.token_hex(3)}")
    try:
        splits = _write_parts(src, tmp, meta, spec)
        write_manifest(tmp, meta, splits)
        _publish(tmp, folder, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def data_root() -> Path:
    return Path(os.environ.get("RAYBLOOM_DATA_DIR", ".raybloom/data"))


def default_folder(spec: DataSpec) -> Path:
    """Under the data root, named by the source (and, for files, a hash of where it is: two `train.parquet`
    of different folders are different datasets) and everything that changes the prepared rows."""
    import hashlib

    source = spec.source
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", source if source in BUILTIN else source.rstrip("/").rsplit("/", 1)[-1])
    suffix = f"-n{spec.samples}" if spec.samples else ""
    if spec.image_size:
        suffix += f"-{spec.image_size[0]}x{spec.image_size[1]}"
    key = "" if source in BUILTIN else (source if "://" in source else str(Path(source).resolve()))
    if spec.columns is not None or spec.shape is not None:  # another mapping is another dataset
        key += f"|{spec.columns.model_dump_json() if spec.columns else ''}|{spec.shape}"
    if key:
        suffix += f"-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    return data_root() / f"{name}-v{spec.val_fraction:g}-t{spec.test_fraction:g}-s{spec.split_seed}{suffix}"


def resolve(spec: DataSpec) -> Path:
    """The prepared folder for a spec's `data` section, preparing built-in and local sources on first use."""
    if spec.path:
        folder = Path(spec.path)
        if is_prepared(folder):
            return folder
        found = legacy_files(folder) if folder.is_dir() else {}
        if found and not (folder / MANIFEST).exists():
            missing = [f"{s}.parquet" for s in SPLITS if s not in found]
            raise DataError(f"{folder}: prepared dataset is missing {', '.join(missing)}")
        try:
            manifest = read_manifest(folder)
        except DataError:  # unreadable: raybloom's own folder, prepared again below
            manifest = None
        if manifest is not None:
            gone = [f for s in SPLITS for f in manifest["splits"][s]["files"] if not (folder / f).exists()]
            raise DataError(f"{folder}: prepared dataset is missing {', '.join(gone[:5])}; prepare it again "
                            f"(`raybloom data prepare {spec.source} --out {folder}`)")
    elif spec.source not in BUILTIN and "://" not in spec.source and is_prepared(Path(spec.source)):
        return Path(spec.source)
    else:
        folder = default_folder(spec)
        if is_prepared(folder):
            return folder
    return prepare_source(spec, folder, replace=False)


# ---------------------------------------------------------------------------------------- opening
def available_memory() -> int:
    """Bytes this process may still use: $RAYBLOOM_MEMORY_BYTES, else what the system (or its cgroup) has free."""
    if os.environ.get(MEMORY_ENV):
        return int(float(os.environ[MEMORY_ENV]))
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:  # Linux: MemAvailable counts the page cache that can be reclaimed, which free pages do not
        found = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        free = int(found.group(1)) * 1024 if found else free
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return int(free)


def in_memory_bytes(meta: dict, rows: int) -> int:
    """What `rows` rows take as model inputs in memory (float32 features, int64 or float32 labels)."""
    return rows * (int(np.prod(meta["shape"])) * 4 + 8)


def check_fits(meta: dict, rows: dict[str, int], where: Path, copies: int = 1, way_out: str | None = None) -> None:
    """Refuse, before anything trains, splits that would not fit in this process's memory (or, `copies` > 1,
    in this machine's, for that many processes holding them each: Ray workers started here)."""
    need, have = copies * sum(in_memory_bytes(meta, n) for n in rows.values()), available_memory()
    if need > MEMORY_SHARE * have:
        gb = 2**30
        times = f" × {copies} workers" if copies > 1 else ""
        raise DataError(f"{where}: the {' + '.join(rows)} split(s) take {need / gb:.2f} GB in memory ({sum(rows.values()):,} "
                        f"rows as float32{times}), over {MEMORY_SHARE:.0%} of the {have / gb:.2f} GB available here; "
                        + (way_out or "stream them instead: scaling.ingest: ray_data (on Ray) or data.stream: true (in process)"))


def wants_stream(spec: DataSpec, folder: Path | None = None) -> bool:
    """Whether in-process training streams this data: `data.stream`, else a training split over `stream_above_mb`."""
    if spec.stream is not None:
        return spec.stream
    folder = folder or resolve(spec)
    meta = _meta(folder)
    return in_memory_bytes(meta, split_rows(folder, "train")) > spec.stream_above_mb * 2**20


def _meta(folder: Path) -> dict[str, Any]:
    manifest = read_manifest(folder)
    if manifest is not None:
        return dict(manifest["meta"])
    return read_table(split_files(folder, "train")[0])[1]


def read_split(folder: Path, split: str) -> tuple[Arrays, dict]:
    """One split in memory, with the metadata its files carry."""
    files = split_files(folder, split)
    meta = _meta(folder)
    if read_manifest(folder) is None:  # the earlier form: one file, its metadata (or none) in its schema
        table, file_meta = read_table(files[0])
        return table_to_arrays(table, file_meta, files[0]), meta
    return load_files(files, split_rows(folder, split), meta), meta


def _infer_classes(meta: dict, parts: dict) -> dict:
    """An earlier dataset's files carry no class count: the largest label over the splits read, plus one."""
    if meta.get("task") == "classify" and not meta.get("num_classes"):
        tops = [int(p.labels().max()) + 1 for p in parts.values() if len(p)]
        meta["num_classes"] = max(tops) if tops else 0
    return meta


def load(spec: DataSpec, splits: Sequence[str] = SPLITS, meta: dict[str, Any] | None = None,
         stream: Sequence[str] = ()) -> Dataset:
    """The dataset a spec names, preparing it first if needed: the `splits` asked for (the others empty),
    those in `stream` streamed from their shards, the rest in memory (checked to fit first). `meta`: the
    metadata a driver read, for a worker (an earlier dataset's class count is inferred over all splits)."""
    folder = resolve(spec)
    manifest = read_manifest(folder)
    meta = dict(meta) if meta is not None else _meta(folder)
    memory = [s for s in splits if s not in stream]
    rows = {s: split_rows(folder, s) for s in splits}
    if memory:
        check_fits(meta, {s: rows[s] for s in memory}, folder)
    parts: dict[str, Any] = {}
    for s in splits:
        if s in stream:
            parts[s] = ShardedSplit(split_files(folder, s), rows[s], meta)
        else:
            parts[s] = read_split(folder, s)[0]
    if manifest is None:
        meta = _infer_classes(meta, parts)
    meta = {**meta, "folder": str(folder)}
    for s in SPLITS:
        if s not in parts:
            parts[s] = empty_split(meta)
        elif isinstance(parts[s], ShardedSplit):
            parts[s].meta = meta
    train = parts["train"]
    if spec.train_limit:
        train = train.head(spec.train_limit)
    return Dataset(train, parts["val"], parts["test"], meta)
