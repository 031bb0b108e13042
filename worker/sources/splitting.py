"""Cutting large containers into ranges at enqueue (`--samples-per-shard N`), so a 100,000-sample
tar on a CPU worker is twenty jobs instead of one that takes an hour.

A tar's sample boundaries are found by one walk over its headers (data is skipped by seeking: on
local disk a few ms per thousand samples; on object storage the walk reads the file once), as
DALI's `wds2idx` does; each range records the byte offset of its first sample, so its worker starts
reading there. A Parquet file is cut at row-group boundaries from its footer alone. A file that
cannot be opened stays whole: its worker writes the row that says why.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from dataclasses import replace

from worker.pipeline.errors import ImageError
from worker.pipeline.reading import ReadPolicy
from worker.sources.container import TAR, Container
from worker.sources.streams import open_container

Entry = str | Container


def split_entries(entries: Iterable[Entry], every: int) -> Iterator[Entry]:
    """Each container of more than `every` samples as its ranges; everything else as it is."""
    for entry in entries:
        if isinstance(entry, Container) and entry.whole:
            yield from split_container(entry, every)
        else:
            yield entry


def split_container(container: Container, every: int) -> list[Container]:
    try:
        if container.format == TAR:
            return _split_tar(container, every)
        return _split_parquet(container, every)
    except (ImageError, OSError):
        return [container]


def _split_tar(container: Container, every: int) -> list[Container]:
    from worker.sources.tar_samples import index_tar

    repeats: list[int] = []  # keys repeated across ranges: each range's reader must know of them
    with open_container(container.url, ReadPolicy()) as stream:
        readable = gzip.GzipFile(fileobj=stream) if container.gzip else stream
        starts, total = index_tar(readable, every, repeats)
    if total <= every:
        return [container]
    container = replace(container, repeats=tuple(repeats))
    ranges = []
    for position, start in enumerate(starts):
        last = position + 1 == len(starts)
        stop = None if last else starts[position + 1].ordinal  # the last range reads to the end (and any damage)
        offset = 0 if container.gzip else start.offset  # a gzip stream cannot be entered mid-way
        ranges.append(container.ranged(start.ordinal, stop, offset, (total if last else stop) - start.ordinal))
    return ranges


def _split_parquet(container: Container, every: int) -> list[Container]:
    import pyarrow.parquet as pq

    from worker.sources.parquet_rows import row_group_ranges

    with open_container(container.url, ReadPolicy()) as stream:
        metadata = pq.ParquetFile(stream).metadata
    if metadata.num_rows <= every:
        return [container]
    first_rows = [0]
    for group in range(metadata.num_row_groups):
        first_rows.append(first_rows[-1] + metadata.row_group(group).num_rows)
    return [container.ranged(first_rows[first], first_rows[stop], 0, first_rows[stop] - first_rows[first])
            for first, stop in row_group_ranges(metadata, every)]  # fmt: skip
