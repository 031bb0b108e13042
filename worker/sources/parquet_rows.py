"""Image bytes from Parquet rows: Hugging Face image datasets and img2dataset's `output_format=parquet`.

Fleets keep millions of images inside Parquet files rather than as loose objects (one GET per
image costs CPU, money and rate limits; /work/shared/FIELD-NOTES.md, "Where fleets keep their
images"). Two layouts hold the bytes in a column:

- Hugging Face: `image: struct<bytes: binary, path: string>` (bytes win; a row with only a path
  names a file we cannot reach from here). The schema metadata key `huggingface` describes the
  dataset's own features (its ClassLabel names): we only read the file and leave it alone.
- img2dataset: a flat binary column named after the encode format (`jpg`, `png`, `webp`) beside a
  string `key` column (`000010005`: shard 1, item 5) and its url/caption/status columns.

(A Parquet file whose `path` column names image files is a manifest: worker/pipeline/inputs.py.)

Each row becomes exactly one `SourceItem`: its bytes, or an error row (null bytes, over the size
cap, a key seen before in the file, a column of the wrong type, a damaged row group), so one bad
row never stops a shard. Only the image and key columns are read, one row group at a time (Hub
image datasets write 100 rows a group); keys leave Arrow once per batch (`to_pylist`) and image
bytes are copied out of Arrow's buffer one row at a time, never through per-row scalars.

Failures: pyarrow reports damaged Parquet data (a page header that fails to parse, bad
compression) as ArrowException or a plain OSError; those rows become CORRUPT and later row groups
are still read. An exception raised by the file object itself (a dropped network connection) is
told apart from those by watching the object's calls, and propagates: the caller retries.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from worker.pipeline.errors import ImageError
from worker.records import ErrorCode
from worker.sources.item import SourceItem, repeated_sample_path, sample_path

# Names preferred when several columns could hold the image (Hub datasets, img2dataset's formats).
PREFERRED_IMAGE_COLUMNS = ("image", "jpg", "png", "webp")
KEY_COLUMN = "key"
IMAGE_COLUMN_FLAG = "--image-column"
BATCH_ROWS = 128  # rows per Arrow batch inside a row group: 13 MB of 100 KB images

Source = str | os.PathLike[str] | BinaryIO


class ParquetImageError(ValueError):
    """A Parquet file that cannot give image rows as asked (no image column, a named column it lacks,
    not a Parquet file): the caller turns it into an InputError at enqueue time."""


@dataclass(frozen=True)
class ImageColumns:
    image: str  # the image column's name
    struct: bool  # True: HF struct<bytes, path>; False: a flat binary/large_binary column
    key: str | None  # the file's own key column, else None


def _is_bytes(kind: pa.DataType) -> bool:
    return (
        pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_binary_view(kind)
        or pa.types.is_fixed_size_binary(kind)
    )


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _is_image_struct(kind: pa.DataType) -> bool:
    if not pa.types.is_struct(kind):
        return False
    fields = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
    return "bytes" in fields and _is_bytes(fields["bytes"]) and "path" in fields and _is_text(fields["path"])


def _is_key(kind: pa.DataType) -> bool:
    return _is_text(kind) or pa.types.is_integer(kind)


def _pick(candidates: list[str], where: str) -> str | None:
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    preferred = [name for name in candidates if name in PREFERRED_IMAGE_COLUMNS]
    if len(preferred) == 1:
        return preferred[0]
    raise ParquetImageError(
        f"{where}: several columns could hold the image ({', '.join(candidates)}): name one with {IMAGE_COLUMN_FLAG}"
    )


def find_image_columns(
    schema: pa.Schema, where: str, image_column: str | None = None, key_column: str | None = None
) -> ImageColumns | None:
    """The image column, named (`image_column`, of any type: a type that holds no bytes gives
    BAD_COLUMN rows) or found by type: the single HF struct<bytes, path> column, else the single
    binary column (image/jpg/png/webp preferred when several qualify). The key column: `key_column`
    (a string or integer column), else a string or integer column named `key`, else None.
    None: the file holds no image column (it may be a manifest of paths: the caller decides)."""
    names = schema.names
    if key_column is not None:
        if key_column not in names:
            raise ParquetImageError(f"{where}: no key column {key_column!r} (has {names})")
        if not _is_key(schema.field(key_column).type):
            raise ParquetImageError(
                f"{where}: key column {key_column!r} is {schema.field(key_column).type}, not a string or integer"
            )
        key = key_column
    else:
        key = KEY_COLUMN if KEY_COLUMN in names and _is_key(schema.field(KEY_COLUMN).type) else None
    if image_column is not None:
        if image_column not in names:
            raise ParquetImageError(f"{where}: no image column {image_column!r} (has {names})")
        struct = _is_image_struct(schema.field(image_column).type)
        return ImageColumns(image_column, struct, None if key == image_column else key)
    structs = [f.name for f in schema if _is_image_struct(f.type)]
    image = _pick(structs, where)
    if image is not None:
        return ImageColumns(image, True, key)
    image = _pick([f.name for f in schema if _is_bytes(f.type) and f.name != key], where)
    return ImageColumns(image, False, key) if image is not None else None


def row_count(source: Source | pq.FileMetaData, row_groups: tuple[int, int] | None = None) -> int:
    """The rows of the file (or of a [first, stop) row-group range), from the footer: no data read.
    `source` may be the file's metadata already read."""
    if isinstance(source, pq.FileMetaData):
        metadata = source
    else:
        with ExitStack() as stack:
            metadata = _open(source, _name(source), stack)[0].metadata
    first, stop = row_groups or (0, metadata.num_row_groups)
    return sum(metadata.row_group(group).num_rows for group in range(first, stop))


