"""Image rows from Parquet files (worker/sources/parquet_rows.py): a Hub file written by Hugging
Face `datasets` itself, img2dataset's parquet layout, and every kind of bad row."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from worker.records import ErrorCode
from worker.sources.item import repeated_sample_path, sample_path
from worker.sources.parquet_rows import (
    ImageColumns,
    ParquetImageError,
    find_image_columns,
    iter_parquet_rows,
    row_count,
    row_group_ranges,
)

CAP = 1 << 20


def _image(i: int, ext: str = ".jpg") -> bytes:
    """A small, distinct encoded image."""
    pixels = np.full((12, 16, 3), (i * 37) % 256, np.uint8)
    pixels[:, : i % 16] = 255 - pixels[:, : i % 16]
    ok, encoded = cv2.imencode(ext, pixels)
    assert ok
    return encoded.tobytes()


def _rows(source, url: str | None = None, **kwargs):
    kwargs.setdefault("max_bytes", CAP)
    return list(iter_parquet_rows(source, url or str(source), **kwargs))


def _code(item) -> str | None:
    return None if item.error is None else str(item.error.code)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def hf_datasets(tmp_path, monkeypatch):
    """Hugging Face `datasets`, offline, its caches under tmp_path."""
    for name, value in {
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
    }.items():
        monkeypatch.setenv(name, value)
    datasets = pytest.importorskip("datasets")
    # config is read at import: set it again in case an earlier test imported datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    datasets.disable_progress_bars()
    return datasets


def test_hub_file_written_by_datasets(tmp_path, hf_datasets):
    images = [_image(i, ".png" if i % 3 == 0 else ".jpg") for i in range(10)]
    names = ["cat", "dog", "teapot"]
    dataset = (
        hf_datasets.Dataset.from_dict(
            {
                "image": [{"bytes": b, "path": f"img{i}.jpg"} for i, b in enumerate(images)],
                "label": [i % 3 for i in range(10)],
            }
        )
        .cast_column("image", hf_datasets.Image())
        .cast_column("label", hf_datasets.ClassLabel(names=names))
    )
    path = tmp_path / "train-00000-of-00001.parquet"
    dataset.to_parquet(str(path), batch_size=4)
    before = _digest(path)

    parquet = pq.ParquetFile(path)
    assert parquet.metadata.num_row_groups == 3
    assert find_image_columns(parquet.schema_arrow, str(path)) == ImageColumns("image", struct=True, key=None)
    items = _rows(path)

    assert [item.path for item in items] == [sample_path(str(path), str(i)) for i in range(10)]
    assert [item.data for item in items] == images
    assert all(item.error is None for item in items)
    assert items[7].source == {"source_url": str(path), "source_key": None, "source_row": 7}
    # the dataset's own features stay in the file, untouched: we only read
    assert _digest(path) == before
    features = json.loads(pq.read_schema(path).metadata[b"huggingface"])["info"]["features"]
    assert features["label"] == {"names": names, "_type": "ClassLabel"}
    assert hf_datasets.Dataset.from_parquet(str(path)).features["label"].names == names


def test_hub_rows_without_bytes_are_no_image(tmp_path, hf_datasets):
    """A row with only a path (an image file elsewhere) or no image at all: NO_IMAGE, said which."""
    elsewhere = (
        tmp_path / "cat.jpg"
    )  # a local image the file names but does not hold (to_parquet keeps paths)
    elsewhere.write_bytes(_image(1))
    features = hf_datasets.Features({"image": hf_datasets.Image(), "label": hf_datasets.Value("int64")})
    values = [
        {"bytes": _image(0), "path": None},
        {"bytes": None, "path": str(elsewhere)},
        None,
        {"bytes": _image(3), "path": "b.jpg"},
    ]
    dataset = hf_datasets.Dataset.from_dict({"image": values, "label": [0, 1, 2, 3]}, features=features)
    path = tmp_path / "paths.parquet"
    dataset.to_parquet(str(path))
    items = _rows(path)
    assert [_code(item) for item in items] == [None, ErrorCode.NO_IMAGE, ErrorCode.NO_IMAGE, None]
    assert "only a path" in items[1].error.message and str(elsewhere) in items[1].error.message
    assert "no image" in items[2].error.message
    assert items[1].data is None and items[3].data == _image(3)


def _flat_file(path: Path, table: pa.Table, row_group_size: int) -> Path:
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_row_group_ranges_read_slices_of_the_file(tmp_path):
    images = [_image(i) for i in range(10)]
    path = _flat_file(tmp_path / "groups.parquet", pa.table({"jpg": images}), row_group_size=3)
    metadata = pq.read_metadata(path)
    assert [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)] == [3, 3, 3, 1]
    assert row_count(path) == 10 and row_count(metadata, (1, 3)) == 6
    with open(path, "rb") as handle:
        assert row_count(handle, (3, 4)) == 1

    everything = _rows(path)
    ranges = row_group_ranges(metadata, 5)
    assert ranges == [(0, 2), (2, 4)]
    pieces = [item for first_stop in ranges for item in _rows(path, row_groups=first_stop)]
    assert [(i.path, i.data, i.source) for i in pieces] == [(i.path, i.data, i.source) for i in everything]
    middle = _rows(path, row_groups=(1, 3))
    assert [(i.path, i.data) for i in middle] == [(i.path, i.data) for i in everything[3:9]]
    assert middle[0].source["source_row"] == 3
    assert _rows(path, row_groups=(2, 2)) == []
    with pytest.raises(ParquetImageError, match="outside"):
        _rows(path, row_groups=(3, 5))


def test_row_group_ranges_cut_sizes():
    def metadata(*sizes):
        return SimpleNamespace(
            num_row_groups=len(sizes), row_group=lambda g: SimpleNamespace(num_rows=sizes[g])
        )

    hub = metadata(*[100] * 25)  # Hub image datasets: 100 rows a group
    assert row_group_ranges(hub, 1000) == [(0, 10), (10, 20), (20, 25)]
    assert row_group_ranges(hub, 1) == [(g, g + 1) for g in range(25)]
    assert row_group_ranges(hub, 10**6) == [(0, 25)]
    # a group is never split; a range stops where it is nearest `every`
    assert row_group_ranges(metadata(600, 600, 600), 1000) == [(0, 2), (2, 3)]  # 1200 is nearer than 600
    assert row_group_ranges(metadata(400, 400, 400, 5000, 10), 1000) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert row_group_ranges(metadata(), 1000) == []
    with pytest.raises(ValueError):
        row_group_ranges(hub, 0)


def _img2dataset_file(path: Path, keys: list[str], images: list[bytes | None]) -> Path:
    """img2dataset's `output_format=parquet` shard, written the way its ParquetSampleWriter does.

    img2dataset itself is not installed (its writer module imports webdataset, fsspec and the rest at
    import time, and the package pulls albumentations and wandb): this copies img2dataset 1.47's
    schema (downloader.py: the input columns, then key, status, error_message, width, height,
    original_width, original_height, exif, sha256; writer.py appends the `jpg` binary column last)
    and its BufferedParquetWriter (one write_table, so one row group, per 100 samples)."""
    schema = pa.schema(
        [
            ("url", pa.string()),
            ("caption", pa.string()),
            ("key", pa.string()),
            ("status", pa.string()),
            ("error_message", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("original_width", pa.int32()),
            ("original_height", pa.int32()),
            ("exif", pa.string()),
            ("sha256", pa.string()),
            ("jpg", pa.binary()),
        ]
    )
    with pq.ParquetWriter(path, schema) as writer:
        for first in range(0, len(keys), 100):
            buffer = {name: [] for name in schema.names}
            for key, image in zip(keys[first : first + 100], images[first : first + 100], strict=True):
                ok = image is not None
                sample = {
                    "url": f"https://example.com/{key}.jpg",
                    "caption": f"photo {key}",
                    "key": key,
                    "status": "success" if ok else "failed_to_download",
                    "error_message": None if ok else "HTTP Error 404: Not Found",
                    "width": 16 if ok else None,
                    "height": 12 if ok else None,
                    "original_width": 16 if ok else None,
                    "original_height": 12 if ok else None,
                    "exif": "{}" if ok else None,
                    "sha256": hashlib.sha256(image).hexdigest() if ok else None,
                    "jpg": image,
                }
                for name in schema.names:
                    buffer[name].append(sample[name])
            writer.write_table(pa.Table.from_pydict(buffer, schema))
    return path


def test_img2dataset_layout(tmp_path):
    keys = [f"{1:05d}{i:04d}" for i in range(230)]  # shard 1: 000010000, 000010001, ...
    images: list[bytes | None] = [_image(i) for i in range(230)]
    images[5] = None  # a failed download: a row with its status, no bytes
    path = _img2dataset_file(tmp_path / "00001.parquet", keys, images)
    url = "s3://bucket/laion/00001.parquet"
    parquet = pq.ParquetFile(path)
    assert parquet.metadata.num_row_groups == 3
    assert find_image_columns(parquet.schema_arrow, url) == ImageColumns("jpg", struct=False, key="key")

    items = _rows(path, url)
    assert [item.path for item in items] == [f"{url}#{key}" for key in keys]
    assert items[5].path == f"{url}#000010005" and _code(items[5]) == ErrorCode.NO_IMAGE
    assert [item.data for i, item in enumerate(items) if i != 5] == [b for b in images if b is not None]
    assert items[150].source == {"source_url": url, "source_key": "000010150", "source_row": 150}


def test_bad_rows(tmp_path):
    big = b"\xff\xd8" + bytes(2000)
    table = pa.table(
        {
            "key": ["a", "b", "a", None, "c", "d", "5", "e"],
            "caption": ["x"] * 8,
            "jpg": [_image(0), None, _image(2), _image(3), big, b"", _image(6), _image(7)],
        }
    )
    path = _flat_file(tmp_path / "bad.parquet", table, row_group_size=3)
    url = "file.parquet"
    items = _rows(path, url, max_bytes=1000)
    assert [_code(item) for item in items] == [
        None,
        ErrorCode.NO_IMAGE,  # null bytes
        ErrorCode.DUPLICATE_KEY,  # "a" again
        None,  # a null key: the row number names it
        ErrorCode.TOO_LARGE,
        ErrorCode.DECODE_FAILED,  # empty bytes, as an empty loose file
        None,
        None,
    ]
    assert [item.path for item in items] == [
        f"{url}#a",
        f"{url}#b",
        repeated_sample_path(url, "a", 2),
        f"{url}#3",
        f"{url}#c",
        f"{url}#d",
        f"{url}#5",
        f"{url}#e",
    ]
    assert len({item.path for item in items}) == len(items)
    assert items[3].source == {"source_url": url, "source_key": None, "source_row": 3}
    assert items[2].source["source_key"] == "a" and items[2].data is None
    assert "2002 bytes" in items[4].error.message and items[4].data is None
    assert items[0].data == _image(0) and items[3].data == _image(3)


def test_keyless_and_integer_keyed_files(tmp_path):
    images = [_image(i) for i in range(5)]
    keyless = _flat_file(tmp_path / "keyless.parquet", pa.table({"caption": list("abcde"), "png": images}), 2)
    assert [(i.path, i.source["source_key"], i.data) for i in _rows(keyless, "u")] == [
        (f"u#{n}", None, images[n]) for n in range(5)
    ]
    numbered = pa.table(
        {"key": pa.array([10, 11, 10, 13, 14], pa.int64()), "image": pa.array(images, pa.large_binary())}
    )
    items = _rows(_flat_file(tmp_path / "int.parquet", numbered, 2), "u")
    assert [i.path for i in items] == ["u#10", "u#11", "u#10#2", "u#13", "u#14"]
    assert [i.source["source_key"] for i in items] == ["10", "11", "10", "13", "14"]
    assert _code(items[2]) == ErrorCode.DUPLICATE_KEY and items[4].data == images[4]


def test_a_named_column_that_holds_no_bytes_gives_bad_column_rows(tmp_path):
    table = pa.table(
        {"key": [f"k{i}" for i in range(5)], "width": pa.array(range(5), pa.int64()), "jpg": [_image(0)] * 5}
    )
    path = _flat_file(tmp_path / "wrong.parquet", table, row_group_size=2)
    items = _rows(path, "u", image_column="width")
    assert [i.path for i in items] == [f"u#k{i}" for i in range(5)]
    assert all(_code(i) == ErrorCode.BAD_COLUMN and i.data is None for i in items)
    assert "'width'" in items[0].error.message and "int64" in items[0].error.message
    assert "--image-column" in items[0].error.message
    # a key-less file: nothing to read at all, the rows counted from the footer
    strings = _flat_file(tmp_path / "strings.parquet", pa.table({"image": ["a.jpg", "b.jpg", "c.jpg"]}), 2)
    items = _rows(strings, "v", image_column="image")
    assert [(i.path, _code(i)) for i in items] == [(f"v#{n}", ErrorCode.BAD_COLUMN) for n in range(3)]
    assert "string" in items[0].error.message


def test_image_columns_found_by_type(tmp_path):
    def schema(**columns):
        return pa.schema(list(columns.items()))

    hub = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert find_image_columns(schema(path=pa.string()), "m") is None  # a manifest of paths
    assert find_image_columns(schema(photo=hub, thumb=pa.binary()), "f") == ImageColumns("photo", True, None)
    assert find_image_columns(schema(thumb=pa.binary(), jpg=pa.large_binary()), "f").image == "jpg"
    assert find_image_columns(schema(key=pa.binary(), jpg=pa.binary()), "f") == ImageColumns(
        "jpg", False, None
    )
    with pytest.raises(ParquetImageError, match=r"thumb, full.*--image-column"):
        find_image_columns(schema(thumb=pa.binary(), full=pa.binary()), "f")
    with pytest.raises(ParquetImageError, match="no image column 'img'"):
        find_image_columns(schema(jpg=pa.binary()), "f", image_column="img")
    assert find_image_columns(schema(id=pa.int32(), jpg=pa.binary()), "f", key_column="id").key == "id"
    with pytest.raises(ParquetImageError, match="key column 'id'"):
        find_image_columns(schema(jpg=pa.binary()), "f", key_column="id")

    manifest = _flat_file(tmp_path / "manifest.parquet", pa.table({"path": ["/a.jpg"]}), 10)
    with pytest.raises(ParquetImageError, match="no image column.*--image-column"):
        _rows(manifest)


def test_null_structs_and_large_binary_bytes(tmp_path):
    hub = pa.struct([("bytes", pa.large_binary()), ("path", pa.large_string())])
    images = pa.array(
        [
            {"bytes": _image(0), "path": None},
            None,
            {"bytes": None, "path": None},
            {"bytes": _image(3), "path": "x"},
        ],
        hub,
    )
    path = _flat_file(tmp_path / "structs.parquet", pa.table({"image": images}), 10)
    items = _rows(path)
    assert [_code(i) for i in items] == [None, ErrorCode.NO_IMAGE, ErrorCode.NO_IMAGE, None]
    assert items[0].data == _image(0) and items[3].data == _image(3)


def test_a_corrupt_row_group_spoils_only_its_rows(tmp_path):
    images = [_image(i) + bytes(range(256)) * 8 for i in range(12)]
    table = pa.table({"key": [f"k{i:02d}" for i in range(12)], "jpg": images})
    path = _flat_file(tmp_path / "corrupt.parquet", table, row_group_size=4)
    metadata = pq.read_metadata(path)
    page = metadata.row_group(1).column(metadata.schema.names.index("jpg")).data_page_offset
    with open(path, "r+b") as handle:  # the page header of group 1's image column
        handle.seek(page)
        handle.write(b"\xff" * 16)

    items = _rows(path, "u")
    assert len(items) == 12
    assert [_code(i) for i in items] == [None] * 4 + [ErrorCode.CORRUPT] * 4 + [None] * 4
    assert [i.data for i in items[:4] + items[8:]] == images[:4] + images[8:]
    assert [i.path for i in items[4:8]] == [f"u#{row}" for row in range(4, 8)]  # keys unread
    assert "row group 1" in items[4].error.message
    assert [i.source["source_row"] for i in items] == list(range(12))


class _FlakyFile(io.RawIOBase):
    """A store's file object that fails once told to (a dropped connection)."""

    def __init__(self, path: Path, error: Exception) -> None:
        self.inner = open(path, "rb")  # noqa: SIM115
        self.error: Exception | None = None
        self.later = error

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.inner.seek(offset, whence)

    def tell(self) -> int:
        return self.inner.tell()

    def readinto(self, buffer) -> int:
        if self.error is not None:
            raise self.error
        return self.inner.readinto(buffer)

    def close(self) -> None:
        self.inner.close()
        super().close()


