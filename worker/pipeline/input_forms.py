"""The forms an input takes wherever it lives (a local file or an object): what makes a path an
image, a container or a manifest, and how a manifest's `path` column is read. Shared by the local
expansion (worker/pipeline/inputs.py) and the object-store one (worker/pipeline/object_inputs.py),
which both import it and not each other's internals."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from typing import BinaryIO, TextIO

from worker.dataset.storage import is_url
from worker.sources.container import PARQUET, TAR, Container, ContainerOptions, is_tar_name

Entry = str | Container

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pnm"}
)
MANIFEST_EXTENSIONS = frozenset({".parquet", ".csv"})
MANIFEST_COLUMN = "path"


class InputError(ValueError):
    """An input that names no paths the way it should (a manifest without a `path` column)."""


def entry_for(path: str, formats: ContainerOptions) -> Entry:
    """A path named in a list or a manifest: a tar or a Parquet file is a container, else an image."""
    if is_tar_name(path):
        return formats.container(TAR, path)
    if path.lower().endswith(".parquet"):
        return formats.container(PARQUET, path)
    return path


def as_input_path(path: str) -> str:
    """A URL as written; a local path made absolute (from the current directory)."""
    return path if is_url(path) else os.path.abspath(path)


def has_image_column(source: str | BinaryIO, where: str, formats: ContainerOptions) -> bool:
    """Whether a Parquet file holds image bytes (its footer only). A folder's metadata sidecars
    (img2dataset writes one beside each tar) do not."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from worker.sources.parquet_rows import ParquetImageError, find_image_columns

    try:
        schema = pq.ParquetFile(source).schema_arrow
        return find_image_columns(schema, where, formats.image_column, formats.key_column) is not None
    except (pa.ArrowException, ParquetImageError, OSError):
        return False


def parquet_input(source: str | BinaryIO, where: str, formats: ContainerOptions) -> Iterator[Entry]:
    """A named Parquet file: a container of image bytes, or a manifest of paths."""
    import pyarrow.parquet as pq

    from worker.sources.parquet_rows import ParquetImageError, find_image_columns

    try:
        schema = pq.ParquetFile(source).schema_arrow
        found = find_image_columns(schema, where, formats.image_column, formats.key_column)
    except ParquetImageError as exc:
        raise InputError(str(exc)) from None
    if found is not None:
        yield formats.container(PARQUET, where)
    elif MANIFEST_COLUMN in schema.names:
        if not isinstance(source, str):
            source.seek(0)
        yield from iter_manifest_values(parquet_column(source, where), formats)
    else:
        raise InputError(f"{where}: neither image bytes (a struct<bytes, path> or binary column; name it with "
                         f"--image-column) nor a {MANIFEST_COLUMN!r} column of paths (has {schema.names})")  # fmt: skip


def iter_manifest_values(values: Iterable[str], formats: ContainerOptions) -> Iterator[Entry]:
    for value in values:
        if value:
            yield entry_for(as_input_path(value), formats)


def parquet_column(source: str | BinaryIO, where: str, batch_rows: int = 65536) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(source)
    if MANIFEST_COLUMN not in table.schema_arrow.names:
        raise InputError(f"{where}: a manifest needs a {MANIFEST_COLUMN!r} column (has {table.schema_arrow.names})")
    for batch in table.iter_batches(batch_size=batch_rows, columns=[MANIFEST_COLUMN]):
        yield from (str(value) for value in batch.column(0).to_pylist() if value is not None)


def csv_column(handle: TextIO, where: str) -> Iterator[str]:
    reader = csv.DictReader(handle)
    if MANIFEST_COLUMN not in (reader.fieldnames or ()):
        raise InputError(f"{where}: a manifest needs a {MANIFEST_COLUMN!r} column (has {reader.fieldnames})")
    for row in reader:
        yield row[MANIFEST_COLUMN]
