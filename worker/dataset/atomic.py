"""Files that appear whole or not at all, on a local disk or a POSIX shared file system.

Write under a temporary name in the same folder, flush and fsync it, os.replace() it over the final
name, then fsync the folder so the rename itself survives a power cut. Readers only ever see the old
file or the new one; a writer killed before the rename leaves a temporary file nobody reads.
In object storage (worker/dataset/object_path.py) the same promise is one PUT of the whole file.
"""

from __future__ import annotations

import io
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from worker.dataset.object_path import Location, ObjectPath

TEMP_SUFFIX = ".tmp"


def temp_name(final: Path) -> Path:
    """A private temporary name beside `final`: hidden (leading dot) and not ending in the final
    name's suffix, so globs like `*.parquet` and pyarrow.dataset never pick it up. Random, because
    pids repeat across the nodes that share one output folder."""
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(6)}{TEMP_SUFFIX}")


def temp_glob(final: Path) -> str:
    """The glob matching every temporary file that `temp_name(final)` can produce."""
    return f".{final.name}.*{TEMP_SUFFIX}"


def fsync_dir(folder: Location) -> None:
    """Make a rename, create or unlink in `folder` durable (an object store's are already)."""
    if isinstance(folder, ObjectPath):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(folder: Location) -> None:
    """Create `folder` (and parents) durably: a new folder's own entry lives in its parent. An
    object store has no folders to create."""
    if isinstance(folder, ObjectPath):
        return
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(created.parent)


def atomic_write(final: Location, write: Callable[[BinaryIO], None]) -> int:
    """Run `write(handle)` into a temporary file, then make it `final` atomically and durably.
    Returns the bytes written. On any error the temporary file is removed and `final` is untouched.
    An object is written whole from memory with one PUT (a shard file is tens of MB at most)."""
    if isinstance(final, ObjectPath):
        buffer = io.BytesIO()
        write(buffer)
        return final.write_bytes(buffer.getvalue())
    temp = temp_name(final)
    try:
        with open(temp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            size = os.fstat(handle.fileno()).st_size
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
    return size
