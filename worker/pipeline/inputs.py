"""Expanding command-line INPUTS into entries, streamed: image paths, and containers (WebDataset
`.tar` shards, Parquet files of image bytes; worker/sources/container.py) named one by one, in
@list files, on stdin, in manifests (Parquet or CSV files with a `path` column), found in a
directory or bucket prefix, or written in WebDataset's brace notation (`shards-{000..099}.tar`).

A Parquet file is a container when it has an image column (Hugging Face's `struct<bytes, path>`,
or a binary column like img2dataset's `jpg`) and a manifest when it has only a `path` column; one
named in a list or a manifest is taken as a container.

Nothing here holds the whole input in memory: directories are walked lazily, lists and manifests
are read line by line or batch by batch, so a 100 M-path manifest costs one batch of memory.
Object URLs (s3://bucket/key) take the same forms: a prefix is listed page by page
(worker/pipeline/object_inputs.py), and lists and manifests may live in a bucket.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

from worker.dataset.storage import is_url
from worker.pipeline.input_forms import (
    IMAGE_EXTENSIONS,
    MANIFEST_COLUMN,
    MANIFEST_EXTENSIONS,
    Entry,
    InputError,
    as_input_path,
    csv_column,
    entry_for,
    has_image_column,
    iter_manifest_values,
    parquet_column,
    parquet_input,
)
from worker.pipeline.object_inputs import is_prefix, iter_url_input, open_object_text
from worker.sources.container import PARQUET, TAR, ContainerOptions, is_tar_name

__all__ = ["IMAGE_EXTENSIONS", "MANIFEST_COLUMN", "MANIFEST_EXTENSIONS", "Entry", "InputError", "can_repeat",
           "expand_braces", "iter_input_paths", "parquet_column", "unique", "unique_by_digest"]  # fmt: skip

T = TypeVar("T")


def iter_input_paths(
    inputs: Iterable[str], stdin: TextIO | None = None, formats: ContainerOptions | None = None
) -> Iterator[Entry]:
    """Yield entries in input order: absolute paths (URLs as written) and containers.

    Files and anything that does not exist are yielded as given (a missing file still gets its
    not_found record); directories are walked recursively, in sorted order, for files with image
    extensions, tar shards and Parquet files with an image column; `@FILE` reads one path per line;
    `-` reads paths from stdin; a `.parquet` or `.csv` file with a `path` column is a manifest
    (relative paths are taken from the current directory, as for lists); a `.tar` is a container."""
    formats = formats or ContainerOptions()
    for item in inputs:
        expanded = expand_braces(item) if _has_braces(item) else [item]
        for one in expanded:
            yield from _expand_one(one, stdin, formats)


def _expand_one(item: str, stdin: TextIO | None, formats: ContainerOptions) -> Iterator[Entry]:
    if item == "-":
        yield from _iter_lines(stdin or sys.stdin, formats)
    elif item.startswith("@") and is_url(item[1:]):
        with open_object_text(item[1:]) as handle:
            yield from _iter_lines(handle, formats)
    elif item.startswith("@") and len(item) > 1:
        with open(item[1:], encoding="utf-8") as handle:
            yield from _iter_lines(handle, formats)
    elif is_url(item):
        yield from iter_url_input(item, formats)
    elif os.path.isdir(item):
        yield from _walk_images(item, formats)
    elif is_tar_name(item):
        yield formats.container(TAR, os.path.abspath(item))
    elif item.lower().endswith(".parquet") and os.path.isfile(item):
        yield from parquet_input(item, os.path.abspath(item), formats)
    elif os.path.splitext(item)[1].lower() in MANIFEST_EXTENSIONS and os.path.isfile(item):
        yield from _iter_manifest(item, formats)
    else:
        yield os.path.abspath(item)


def can_repeat(inputs: Iterable[str]) -> bool:
    """Whether these inputs may name a path twice (a single directory walk cannot)."""
    items = list(inputs)
    if len(items) == 1 and is_url(items[0]):
        return not is_prefix(items[0])
    return not (len(items) == 1 and os.path.isdir(items[0]))


_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def _has_braces(item: str) -> bool:
    """WebDataset's brace notation, unless a local file is literally named so."""
    return bool(_BRACES.search(item)) and (is_url(item) or not os.path.exists(item))


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar; `{a,b}` -> a, b; several groups
    multiply (as the `braceexpand` package WebDataset uses: zero padding follows the first bound)."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numbers = _RANGE.match(body)
    if numbers:
        low, high = numbers.group(1), numbers.group(2)
        step = 1 if int(high) >= int(low) else -1
        width = len(low) if low.lstrip("-").startswith("0") else 0
        choices = [f"{n:0{width}d}" for n in range(int(low), int(high) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [f"{head}{choice}{rest}" for choice in choices for rest in expand_braces(tail)]


def _iter_lines(handle: TextIO, formats: ContainerOptions) -> Iterator[Entry]:
    for line in handle:
        path = line.rstrip("\r\n")
        if path.strip():
            yield entry_for(as_input_path(path), formats)


def _walk_images(directory: str, formats: ContainerOptions) -> Iterator[Entry]:
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.abspath(os.path.join(root, name))
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield path
            elif is_tar_name(name):
                yield formats.container(TAR, path)
            elif name.lower().endswith(".parquet") and has_image_column(path, path, formats):
                yield formats.container(PARQUET, path)


def _iter_manifest(path: str, formats: ContainerOptions) -> Iterator[Entry]:
    yield from iter_manifest_values(_csv_column(path), formats)


def _csv_column(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8", newline="") as handle:
        yield from csv_column(handle, path)


def unique(paths: Iterable[str], skip: set[str] | None = None) -> Iterator[str]:
    """Each path once, leaving out those in `skip` (already done)."""
    seen = set(skip or ())
    for path in paths:
        if path not in seen:
            seen.add(path)
            yield path


def unique_by_digest(
    entries: Iterable[T], on_repeat: Callable[[T], None] | None = None, text: Callable[[T], str] = str
) -> Iterator[T]:
    """Each entry once, remembering a 128-bit digest of its `text` (a path, a container's identity)
    instead of the text (about 75 B of memory per entry; a collision that would drop one is ~1e-20
    likely at 100 M). `on_repeat` hears of each entry left out, so a summary can say how many were."""
    seen: set[int] = set()
    for entry in entries:
        digest = int.from_bytes(hashlib.blake2b(text(entry).encode("utf-8", "surrogateescape"), digest_size=16).digest())
        if digest not in seen:
            seen.add(digest)
            yield entry
        elif on_repeat is not None:
            on_repeat(entry)
