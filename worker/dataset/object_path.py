"""A run's output folder in object storage, behind the few pathlib.Path operations the dataset
layout uses, so files.py, shard_list.py and manifest.py take `s3://bucket/prefix/` and a
local folder through the same code.

An object store has no rename, so "whole or not at all" comes from the store itself: every file is
written with one PUT of its complete bytes (S3 makes an object visible only when its upload
completes), never streamed in parts a reader could catch half-written. There are no temporary
files to clean and no folders to create or fsync.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from worker.dataset.storage import filesystem_for, is_url, split_url

SINGLE_PUT_LIMIT = 5 * 2**30 - 1  # S3's largest single PUT


def as_location(out_dir: LocationLike) -> Location:
    """A URL as an ObjectPath; anything else as a local Path."""
    if isinstance(out_dir, ObjectPath | Path):
        return out_dir
    return ObjectPath(out_dir) if is_url(str(out_dir)) else Path(out_dir)


def canonical_output(output: str) -> str:
    """One spelling per output location, as the ledger stores it and workers compare it against
    their roots: a folder resolved (symlinks, `..`), a URL with its canonical protocol and no
    trailing slash (s3a://b/p/ -> s3://b/p)."""
    return ObjectPath(output).url if is_url(output) else os.path.realpath(output)


class ObjectPath:
    """`proto://bucket/key` with the Path methods the dataset layout needs."""

    def __init__(self, url: str) -> None:
        protocol, rest = split_url(url)
        self.protocol = protocol
        self.key = rest.strip("/")

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"ObjectPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, part: str) -> ObjectPath:
        return ObjectPath(f"{self.url}/{part}")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        return os.path.splitext(self.name)[0]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(f"{self.protocol}://{self.key.rsplit('/', 1)[0]}")

    def _fs(self) -> tuple[Any, str]:
        return filesystem_for(self.url)

    def is_file(self) -> bool:
        fs, path = self._fs()
        return bool(fs.isfile(path))

    def is_dir(self) -> bool:
        fs, path = self._fs()
        return bool(fs.isdir(path))

    def iterdir(self) -> Iterator[ObjectPath]:
        """The objects directly under this prefix (one listing, paginated by the client)."""
        fs, path = self._fs()
        try:
            entries = fs.ls(path, detail=True)
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.get("type") == "file":
                yield ObjectPath(f"{self.protocol}://{entry['name']}")

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        return (child for child in self.iterdir() if fnmatch.fnmatchcase(child.name, pattern))

    def read_bytes(self) -> bytes:
        fs, path = self._fs()
        return bytes(fs.cat_file(path))

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """The whole object in one PUT: readers see the old object or the new one, never a part."""
        if len(data) > SINGLE_PUT_LIMIT:
            raise ValueError(f"{self.url}: {len(data)} bytes is over S3's single-PUT limit")
        fs, path = self._fs()
        if self.protocol == "s3":
            fs.pipe_file(path, data, chunksize=SINGLE_PUT_LIMIT)  # s3fs splits at 2 x chunksize
        else:
            fs.pipe_file(path, data)
        return len(data)

    def unlink(self, missing_ok: bool = False) -> None:
        fs, path = self._fs()
        if not fs.isfile(path):
            if missing_ok:
                return
            raise FileNotFoundError(self.url)
        fs.rm_file(path)

    def size(self) -> int:
        fs, path = self._fs()
        return int(fs.info(path)["size"])

    def open_read(self) -> Any:
        fs, path = self._fs()
        return fs.open(path, "rb")


# Where a dataset's folder or file is: a local path or an object URL (worker/dataset/ stores both
# the same way); LocationLike also takes the text a user typed.
Location = Path | ObjectPath
LocationLike = Path | str | ObjectPath

def file_size(path: Location) -> int:
    return path.size() if isinstance(path, ObjectPath) else path.stat().st_size


def open_for_parquet(path: Location) -> Any:
    """What pyarrow.parquet reads: a local path as itself, an object as a file handle."""
    return path.open_read() if isinstance(path, ObjectPath) else path
