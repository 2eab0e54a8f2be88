"""Sources -> arrays: the built-in sources (scikit-learn's bundled digits, the synthetic `y = 3x + 2 + noise`
line, synthetic shapes) and local files (.npz, MNIST-style IDX files, a folder of images by class)."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np

from raybloom.errors import DataError

BUILTIN = ("digits", "linear", "shapes")


def _digits(samples: int | None, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return x, d.target.astype(np.int64), {"num_classes": 10, "task": "classify"}


def _linear(samples: int | None, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """The classic example: y = 3x + 2 + noise, x uniform in [0, 2]."""
    rng = np.random.default_rng(seed)
    n = samples or 200
    x = rng.uniform(0.0, 2.0, size=(n, 1)).astype(np.float32)
    y = (3.0 * x[:, 0] + 2.0 + rng.normal(0.0, 0.3, size=n)).astype(np.float32)
    return x, y, {"task": "regress", "true_w": 3.0, "true_b": 2.0}


def _shapes(samples: int | None, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """32x32 grey images of a circle, a square or a triangle at random places and sizes."""
    rng = np.random.default_rng(seed)
    n, size = samples or 2000, 32
    label = rng.integers(0, 3, size=n)
    r = rng.uniform(4, 9, size=(n, 1, 1))
    cx = rng.uniform(10, 22, size=(n, 1, 1))
    cy = rng.uniform(10, 22, size=(n, 1, 1))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx[None] - cx, yy[None] - cy
    circle = dx**2 + dy**2 <= r**2
    square = np.maximum(np.abs(dx), np.abs(dy)) <= r * 0.85
    triangle = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    masks = np.where((label == 0)[:, None, None], circle, np.where((label == 1)[:, None, None], square, triangle))
    intensity = rng.uniform(0.6, 1.0, size=(n, 1, 1))
    x = (masks * intensity).astype(np.float32)[:, None]
    return x, label.astype(np.int64), {"num_classes": 3, "task": "classify", "classes": ["circle", "square", "triangle"]}


def _labels_meta(y: np.ndarray) -> dict:
    if np.issubdtype(y.dtype, np.integer):
        return {"task": "classify", "num_classes": int(y.max()) + 1}
    return {"task": "regress"}


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            xk = next((k for k in ("x", "X", "images", "data") if k in keys), None)
            yk = next((k for k in ("y", "Y", "labels", "targets") if k in keys), None)
            if xk is None or yk is None:
                raise DataError(f"{path}: an .npz dataset needs arrays 'x' and 'y', found {keys}")
            x, y = f[xk], f[yk]
    except DataError:
        raise
    except Exception as e:  # zipfile/numpy errors on a corrupt file
        raise DataError(f"{path}: cannot read .npz file ({e})") from None
    if len(x) != len(y):
        raise DataError(f"{path}: 'x' has {len(x)} rows but 'y' has {len(y)}")
    if np.issubdtype(x.dtype, np.integer):  # 8-bit images: 0..255, like IDX and image folders
        x = x.astype(np.float32) / (255.0 if x.max(initial=0) <= 255 else float(x.max()))
    elif x.max(initial=0) > 1.0:
        x = x.astype(np.float32) / float(x.max())
    if x.ndim == 3:  # (N, H, W) images -> one channel
        x = x[:, None]
    y = y.astype(np.int64) if np.issubdtype(y.dtype, np.integer) else y.astype(np.float32)
    return x.astype(np.float32), y, _labels_meta(y)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # EOFError: a truncated .gz
        raise DataError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: IDX header is cut short ({len(raw)} bytes, truncated?)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: IDX header says {dims} but the file holds {body.size} values (truncated?)")
    return body.reshape(dims)


def _idx_folder(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    images = sorted(p for p in path.iterdir() if re.search(r"images[-.]idx3-ubyte(\.gz)?$", p.name))
    if not images:
        raise DataError(f"{path}: no '*-images-idx3-ubyte' file in this folder")
    xs, ys = [], []
    for img in images:
        lab = img.with_name(img.name.replace("images-idx3", "labels-idx1").replace("images.idx3", "labels.idx1"))
        if not lab.exists():
            raise DataError(f"{img}: no labels file beside it (expected {lab.name})")
        x, y = _read_idx(img), _read_idx(lab)
        if len(x) != len(y):
            raise DataError(f"{img}: {len(x)} images but {lab.name} has {len(y)} labels")
        xs.append(x)
        ys.append(y)
    x = (np.concatenate(xs).astype(np.float32) / 255.0)[:, None]
    y = np.concatenate(ys).astype(np.int64)
    return x, y, {"task": "classify", "num_classes": int(y.max()) + 1}


def _image_folder(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    from PIL import Image, UnidentifiedImageError

    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{path}: an image folder needs one sub-folder per class")
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((path / name).iterdir()) if f.is_file()]
    if not files:
        raise DataError(f"{path}: the class folders hold no images")
    try:
        first = Image.open(files[0][0])
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{files[0][0]}: not a readable image ({e})") from None
    mode = "L" if first.mode in ("L", "1", "P", "I;16") else "RGB"
    xs = []
    for f, _ in files:
        try:
            im = Image.open(f).convert(mode)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{f}: not a readable image ({e})") from None
        if im.size != first.size:
            raise DataError(f"{f}: size {im.size} differs from {files[0][0].name}'s {first.size}; resize the images to one size")
        xs.append(np.asarray(im, dtype=np.float32) / 255.0)
    x = np.stack(xs)
    x = x[:, None] if mode == "L" else x.transpose(0, 3, 1, 2)
    y = np.array([c for _, c in files], dtype=np.int64)
    return x, y, {"task": "classify", "num_classes": len(classes), "classes": classes}


def load_source(source: str, samples: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a source into (x, y, meta). x: (N, *shape) float32 in [0, 1] for images."""
    builders = {"digits": _digits, "linear": _linear, "shapes": _shapes}
    if source in builders:
        x, y, meta = builders[source](samples, seed)
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"{source}: no such file or folder; a data source is one of {', '.join(BUILTIN)}, "
                            "a prepared Parquet folder, an .npz file, a folder of IDX files or an image folder")
        if path.suffix == ".npz":
            x, y, meta = _npz(path)
        elif path.is_dir() and any(re.search(r"idx3-ubyte", p.name) for p in path.iterdir()):
            x, y, meta = _idx_folder(path)
        elif path.is_dir():
            x, y, meta = _image_folder(path)
        else:
            raise DataError(f"{source}: unsupported data file; use an .npz file, a folder of IDX files or an image folder")
    meta = {"source": source, "shape": list(x.shape[1:]), **meta}
    return x, y, meta