def row_group_ranges(metadata: pq.FileMetaData, every: int) -> list[tuple[int, int]]:
    """Consecutive [first, stop) row-group ranges of about `every` rows each, for cutting a large
    file into shards. A row group is never split: a range closes before a group that would take it
    as far past `every` as it stands short of it, or further (so a range never grows once it holds
    `every` rows)."""
    if every < 1:
        raise ValueError(f"every must be at least 1 (got {every})")
    ranges: list[tuple[int, int]] = []
    first, rows = 0, 0
    for group in range(metadata.num_row_groups):
        size = metadata.row_group(group).num_rows
        if rows and rows + size - every >= every - rows:
            ranges.append((first, group))
            first, rows = group, 0
        rows += size
    if first < metadata.num_row_groups:
        ranges.append((first, metadata.num_row_groups))
    return ranges


class _WatchedFile:
    """A file object whose own exceptions are remembered, so that a failing store (propagated, the
    caller retries) is told apart from damaged Parquet data (CORRUPT rows). pyarrow re-raises a
    file object's exception as itself, but reports damaged data as a plain OSError too."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.error: Exception | None = None

    def _watch(self, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except Exception as exc:
            self.error = exc
            raise

    def read(self, size: int = -1) -> bytes:
        return self._watch(self.raw.read, size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._watch(self.raw.seek, offset, whence)

    def tell(self) -> int:
        return self._watch(self.raw.tell)

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def _name(source: Source) -> str:
    return (
        os.fspath(source)
        if isinstance(source, str | os.PathLike)
        else str(getattr(source, "name", "Parquet file"))
    )


def _open(
    source: Source, where: str, stack: ExitStack, metadata: pq.FileMetaData | None = None
) -> tuple[pq.ParquetFile, _WatchedFile]:
    """The file to read and its watched handle (a local path is opened here, as a Python file, so
    its OS errors propagate as a store's do). Raises ParquetImageError when it is not Parquet."""
    if isinstance(source, str | os.PathLike):
        source = stack.enter_context(open(source, "rb"))  # noqa: SIM115 (closed by the stack)
    elif hasattr(source, "seekable") and not source.seekable():
        raise ParquetImageError(
            f"{where}: Parquet needs random access (its footer is at the end): not seekable"
        )
    watched = _WatchedFile(source)
    try:
        file = pq.ParquetFile(watched, metadata=metadata)
    except (pa.ArrowException, OSError) as exc:
        if watched.error is not None:
            raise
        raise ParquetImageError(f"{where}: not a readable Parquet file: {exc}") from exc
    stack.callback(file.close)
    return file, watched


def _bad_column(columns: ImageColumns, schema: pa.Schema) -> str | None:
    """The BAD_COLUMN message for an image column whose type holds no bytes; None when it does."""
    kind = schema.field(columns.image).type
    if columns.struct or _is_bytes(kind):
        return None
    return (
        f"column {columns.image!r} is {kind}, which holds no image bytes (a binary column or an "
        f"image struct<bytes, path>): name another with {IMAGE_COLUMN_FLAG}"
    )


def _iter_bytes(array: pa.Array) -> Iterator[bytes | None]:
    """Each value as Python bytes, copied out of the Arrow buffer as it is asked for: a batch made
    into bytes at once (to_pylist) takes fresh memory pages for every image and cost about twice
    the CPU (0.05-0.07 against 0.02-0.03 ms a 100 KB row here)."""
    kind = array.type
    if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)) or len(array) == 0:
        yield from array.to_pylist()
        return
    _, offset_buffer, data = array.buffers()
    width = np.int64 if pa.types.is_large_binary(kind) else np.int32
    offsets = np.frombuffer(offset_buffer, width)[array.offset : array.offset + len(array) + 1].tolist()
    view = memoryview(data if data is not None else b"")
    valid = array.is_valid().to_pylist() if array.null_count else [True] * len(array)
    for i, present in enumerate(valid):
        yield bytes(view[offsets[i] : offsets[i + 1]]) if present else None


