"""A container shard: one WebDataset tar or one Parquet file of image bytes, or a range of one.

A run's shard list names a container instead of listing its samples (`DIR/shards/<id>.json` holds
`{"container": {...}}`), so enqueueing 100 M images in 10,000 tars writes 10,000 small entries and
opens none of them. Ranges cut a very large file into several shards: sample ordinals of a tar
(with the byte offset of the first, found by a header walk at enqueue), row groups of a Parquet file.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any

TAR = "tar"
PARQUET = "parquet"
FORMATS = (TAR, PARQUET)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class ContainerError(ValueError):
    """A stored container entry that does not say what to read."""


def is_tar_name(name: str) -> bool:
    return name.lower().endswith(TAR_SUFFIXES)


@dataclass(frozen=True)
class Container:
    """What one container shard reads. `start`/`stop`: tar sample ordinals or Parquet row groups
    (stop None: to the end); `offset`: a tar's byte offset of sample `start`; `samples`: how many
    samples the range holds where known (a Parquet footer, a tar's header walk), else None.
    `image` names the image member's extension (tar) or column (Parquet); `key` a Parquet key column."""

    format: str
    url: str
    start: int = 0
    stop: int | None = None
    offset: int = 0
    samples: int | None = None
    image: str | None = None
    key: str | None = None
    repeats: tuple[int, ...] = ()  # a tar range's ordinals whose key an earlier range had

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ContainerError(f"container format {self.format!r}: one of {', '.join(FORMATS)}")
        if not isinstance(self.url, str) or not self.url:
            raise ContainerError("a container needs a url")
        if self.start < 0 or self.offset < 0 or (self.stop is not None and self.stop <= self.start):
            raise ContainerError(f"{self.url}: bad range [{self.start}, {self.stop})")

    @property
    def gzip(self) -> bool:
        return self.format == TAR and self.url.lower().endswith((".tar.gz", ".tgz"))

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop is None

    def identity(self) -> str:
        """One string per container range: what deduplication and the listing hash see."""
        where = "" if self.whole else f"[{self.start}:{'' if self.stop is None else self.stop}]"
        return f"{self.format}:{self.url}{where}"

    def to_json(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if value not in (None, 0, ()) or name == "url"}

    @classmethod
    def from_json(cls, data: object) -> Container:
        if not isinstance(data, dict):
            raise ContainerError(f"a container entry is an object, got {type(data).__name__}")
        try:
            fields = {name: data[name] for name in data if name in _FIELDS}
            if "repeats" in fields:
                fields["repeats"] = tuple(fields["repeats"])
            return cls(**fields)
        except TypeError as exc:
            raise ContainerError(f"container entry {data!r:.200}: {exc}") from None

    def ranged(self, start: int, stop: int | None, offset: int = 0, samples: int | None = None) -> Container:
        """The range [start, stop) of this container (its repeats within it)."""
        repeats = tuple(o for o in self.repeats if o >= start and (stop is None or o < stop))
        return replace(self, start=start, stop=stop, offset=offset, samples=samples, repeats=repeats)

    @property
    def name(self) -> str:
        return os.path.basename(self.url.rstrip("/"))


_FIELDS = {"format", "url", "start", "stop", "offset", "samples", "image", "key", "repeats"}


@dataclass(frozen=True)
class ContainerOptions:
    """How a run reads its containers (`--image-ext`, `--image-column`, `--key-column`): every
    container entry carries them, so a worker reads a shard without the run's settings."""

    image_extension: str | None = None  # a tar sample's image member (e.g. "jpg"); None: its first image
    image_column: str | None = None  # a Parquet file's image column; None: found by type
    key_column: str | None = None  # a Parquet file's key column; None: "key" where there is one

    def container(self, format: str, url: str) -> Container:
        if format == TAR:
            return Container(TAR, url, image=self.image_extension)
        return Container(PARQUET, url, image=self.image_column, key=self.key_column)