@pytest.mark.parametrize("error", [ConnectionError("reset by peer"), OSError("timed out")])
def test_errors_of_the_file_object_propagate(tmp_path, error):
    path = _flat_file(tmp_path / "f.parquet", pa.table({"jpg": [_image(i) for i in range(6)]}), 2)
    flaky = _FlakyFile(path, error)
    rows = iter_parquet_rows(flaky, "u", max_bytes=CAP)
    assert next(rows).data == _image(0)
    assert next(rows).data == _image(1)
    flaky.error = flaky.later
    with pytest.raises(type(error)) as raised:
        next(rows)
    assert raised.value is error
    flaky.close()


def test_file_objects(tmp_path):
    path = _flat_file(
        tmp_path / "f.parquet", pa.table({"key": ["a", "b", "c"], "jpg": [_image(i) for i in range(3)]}), 2
    )
    with open(path, "rb") as handle:
        items = _rows(handle, "s3://b/f.parquet")
        assert not handle.closed  # the caller's
    assert [(i.path, i.data) for i in items] == [
        (f"s3://b/f.parquet#{k}", _image(n)) for n, k in enumerate("abc")
    ]
    with open(path, "rb") as handle:
        in_memory = _rows(io.BytesIO(handle.read()), "s3://b/f.parquet")
    assert [(i.path, i.data) for i in in_memory] == [(i.path, i.data) for i in items]

    class Stream(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            return 0

    with pytest.raises(ParquetImageError, match="random access"):
        _rows(io.BufferedReader(Stream()), "stdin")


def test_not_parquet(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_bytes(_image(0))
    with pytest.raises(ParquetImageError, match="not a readable Parquet file"):
        _rows(path)
    with pytest.raises(ParquetImageError, match="not a readable Parquet file"):
        row_count(path)
    with pytest.raises(FileNotFoundError):
        _rows(tmp_path / "missing.parquet")