class _Rows:
    """Turns a file's batches into items, remembering the keys seen (128-bit digests)."""

    def __init__(self, url: str, columns: ImageColumns, max_bytes: int, bad: str | None) -> None:
        self.url, self.columns, self.max_bytes, self.bad = url, columns, max_bytes, bad
        self.seen: set[int] = set()

    def items(self, start: int, count: int, batch: pa.RecordBatch | None) -> Iterator[SourceItem]:
        """The items of rows start..start+count-1; batch None: no columns read (a bad image column
        and no key column)."""
        keyed = batch is not None and self.columns.key is not None
        keys = batch.column(self.columns.key).to_pylist() if keyed else [None] * count
        if self.bad is not None or batch is None:
            for row, key in enumerate(keys, start):
                item = self._item(row, None if key is None else str(key))
                item.error = item.error or ImageError(ErrorCode.BAD_COLUMN, str(self.bad))
                yield item
            return
        images, paths = self._images(batch)
        for row, key, data, path in zip(range(start, start + count), keys, images, paths, strict=True):
            item = self._item(row, None if key is None else str(key))
            if item.error is None:
                item.error = self._check(data, path)
                if item.error is None:
                    item.data = data
            yield item

    def _images(self, batch: pa.RecordBatch) -> tuple[Iterator[bytes | None], list[str | None]]:
        column = batch.column(self.columns.image)
        if not self.columns.struct:
            return _iter_bytes(column), [None] * len(column)
        children = column.flatten()  # with the struct's own nulls (field() ignores them)
        data = children[column.type.get_field_index("bytes")]
        paths = children[column.type.get_field_index("path")]
        return _iter_bytes(data), paths.to_pylist()

    def _item(self, row: int, key: str | None) -> SourceItem:
        """The row's item with its path; a DUPLICATE_KEY error when its name came before (a row
        without a key is named by its number, checked against the keys too: paths stay unique)."""
        source = {"source_url": self.url, "source_key": key, "source_row": row}
        name = key if key is not None else str(row)
        if self.columns.key is None:  # row numbers never repeat
            return SourceItem(sample_path(self.url, name), source=source)
        digest = int.from_bytes(
            hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=16).digest()
        )
        if digest in self.seen:
            error = ImageError(ErrorCode.DUPLICATE_KEY, f"key {name!r} came before in this file (row {row})")
            return SourceItem(repeated_sample_path(self.url, name, row), error=error, source=source)
        self.seen.add(digest)
        return SourceItem(sample_path(self.url, name), source=source)

    def _check(self, data: bytes | None, path: str | None) -> ImageError | None:
        column = self.columns.image
        if data is None:
            if path:
                return ImageError(
                    ErrorCode.NO_IMAGE, f"column {column!r} has only a path ({path!r}), no image bytes"
                )
            return ImageError(ErrorCode.NO_IMAGE, f"column {column!r} has no image in this row")
        if len(data) > self.max_bytes:
            return ImageError(
                ErrorCode.TOO_LARGE, f"image is {len(data)} bytes, over the {self.max_bytes}-byte cap"
            )
        if not data:
            return ImageError(ErrorCode.DECODE_FAILED, "empty image (0 bytes)")
        return None

    def corrupt(self, start: int, count: int, group: int, exc: BaseException) -> Iterator[SourceItem]:
        """Rows of a damaged row group: CORRUPT, each at its row-number path (their keys are unread)."""
        message = f"row group {group} is damaged: {type(exc).__name__}: {' '.join(str(exc).split())}"
        for row in range(start, start + count):
            item = self._item(row, None)
            item.error = item.error or ImageError(ErrorCode.CORRUPT, message)
            yield item


