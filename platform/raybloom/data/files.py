"""Array files: `.npz` (arrays `x`/`y`, or Keras' `x_train`/`y_train`/`x_test`/`y_test`) and folders of
MNIST-style IDX files (plain or `.gz`; `train-*` files are the train pool, `t10k-*` / `*test*` the test
split). Images stay uint8 on disk; they become [0, 1] when batches are made."""

from __future__ import annotations

import gzip
import io

import numpy as np

from raybloom.data.fs import Location
from raybloom.data.rows import Source, in_memory, labels_meta
from raybloom.errors import DataError

X_KEYS = ("x", "X", "images", "data")
Y_KEYS = ("y", "Y", "labels", "targets")


def _as_images(x: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); channels-last (N, H, W, C) with C of 1, 3 or 4 -> channels first."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    return x


def _stored(xs: list[np.ndarray]) -> tuple[list[np.ndarray], str, float]:
    """The arrays as stored (8-bit images stay uint8) and the scale that makes them model inputs."""
    if not all(np.isfinite(x).all() for x in xs if np.issubdtype(x.dtype, np.floating)):
        return [x.astype(np.float32) for x in xs], "float32", 1.0  # as they are: preparing names the row (checks)
    top = max(float(x.max(initial=0)) for x in xs)
    if all(np.issubdtype(x.dtype, np.integer) for x in xs) and top <= 255 and min(float(x.min(initial=0)) for x in xs) >= 0:
        return [x.astype(np.uint8) for x in xs], "uint8", 1.0 / 255.0
    if all(np.issubdtype(x.dtype, np.integer) for x in xs) or top > 1.0:  # other ranges: into [0, 1] by the maximum
        return [(x.astype(np.float32) / top).astype(np.float32) for x in xs], "float32", 1.0
    return [x.astype(np.float32) for x in xs], "float32", 1.0


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    y = y.reshape(len(y), -1) if len(y) else y.reshape(0, 1)
    if y.shape[1] != 1:
        raise DataError(f"{where}: labels must be one value per row, got shape {list(y.shape)}")
    y = y[:, 0]
    return y.astype(np.int64) if np.issubdtype(y.dtype, np.integer) else y.astype(np.float32)


def npz_source(loc: Location) -> Source:
    try:
        with np.load(io.BytesIO(loc.read_bytes()), allow_pickle=False) as f:
            keys = list(f.keys())
            if {"x_train", "y_train"} <= set(keys):  # Keras' layout: its test split is kept as the test split
                named = {"train": ("x_train", "y_train")}
                if {"x_test", "y_test"} <= set(keys):
                    named["test"] = ("x_test", "y_test")
            else:
                xk = next((k for k in X_KEYS if k in keys), None)
                yk = next((k for k in Y_KEYS if k in keys), None)
                if xk is None or yk is None:
                    raise DataError(f"{loc.shown}: an .npz dataset needs arrays 'x' and 'y' (or Keras' x_train, y_train, "
                                    f"x_test, y_test), found {keys}")
                named = {"all": (xk, yk)}
            arrays = {part: (f[xk], f[yk]) for part, (xk, yk) in named.items()}
    except DataError:
        raise
    except Exception as e:  # zipfile/numpy errors on a corrupt file
        raise DataError(f"{loc.shown}: cannot read .npz file ({e})") from None
    for part, (xk, yk) in named.items():
        x, y = arrays[part]
        if len(x) != len(y):
            raise DataError(f"{loc.shown}: '{xk}' has {len(x)} rows but '{yk}' has {len(y)}")
    xs, dtype, scale = _stored([_as_images(x) for x, _ in arrays.values()])
    ys = [_labels(y, loc.shown) for _, y in arrays.values()]
    meta = {"shape": list(xs[0].shape[1:]), "dtype": dtype, "scale": scale, **labels_meta(np.concatenate(ys))}
    if any(list(x.shape[1:]) != meta["shape"] for x in xs):
        raise DataError(f"{loc.shown}: x_train and x_test rows differ in shape ({[list(x.shape[1:]) for x in xs]})")
    return Source(meta, {part: in_memory(x, y) for part, x, y in zip(arrays, xs, ys)})


def read_idx(loc: Location) -> np.ndarray:
    raw = loc.read_bytes()
    if loc.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:  # EOFError: a truncated .gz
            raise DataError(f"{loc.shown}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{loc.shown}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{loc.shown}: IDX header is cut short ({len(raw)} bytes, truncated?)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{loc.shown}: IDX header says {dims} but the file holds {body.size} values (truncated?)")
    return body.reshape(dims)


def _idx_part(name: str) -> str:
    low = name.lower()
    if "t10k" in low or "test" in low:
        return "test"
    return "train" if "train" in low else "all"


def idx_source(loc: Location) -> Source:
    """Every `*-images-idx3-ubyte` with its `*-labels-idx1-ubyte`, grouped into the train pool and test split."""
    images = loc.files(r"images[-.]idx3-ubyte(\.gz)?$")
    if not images:
        raise DataError(f"{loc.shown}: no '*-images-idx3-ubyte' file in this folder")
    groups: dict[str, tuple[list, list]] = {}
    for img in images:
        lab = img.name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1")
        lab_loc = Location(img.fs, img.path[: -len(img.name)] + lab, img.shown[: -len(img.name)] + lab)
        if not lab_loc.exists():
            raise DataError(f"{img.shown}: no labels file beside it (expected {lab})")
        x, y = read_idx(img), read_idx(lab_loc)
        if len(x) != len(y):
            raise DataError(f"{img.shown}: {len(x)} images but {lab} has {len(y)} labels")
        xs, ys = groups.setdefault(_idx_part(img.name), ([], []))
        xs.append(x)
        ys.append(y)
    if "all" in groups and len(groups) > 1:
        raise DataError(f"{loc.shown}: {', '.join(i.name for i in images)}: name the files train-* and t10k-* (or "
                        "*test*), or use one kind only")
    if set(groups) == {"test"}:
        raise DataError(f"{loc.shown}: only test images (t10k-*/ *test*); a training set needs train-* files")
    parts = {p: (np.concatenate(xs)[:, None], np.concatenate(ys).astype(np.int64)) for p, (xs, ys) in groups.items()}
    meta = {"shape": list(next(iter(parts.values()))[0].shape[1:]), "dtype": "uint8", "scale": 1.0 / 255.0,
            **labels_meta(np.concatenate([y for _, y in parts.values()]))}
    return Source(meta, {p: in_memory(x, y) for p, (x, y) in parts.items()})
