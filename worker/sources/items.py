"""The one interface the labeling paths read shards through: `iter_items(source, policy)`.

A shard's source is a list of paths (loose files or objects: each item names its path and the
pipeline reads it, on the fetch stage for objects) or a `Container` (one sequential read of a tar
or a Parquet file here, each sample handed on with its bytes). Either way every sample yields
exactly one item, and an item with an error becomes that sample's error row.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

from worker.pipeline.errors import ImageError
from worker.pipeline.reading import ReadPolicy
from worker.records import ErrorCode
from worker.sources.container import TAR, Container
from worker.sources.item import SourceItem
from worker.sources.streams import SourceUnavailable, open_container, open_versioned

Source = Sequence[str] | Container

__all__ = ["ShardError", "Source", "SourceItem", "SourceUnavailable", "count_container", "first_sample", "iter_items"]


def iter_items(source: Source, policy: ReadPolicy) -> Iterator[SourceItem]:
    """Every sample of the shard once, in file order. Raises SourceUnavailable when a store fails
    in the middle of a container (the samples after that point are unknown)."""
    if not isinstance(source, Container):
        for path in source:
            yield SourceItem(path)
        return
    try:
        stream, version = open_versioned(source.url, policy, source.offset if source.format == TAR else 0)
    except ImageError as exc:  # the file itself cannot be read: its one row says why
        yield SourceItem(source.url, error=exc, source={"source_url": source.url})
        return
    with stream:
        samples = _tar_items(stream, source, policy) if source.format == TAR else _parquet_items(stream, source, policy)
        for item in samples:
            item.source["source_version"] = version  # the file's: unchanged, a later run skips it whole
            yield item


def _tar_items(stream, source: Container, policy: ReadPolicy) -> Iterator[SourceItem]:
    from worker.sources.tar_samples import iter_tar_samples

    yield from iter_tar_samples(
        stream, source.url, max_bytes=policy.max_bytes, image_extension=source.image,
        start=source.start, stop=source.stop, offset=source.offset, gzip=source.gzip,
        repeats=frozenset(source.repeats),
    )  # fmt: skip


def _parquet_items(stream, source: Container, policy: ReadPolicy) -> Iterator[SourceItem]:
    """Rows [start, stop) of the file: the row groups that hold them, one at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from worker.sources.parquet_rows import ParquetImageError, iter_parquet_rows

    try:
        metadata = pq.ParquetFile(stream).metadata
    except SourceUnavailable:
        raise
    except (pa.ArrowException, OSError) as exc:  # pyarrow reports a damaged footer as either  # no footer to read: not a Parquet file, or cut short
        error = ImageError(ErrorCode.CORRUPT, f"not a readable Parquet file ({type(exc).__name__})")
        yield SourceItem(source.url, error=error, source={"source_url": source.url})
        return
    stream.seek(0)
    first, stop_group, row = 0, metadata.num_row_groups, 0
    stop = source.stop if source.stop is not None else metadata.num_rows
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if row + rows <= source.start:
            first = group + 1
        if row >= stop:
            stop_group = group
            break
        row += rows
    rows = iter_parquet_rows(
        stream, source.url, max_bytes=policy.max_bytes, image_column=source.image, key_column=source.key,
        row_groups=(first, stop_group), metadata=metadata,
    )  # fmt: skip
    try:
        for item in rows:
            if source.start <= item.source.get("source_row", 0) < stop:
                yield item
    except ParquetImageError as exc:  # no image column to read (a manifest named as a shard file?)
        yield SourceItem(source.url, error=ImageError(ErrorCode.BAD_COLUMN, str(exc)), source={"source_url": source.url})


@dataclass(frozen=True)
class ShardError:
    """The row a shard's sample gets without being read again: its path and source columns."""

    path: str
    source: dict = field(default_factory=dict)


def first_sample(source: Source, policy: ReadPolicy) -> ShardError:
    """The path (and source columns) of a one-sample shard, for the error row of a sample that
    kept killing workers: its bytes are never decoded here."""
    if not isinstance(source, Container):
        return ShardError(source[0])
    try:
        for item in iter_items(source, policy):
            return ShardError(item.path, item.source)
    except OSError:
        pass
    return ShardError(f"{source.url}#@{source.start}", {"source_url": source.url, "source_row": source.start})


def count_container(source: Container, policy: ReadPolicy) -> Container:
    """`source` with its sample count known (a header walk of a tar from its offset, a Parquet
    footer), so it can be halved. ImageError: the file cannot be opened."""
    if source.samples is not None:
        return source
    if source.stop is not None:
        return replace(source, samples=source.stop - source.start)
    if source.format == TAR:
        from worker.sources.tar_samples import index_tar

        with open_container(source.url, policy, source.offset) as stream:
            if source.gzip:
                with gzip.GzipFile(fileobj=stream) as readable:
                    total = index_tar(readable, every=1 << 62)[1] - source.start  # counted from the file's start
            else:
                total = index_tar(stream, every=1 << 62)[1]
    else:
        import pyarrow.parquet as pq

        with open_container(source.url, policy) as stream:
            total = pq.ParquetFile(stream).metadata.num_rows - source.start
    return replace(source, samples=max(total, 1))