def iter_parquet_rows(
    source: Source,
    url: str,
    *,
    max_bytes: int,
    image_column: str | None = None,
    key_column: str | None = None,
    row_groups: tuple[int, int] | None = None,
    metadata: pq.FileMetaData | None = None,
) -> Iterator[SourceItem]:
    """One SourceItem per row of `source` (a local path, or a seekable binary file object, left
    open), in file order: path `url#key` (the key column's value; the row number when the file has
    no key column or the key is null), `source` columns, and the image bytes or the row's error.
    `row_groups`: a [first, stop) row-group range (None: all); `metadata`: the footer where the
    caller read it already (one ranged GET fewer per file on object storage). Raises ParquetImageError when the
    file has no image column (and none was named), lacks a named column, or is not Parquet; an
    exception of the file object itself (or the local file's OSError) propagates."""
    with ExitStack() as stack:
        file, watched = _open(source, url, stack, metadata)
        schema, metadata = file.schema_arrow, file.metadata
        columns = find_image_columns(schema, url, image_column, key_column)
        if columns is None:
            raise ParquetImageError(
                f"{url}: no image column (a binary column or an image struct<bytes, path>; has "
                f"{schema.names}): name one with {IMAGE_COLUMN_FLAG}; a file of paths is a manifest (`path` column)"
            )
        first, stop = row_groups or (0, metadata.num_row_groups)
        if not 0 <= first <= stop <= metadata.num_row_groups:
            raise ParquetImageError(
                f"{url}: row groups [{first}, {stop}) outside the file's {metadata.num_row_groups}"
            )
        bad = _bad_column(columns, schema)
        read = [name for name in (None if bad else columns.image, columns.key) if name is not None]
        rows = _Rows(url, columns, max_bytes, bad)
        start = sum(metadata.row_group(group).num_rows for group in range(first))
        for group in range(first, stop):
            count = metadata.row_group(group).num_rows
            if not read:
                yield from rows.items(start, count, None)
                start += count
                continue
            done = 0  # rows of the group given so far: the rest are CORRUPT if reading fails
            try:
                for batch in file.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=read):
                    for item in rows.items(start + done, batch.num_rows, batch):
                        done += 1
                        yield item
            except (pa.ArrowException, OSError) as exc:
                if watched.error is not None:
                    raise
                yield from rows.corrupt(start + done, count - done, group, exc)
            start += count
