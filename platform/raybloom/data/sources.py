"""Sources -> rows. A `Source` says what its rows are (shape, dtype, task, classes) and hands them out in
chunks, part by part: `all` (split by seed into train/val/test) or the source's own `train` / `val` /
`test`, which are kept (a source's own test split is never re-split). Nothing here holds a whole
Parquet, CSV or image-folder source in memory.

The built-in sources (scikit-learn's bundled digits, the synthetic `y = 3x + 2 + noise` line, synthetic
shapes) are made here; files are read by `files` (.npz, MNIST-style IDX), `tables` (Parquet and CSV
with a `data.columns` mapping) and `images` (image folders, encoded images).
"""

from __future__ import annotations

import numpy as np

from raybloom.data.files import idx_source, npz_source
from raybloom.data.images import image_folder_source
from raybloom.data.tables import is_table_source, table_source
from raybloom.data.fs import locate
from raybloom.data.rows import Source, in_memory
from raybloom.errors import DataError
from raybloom.spec.sections import DataSpec

BUILTIN = ("digits", "linear", "shapes", "shapes_rgb")


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
    return _shape_masks(np.random.default_rng(seed), samples)


def _shapes_rgb(samples: int | None, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """The colour variant: 32x32 RGB images, each shape in a random colour on a random dark background."""
    rng = np.random.default_rng(seed)
    x, label, meta = _shape_masks(rng, samples)
    n = len(x)
    colour = rng.uniform(0.35, 1.0, size=(n, 3, 1, 1)).astype(np.float32)
    background = rng.uniform(0.0, 0.25, size=(n, 3, 1, 1)).astype(np.float32)
    mask = (x > 0).astype(np.float32)  # (n, 1, 32, 32)
    rgb = mask * colour + (1.0 - mask) * background
    return rgb.astype(np.float32), label, meta


def _shape_masks(rng: np.random.Generator, samples: int | None) -> tuple[np.ndarray, np.ndarray, dict]:
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


def _builtin(spec: DataSpec) -> Source:
    builders = {"digits": _digits, "linear": _linear, "shapes": _shapes, "shapes_rgb": _shapes_rgb}
    x, y, meta = builders[spec.source](spec.samples, spec.split_seed)
    return Source({"shape": list(x.shape[1:]), "dtype": "float32", "scale": 1.0, **meta}, {"all": in_memory(x, y)})


KINDS = ("digits, linear, shapes, shapes_rgb, a prepared Parquet folder, an .npz file, a folder of IDX files, a Parquet or CSV "
         "file (or a folder of them) with data.columns, or an image folder")


def open_source(spec: DataSpec) -> Source:
    """The source a spec's `data` names, read lazily: nothing but headers and listings is read here."""
    if spec.source in BUILTIN:
        source = _builtin(spec)
    else:
        loc = locate(spec.source)
        if not loc.exists():
            raise DataError(f"{spec.source}: no such file or folder; a data source is one of {KINDS}")
        if loc.name.endswith(".npz"):
            source = npz_source(loc)
        elif is_table_source(loc):
            source = table_source(loc, spec)
        elif loc.is_dir() and loc.files(r"idx[13]-ubyte(\.gz)?$"):
            source = idx_source(loc)
        elif loc.is_dir():
            source = image_folder_source(loc, spec)
        else:
            raise DataError(f"{spec.source}: unsupported data file; a data source is one of {KINDS}")
    source.meta = {"source": spec.source, **source.meta}
    if spec.shape is not None:
        source.meta["shape"] = reshaped(source.meta["shape"], spec.shape, spec.source)
    return source


def reshaped(shape: list[int], to: list[int], where: str) -> list[int]:
    if int(np.prod(shape)) != int(np.prod(to)):
        raise DataError(f"data.shape: {to} holds {int(np.prod(to))} values, the rows of {where} have "
                        f"{int(np.prod(shape))} ({shape})")
    return list(to)
