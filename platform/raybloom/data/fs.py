"""Where a source lives: a local path, `file://...`, or any pyarrow filesystem URI (`s3://bucket/...`,
`gs://bucket/...`: every node that reads the data must reach it, with the usual credentials of that
store). Every source reads through these few calls."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from raybloom.errors import DataError


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str  # in `fs`'s own terms
    shown: str  # as the user wrote it (for messages)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def child(self, name: str) -> "Location":
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.shown.rstrip('/')}/{name}")

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def entries(self) -> list["Location"]:
        """The files and folders directly inside, sorted by name (hidden ones left out)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        names = sorted(i.base_name for i in infos if not i.base_name.startswith("."))
        return [self.child(n) for n in names]

    def files(self, pattern: str = r".*") -> list["Location"]:
        """Every file below (recursively) whose name matches `pattern`, sorted by path."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        rel = [i.path[len(self.path.rstrip("/")) + 1:] for i in infos if i.type == pafs.FileType.File]
        keep = sorted(r for r in rel if re.search(pattern, r.rsplit("/", 1)[-1]) and not any(
            p.startswith(".") for p in r.split("/")))
        return [self.child(r) for r in keep]

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path, compression=None) as f:  # as stored: .gz stays gzipped
                return f.read()
        except OSError as e:
            raise DataError(f"{self.shown}: cannot read ({e})") from None

    def open(self):
        return self.fs.open_input_file(self.path)


def locate(source: str) -> Location:
    """A source path or URI as a Location; a bad URI is a DataError naming it."""
    if "://" in source:
        try:
            fs, path = pafs.FileSystem.from_uri(source)
        except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{source}: not a path or filesystem URI pyarrow can open ({e})") from None
        return Location(fs, path, source)
    return Location(pafs.LocalFileSystem(), str(Path(source).resolve()), source)
