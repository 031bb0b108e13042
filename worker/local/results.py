"""Result files: JSON lines, flushed per record, resumable after a kill."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from worker.records import compact_json, is_error


def completed_paths(path: Path) -> set[str]:
    """Paths that already have a record in a JSONL results file (for --resume)."""
    done: set[str] = set()
    if not path.exists():
        return done
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                done.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill: that image is simply done again
    return done


def drop_error_records(path: Path) -> int:
    """Rewrite a results file without its error records (and any line cut short by a kill), so a
    resumed run labels those images again and each still has one record. Returns how many went.

    Written to a temporary file beside it and renamed over it: a kill leaves the old file whole."""
    if not path.exists():
        return 0
    dropped = 0
    temporary = path.with_name(path.name + ".retry-tmp")
    with open(path, encoding="utf-8") as source, open(temporary, "w", encoding="utf-8") as kept:
        for line in source:
            try:
                record = json.loads(line)
                complete = line.endswith("\n") and "path" in record
            except ValueError:
                complete = False
            if complete and not is_error(record):
                kept.write(line)
            elif complete:
                dropped += 1
        kept.flush()
        os.fsync(kept.fileno())
    os.replace(temporary, path)
    return dropped


def _drop_partial_last_line(path: Path) -> None:
    """A killed writer can leave half a line; cut it so appended records start on a fresh line."""
    with open(path, "rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        position = size
        while position > 0:
            step = min(65536, position)
            position -= step
            handle.seek(position)
            block = handle.read(step)
            newline = block.rfind(b"\n")
            if newline >= 0:
                handle.truncate(position + newline + 1)
                return
        handle.truncate(0)


class JsonlWriter:
    """Appends one JSON line per record and flushes it, so a kill loses at most the batch in flight."""

    def __init__(self, path: Path, append: bool = False) -> None:
        self.path = Path(path)
        if append and self.path.exists():
            _drop_partial_last_line(self.path)
        self._handle = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(compact_json(record) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
