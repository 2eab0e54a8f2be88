"""Images: folders of images by class (`root/<class>/*.png`, or `root/train/<class>/...` and
`root/test/<class>/...` whose own splits are kept), and encoded PNG/JPEG bytes in a table's column.

Every image becomes uint8 (channels, height, width): grey when the first image is grey, else RGB. Images
of mixed sizes need `data.image_size` ([height, width], or one number for squares), to which each is
resized (bilinear) when the data is prepared; without it the first odd one is refused by name. Images
are decoded `CHUNK` at a time: a folder of any size is never held whole.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from raybloom.data.fs import Location
from raybloom.data.rows import Chunks, Part, Source
from raybloom.errors import DataError
from raybloom.spec.sections import DataSpec

CHUNK = 256
SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class ImageFormat:
    """What every image of a source is turned into."""

    mode: str  # "L" or "RGB"
    size: tuple[int, int]  # (height, width)
    resize: bool  # data.image_size given: resize; else refuse another size

    @property
    def shape(self) -> list[int]:
        return [1 if self.mode == "L" else 3, *self.size]


def _open(raw: bytes, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(raw))
        im.load()
        return im
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{where}: not a readable image ({e})") from None


def image_format(first: bytes, where: str, image_size: Optional[list[int]]) -> ImageFormat:
    im = _open(first, where)
    mode = "L" if im.mode in ("L", "1", "P", "I;16", "I") else "RGB"
    if image_size:
        return ImageFormat(mode, (int(image_size[0]), int(image_size[-1])), True)
    return ImageFormat(mode, (im.height, im.width), False)


def decode(raw: bytes, fmt: ImageFormat, where: str) -> np.ndarray:
    """One encoded image as uint8 (channels, height, width) in `fmt`."""
    from PIL import Image

    im = _open(raw, where).convert(fmt.mode)
    if (im.height, im.width) != fmt.size:
        if not fmt.resize:
            raise DataError(f"{where}: size {im.height}x{im.width} (height x width) differs from the first image's "
                            f"{fmt.size[0]}x{fmt.size[1]}; set data.image_size: [H, W] to resize every image to one size")
        im = im.resize((fmt.size[1], fmt.size[0]), Image.Resampling.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _class_dirs(root: Location) -> list[Location]:
    return [d for d in root.entries() if d.is_dir()]


def _labelled_files(root: Location, classes: list[str]) -> list[tuple[Location, int]]:
    out = []
    for d in _class_dirs(root):
        if d.name not in classes:
            raise DataError(f"{d.shown}: class {d.name!r} is not among the training classes {classes}")
        out += [(f, classes.index(d.name)) for f in d.entries() if not f.is_dir()]
    return out


def _part(files: list[tuple[Location, int]], fmt: ImageFormat) -> Part:
    def read() -> Chunks:
        for i in range(0, len(files), CHUNK):
            chunk = files[i:i + CHUNK]
            yield (np.stack([decode(f.read_bytes(), fmt, f.shown) for f, _ in chunk]),
                   np.array([c for _, c in chunk], dtype=np.int64))

    return Part(len(files), read)


def image_folder_source(loc: Location, spec: DataSpec) -> Source:
    """One sub-folder per class; or train/ and test/ (and val/) sub-folders of those, kept as the splits."""
    subdirs = {d.name: d for d in _class_dirs(loc)}
    own = {SPLIT_DIRS[n.lower()]: d for n, d in subdirs.items() if n.lower() in SPLIT_DIRS and _class_dirs(d)}
    if own and "train" not in own:
        raise DataError(f"{loc.shown}: has {', '.join(sorted(own))}/ but no train/ folder of classes")
    roots = own or {"all": loc}
    classes = [d.name for d in _class_dirs(roots.get("train", loc))]
    if not classes:
        raise DataError(f"{loc.shown}: an image folder needs one sub-folder per class")
    files = {part: _labelled_files(root, classes) for part, root in roots.items()}
    first = next((f for fs in files.values() for f, _ in fs), None)  # the first by name sets mode and size
    if first is None:
        raise DataError(f"{loc.shown}: the class folders hold no images")
    fmt = image_format(first.read_bytes(), first.shown, spec.image_size)
    rng = np.random.default_rng(spec.split_seed)  # listed class by class: mixed, so a shard holds every class
    files = {part: [fs[i] for i in rng.permutation(len(fs))] for part, fs in files.items()}
    meta = {"shape": fmt.shape, "dtype": "uint8", "scale": 1.0 / 255.0, "task": "classify",
            "num_classes": len(classes), "classes": classes}
    return Source(meta, {part: _part(fs, fmt) for part, fs in files.items()})


def image_bytes(value) -> Optional[bytes]:
    """The encoded bytes of a table cell: plain binary, or a `{bytes, path}` struct (Hugging Face's export)."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, (bytes, bytearray, memoryview)) else None


def decode_column(values: list, fmt: ImageFormat, where: str, first_row: int) -> Iterator[np.ndarray]:
    for i, value in enumerate(values):
        raw = image_bytes(value)
        if raw is None:
            raise DataError(f"{where}, row {first_row + i}: no image bytes (got {type(value).__name__})")
        yield decode(bytes(raw), fmt, f"{where}, row {first_row + i}")
