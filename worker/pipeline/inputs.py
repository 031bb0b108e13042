"""Expanding command-line INPUTS into image paths: files, directories, @list files and stdin."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm"}
)


def iter_input_paths(inputs: Iterable[str], stdin: TextIO | None = None) -> Iterator[str]:
    """Yield absolute paths in input order.

    Files and anything that does not exist are yielded as given (a missing file still gets its
    not_found record); directories are walked recursively, in sorted order, for files with image
    extensions; `@FILE` reads one path per line; `-` reads paths from stdin.
    """
    for item in inputs:
        if item == "-":
            yield from _iter_lines(stdin or sys.stdin)
        elif item.startswith("@") and len(item) > 1:
            with open(item[1:], encoding="utf-8") as handle:
                yield from _iter_lines(handle)
        elif os.path.isdir(item):
            yield from _walk_images(item)
        else:
            yield os.path.abspath(item)


def _iter_lines(handle: TextIO) -> Iterator[str]:
    for line in handle:
        path = line.rstrip("\r\n")
        if path.strip():
            yield os.path.abspath(path)


def _walk_images(directory: str) -> Iterator[str]:
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.abspath(os.path.join(root, name))


def unique(paths: Iterable[str], skip: set[str] | None = None) -> Iterator[str]:
    """Each path once, leaving out those in `skip` (already done)."""
    seen = set(skip or ())
    for path in paths:
        if path not in seen:
            seen.add(path)
            yield path
