"""Expanding command-line INPUTS into image paths, streamed: files, directories, @list files,
stdin, and manifests (Parquet or CSV files with a `path` column).

Nothing here holds the whole input in memory: directories are walked lazily, lists and manifests
are read line by line or batch by batch, so a 100 M-path manifest costs one batch of memory.
Object URLs (s3://bucket/key) take the same forms: a prefix is listed page by page
(worker/pipeline/object_inputs.py), and lists and manifests may live in a bucket.
"""

from __future__ import annotations

import csv
import hashlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, TextIO

from worker.dataset.storage import is_url

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm"}
)
MANIFEST_EXTENSIONS = frozenset({".parquet", ".csv"})
MANIFEST_COLUMN = "path"


class InputError(ValueError):
    """An input that names no paths the way it should (a manifest without a `path` column)."""


def iter_input_paths(inputs: Iterable[str], stdin: TextIO | None = None) -> Iterator[str]:
    """Yield absolute paths in input order.

    Files and anything that does not exist are yielded as given (a missing file still gets its
    not_found record); directories are walked recursively, in sorted order, for files with image
    extensions; `@FILE` reads one path per line; `-` reads paths from stdin; a `.parquet` or `.csv`
    file is a manifest whose `path` column names the images (relative paths are taken from the
    current directory, as for lists).
    """
    for item in inputs:
        if item == "-":
            yield from _iter_lines(stdin or sys.stdin)
        elif item.startswith("@") and is_url(item[1:]):
            from worker.pipeline.object_inputs import open_object_text

            with open_object_text(item[1:]) as handle:
                yield from _iter_lines(handle)
        elif item.startswith("@") and len(item) > 1:
            with open(item[1:], encoding="utf-8") as handle:
                yield from _iter_lines(handle)
        elif is_url(item):
            from worker.pipeline.object_inputs import iter_url_input

            yield from iter_url_input(item)
        elif os.path.isdir(item):
            yield from _walk_images(item)
        elif os.path.splitext(item)[1].lower() in MANIFEST_EXTENSIONS and os.path.isfile(item):
            yield from _iter_manifest(item)
        else:
            yield os.path.abspath(item)


def can_repeat(inputs: Iterable[str]) -> bool:
    """Whether these inputs may name a path twice (a single directory walk cannot)."""
    items = list(inputs)
    if len(items) == 1 and is_url(items[0]):
        from worker.pipeline.object_inputs import is_prefix

        return not is_prefix(items[0])
    return not (len(items) == 1 and os.path.isdir(items[0]))


def _iter_lines(handle: TextIO) -> Iterator[str]:
    for line in handle:
        path = line.rstrip("\r\n")
        if path.strip():
            yield as_input_path(path)


def as_input_path(path: str) -> str:
    """A URL as written; a local path made absolute (from the current directory)."""
    return path if is_url(path) else os.path.abspath(path)


def _walk_images(directory: str) -> Iterator[str]:
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.abspath(os.path.join(root, name))


def _iter_manifest(path: str) -> Iterator[str]:
    values = _parquet_column(path) if path.lower().endswith(".parquet") else _csv_column(path)
    yield from iter_manifest_values(values)


def iter_manifest_values(values: Iterable[str]) -> Iterator[str]:
    for value in values:
        if value:
            yield as_input_path(value)


def _parquet_column(path: str, batch_rows: int = 65536) -> Iterator[str]:
    yield from parquet_column(path, path, batch_rows)


def parquet_column(source: str | BinaryIO, where: str, batch_rows: int = 65536) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(source)
    if MANIFEST_COLUMN not in table.schema_arrow.names:
        raise InputError(f"{where}: a manifest needs a {MANIFEST_COLUMN!r} column (has {table.schema_arrow.names})")
    for batch in table.iter_batches(batch_size=batch_rows, columns=[MANIFEST_COLUMN]):
        yield from (str(value) for value in batch.column(0).to_pylist() if value is not None)


def _csv_column(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8", newline="") as handle:
        yield from csv_column(handle, path)


def csv_column(handle: TextIO, where: str) -> Iterator[str]:
    reader = csv.DictReader(handle)
    if MANIFEST_COLUMN not in (reader.fieldnames or ()):
        raise InputError(f"{where}: a manifest needs a {MANIFEST_COLUMN!r} column (has {reader.fieldnames})")
    for row in reader:
        yield row[MANIFEST_COLUMN]


def unique(paths: Iterable[str], skip: set[str] | None = None) -> Iterator[str]:
    """Each path once, leaving out those in `skip` (already done)."""
    seen = set(skip or ())
    for path in paths:
        if path not in seen:
            seen.add(path)
            yield path


def unique_by_digest(paths: Iterable[str], on_repeat: Callable[[str], None] | None = None) -> Iterator[str]:
    """Each path once, remembering a 128-bit digest per path instead of the path (about 75 B of
    memory per path; a collision that would drop a path is ~1e-20 likely at 100 M paths).
    `on_repeat` hears of each path left out, so a summary can say how many were."""
    seen: set[int] = set()
    for path in paths:
        digest = int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=16).digest())
        if digest not in seen:
            seen.add(digest)
            yield path
        elif on_repeat is not None:
            on_repeat(path)
