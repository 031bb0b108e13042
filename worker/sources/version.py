"""What a source looked like when it was read: the `source_version` column (dataset schema 1.2).

An incremental run (`--skip-done-in`, worker/delta/) skips an input whose earlier row was made from
the same version, so the version must change whenever the bytes may have: a file's size and
modification time in nanoseconds (what rsync and make trust), an object's ETag (a new one on every
PUT), or its size and last-modified time where a store gives no ETag. A container's samples carry
the version of their shard file. The same functions serve the reader (recorded in each row) and
the comparison (the inputs' current versions), so the two can never be spelled differently.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


def file_version(info: os.stat_result) -> str:
    """`size:mtime_ns` of a local file (from the stat of the descriptor that was read)."""
    return f"{info.st_size}:{info.st_mtime_ns}"


def object_version(info: Mapping[str, Any]) -> str:
    """`etag:<ETag>` of an object (fsspec's info dict: s3fs says ETag, gcsfs and adlfs etag), else
    `size:last-modified`."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    modified = info.get("LastModified") or info.get("last_modified") or info.get("mtime") or info.get("updated")
    return f"{int(info.get('size') or 0)}:{modified}"


def current_version(path: str) -> str | None:
    """The version `path` (a local path or an object URL) has now; None when it cannot be read
    (missing, denied, a prefix): such an input is labeled again and gets its error row."""
    from worker.dataset.storage import is_url

    if not is_url(path):
        try:
            return file_version(os.stat(path))
        except OSError:
            return None
    from worker.dataset.storage import StorageUnavailable, filesystem_for  # noqa: F401 - raised on

    try:
        fs, key = filesystem_for(path)
        info = fs.info(key)
    except StorageUnavailable:
        raise
    except Exception:  # noqa: BLE001 - a store that cannot say: labeled again, never skipped
        return None
    return object_version(info) if info.get("type") == "file" else None
