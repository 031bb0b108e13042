"""One image of a shard as the labeling pipeline receives it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from worker.pipeline.errors import ImageError
from worker.records import SOURCE_COLUMNS

__all__ = ["SOURCE_COLUMNS", "SourceItem", "repeated_sample_path", "sample_path"]



@dataclass
class SourceItem:
    """`path` is the row's unique id in the dataset: a loose file's path or URL, or `URL#key` for a
    container's sample. `data` None and `error` None: the pipeline reads `path` itself (a loose
    file, read on the fetch or decode threads). `source` holds SOURCE_COLUMNS values (may be empty)."""

    path: str
    data: bytes | None = None
    error: ImageError | None = None
    source: dict[str, Any] = field(default_factory=dict)


def sample_path(url: str, key: str) -> str:
    """The row path of a container's sample: unique per row, readable, joinable on `key`."""
    return f"{url}#{key}"


def repeated_sample_path(url: str, key: str, ordinal: int) -> str:
    """The row path of a sample whose key came before in the same file (its error row): unique,
    since no two samples share an ordinal."""
    return f"{url}#{key}#{ordinal}"
