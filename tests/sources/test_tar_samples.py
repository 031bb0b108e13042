"""WebDataset tars read by worker/sources/tar_samples.py: the same samples as `webdataset`'s own
reader for valid shards written by its own TarWriter, one row per sample, and rows (never silence,
never an exception) for shards cut short or damaged."""

from __future__ import annotations

import gzip
import io
import random
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from webdataset import tariterators

from worker.records import ErrorCode
from worker.sources.item import SourceItem, repeated_sample_path, sample_path
from worker.sources.tar_samples import count_samples, index_tar, iter_tar_samples

URL = "s3://bucket/shard-000000.tar"
CAP = 1 << 20


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", pixels)[1].tobytes()


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    return cv2.imencode(".png", pixels)[1].tobytes()


def _write(samples: list[dict], compress: bool = False) -> bytes:
    """A shard written by webdataset's own TarWriter (members of a sample in sorted extension order)."""
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False, mtime=1.5, compress=compress) as writer:
        for sample in samples:
            writer.write(sample)
    return buffer.getvalue()


def _tarfile(members: list[tuple[str, bytes | None]], format: int = tarfile.PAX_FORMAT) -> bytes:
    """A shard written member by member with tarfile (None: a directory)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _read(data: bytes, **options) -> list[SourceItem]:
    options.setdefault("max_bytes", CAP)
    return list(iter_tar_samples(io.BytesIO(data), URL, **options))


def _rows(items: list[SourceItem]) -> list[tuple]:
    """What a row says, comparable."""
    return [(i.path, i.data, i.error and i.error.code, i.source) for i in items]


def _webdataset_samples(data: bytes, tmp_path: Path) -> list[dict]:
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    return list(tariterators.tarfile_samples([{"url": str(path)}]))


def _member_offsets(data: bytes) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of each member of a valid tar, found by tarfile."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar.getmembers()]


class _Unseekable(io.RawIOBase):
    """A pipe-like stream: no seeking, and short reads of at most `most` bytes."""

    def __init__(self, data: bytes, most: int = 1000) -> None:
        self._data = io.BytesIO(data)
        self._most = most

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        return self._data.read(min(n, self._most))


MIXED = [
    {"__key__": "train/000000", "jpg": _jpeg(0), "txt": b"a cat", "json": b'{"w": 24}', "cls": b"3"},
    {"__key__": "train/000001", "seg.png": _png(1), "jpg": _jpeg(1)},  # jpg comes first (sorted)
    {"__key__": "val.v2/" + "deep/" * 25 + "000002", "PNG": _png(2)},  # long name, dotted folder, upper case
    {"__key__": "000003", "txt": b"no image here", "json": b"{}"},
    {"__key__": "000004", "webp": b"not really webp", "txt": b"x"},
    {"__key__": "000005", "jpg": bytes(3000)},  # over a 2000-byte cap
    {"__key__": "naïve/日本語 key", "jpeg": _jpeg(6)},  # a pax path in UTF-8
]


def test_valid_shard_gives_webdatasets_samples(tmp_path):
    data = _write(MIXED)
    items = _read(data, max_bytes=2000)
    reference = _webdataset_samples(data, tmp_path)
    assert [i.source["source_key"] for i in items] == [s["__key__"] for s in reference]
    assert [i.path for i in items] == [sample_path(URL, s["__key__"]) for s in reference]
    assert [i.source for i in items] == [
        {"source_url": URL, "source_key": s["__key__"], "source_row": n} for n, s in enumerate(reference)
    ]
    assert items[0].data == reference[0]["jpg"] and items[1].data == reference[1]["jpg"]
    assert items[2].data == reference[2]["png"] and items[4].data == reference[4]["webp"]
    assert all(i.error is None for i in items[:3]) and items[4].error is None and items[6].error is None
    assert items[6].data == reference[6]["jpeg"]
    assert items[3].error.code == ErrorCode.NO_IMAGE and "json, txt" in items[3].error.message
    assert items[5].error.code == ErrorCode.TOO_LARGE and "3000 bytes" in items[5].error.message
    assert items[3].data is None and items[5].data is None
    assert count_samples(io.BytesIO(data)) == len(reference) == 7


def test_image_extension_names_the_member():
    data = _write(MIXED)
    by_seg = _read(data, image_extension="seg.png")
    assert by_seg[1].data == MIXED[1]["seg.png"] and by_seg[1].error is None
    assert [i.error.code for n, i in enumerate(by_seg) if n != 1] == [ErrorCode.NO_IMAGE] * 6
    assert _read(data, image_extension=".PNG")[2].data == MIXED[2]["PNG"]


@pytest.mark.parametrize("format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_other_writers_names_and_entries_webdataset_skips(format, tmp_path):
    """GNU long names, ustar prefixes, and the entries webdataset leaves out (directories, names
    without a dot, `__*__` metadata) read the same as webdataset reads them."""
    long_folder = "f" * 90 + "/" + "g" * 60  # over 100 characters: a ustar prefix, a GNU or pax long name
    members = [
        ("dir", None),
        ("dir/a.jpg", _jpeg(10)),
        ("README", b"no dot: skipped"),
        ("dir/a.txt", b"label"),
        ("__index__", b"metadata"),
        ("__cache__/b.jpg", b"metadata folder"),
        (f"{long_folder}/k.tar.jpg", _jpeg(11)),
        ("__meta__.json", b"{}"),  # not metadata by webdataset's rules: a sample keyed __meta__
        ("c.JPEG", _jpeg(12)),
    ]
    data = _tarfile(members, format)
    items = _read(data)
    reference = _webdataset_samples(data, tmp_path)
    assert [i.source["source_key"] for i in items] == [s["__key__"] for s in reference]
    assert [i.source["source_key"] for i in items] == ["dir/a", f"{long_folder}/k", "__meta__", "c"]
    assert [i.data for i in items] == [_jpeg(10), _jpeg(11), None, _jpeg(12)]
    assert items[2].error.code == ErrorCode.NO_IMAGE
    if format == tarfile.GNU_FORMAT:
        assert b"././@LongLink" in data


def test_repeated_extension_in_a_sample_is_one_error_row(tmp_path):
    data = _tarfile([("a.jpg", _jpeg(1)), ("a.txt", b"x"), ("a.JPG", _jpeg(2)), ("b.jpg", _jpeg(3))])
    with pytest.raises(ValueError, match="duplicate file name"):
        _webdataset_samples(data, tmp_path)
    items = _read(data)
    assert [i.path for i in items] == [f"{URL}#a", f"{URL}#b"]
    assert items[0].error.code == ErrorCode.DUPLICATE_KEY and "'jpg' repeats" in items[0].error.message
    assert items[0].data is None and items[1].data == _jpeg(3)


def test_a_key_that_comes_back_later_gets_its_own_error_row():
    data = _tarfile([("a.jpg", _jpeg(1)), ("b.jpg", _jpeg(2)), ("a.jpg", _jpeg(3)), ("a.txt", b"")])
    items = _read(data)
    assert [i.path for i in items] == [
        sample_path(URL, "a"),
        sample_path(URL, "b"),
        repeated_sample_path(URL, "a", 2),
    ]
    assert items[0].data == _jpeg(1) and items[1].data == _jpeg(2)
    assert items[2].error.code == ErrorCode.DUPLICATE_KEY and items[2].data is None
    assert items[2].source == {"source_url": URL, "source_key": "a", "source_row": 2}


@pytest.mark.parametrize("seekable", [True, False])
def test_over_cap_member_is_skipped_unread(seekable):
    big = bytes(5 << 20)
    data = _tarfile([("a.jpg", big), ("a.txt", b"x"), ("b.png", _png(1))])
    stream = io.BytesIO(data) if seekable else _Unseekable(data, most=8 << 20)
    reads: list[int] = []
    read = stream.read
    stream.read = lambda n=-1: reads.append(n) or read(n)
    items = list(iter_tar_samples(stream, URL, max_bytes=1 << 20))
    assert items[0].error.code == ErrorCode.TOO_LARGE and "5242880 bytes" in items[0].error.message
    assert items[1].data == _png(1)
    assert max(reads) <= (1 << 20)
    if seekable:
        assert sum(reads) < 64 << 10  # headers and the png only: the 5 MiB were seeked over


DAMAGE_SAMPLES = [{"__key__": f"{n:06d}", "jpg": _jpeg(n), "txt": f"label {n}".encode()} for n in range(6)]


@pytest.fixture(scope="module")
def shard() -> bytes:
    return _write(DAMAGE_SAMPLES)


@pytest.fixture(scope="module")
def members(shard) -> list[tuple[str, int, int]]:
    return _member_offsets(shard)


def _assert_intact(items: list[SourceItem], full: list[SourceItem], count: int) -> None:
    assert _rows(items[:count]) == _rows(full[:count])
    assert all(i.error is None for i in items[:count])


def _damaged_rows(data: bytes) -> list[SourceItem]:
    items = _read(data)
    assert _rows(items) == _rows(iter_tar_samples(_Unseekable(data, most=700), URL, max_bytes=CAP))
    return items


def test_cut_inside_a_members_data(shard, members):
    full = _read(shard)
    name, _, data_at = members[6]  # 000003.jpg
    items = _damaged_rows(shard[: data_at + 100])
    assert len(items) == 4
    _assert_intact(items, full, 3)
    assert items[3].path == sample_path(URL, "000003") and items[3].error.code == ErrorCode.TRUNCATED
    assert items[3].data is None and items[3].source["source_row"] == 3


def test_cut_inside_a_header(shard, members):
    """The sample before it may have had more members: it gets the truncated row."""
    full = _read(shard)
    _, header_at, _ = members[6]  # the first header (pax) of sample 3
    for cut in (header_at + 1, header_at + 511, header_at + 700, members[6][2] - 1):
        items = _damaged_rows(shard[:cut])
        assert len(items) == 3
        _assert_intact(items, full, 2)
        assert items[2].path == sample_path(URL, "000002") and items[2].error.code == ErrorCode.TRUNCATED


def test_cut_at_a_member_boundary(shard, members):
    """The members read are whole: their samples keep their rows, then a row says the tar is cut."""
    full = _read(shard)
    _, header_at, _ = members[6]  # sample 3's first member
    items = _damaged_rows(shard[:header_at])
    assert len(items) == 4
    _assert_intact(items, full, 3)
    assert items[3].path == f"{URL}#@{header_at}" and items[3].error.code == ErrorCode.TRUNCATED
    assert items[3].source == {"source_url": URL, "source_key": None, "source_row": 3}
    within = members[7][1]  # 000003.txt: sample 3 has its image
    items = _damaged_rows(shard[:within])
    assert _rows(items[:4]) == _rows(full[:4]) and items[4].path == f"{URL}#@{within}"


def test_end_blocks_missing(shard, members):
    full = _read(shard)
    name, _, data_at = members[-1]
    end = data_at + 512  # the last member (a short txt) fills one block
    for cut, at in ((end, end), (end + 512, end + 512), (end + 700, end + 512)):
        items = _damaged_rows(shard[:cut])
        assert len(items) == 7
        _assert_intact(items, full, 6)
        assert items[6].path == f"{URL}#@{at}" and items[6].error.code == ErrorCode.TRUNCATED
        assert items[6].source["source_row"] == 6
    assert _rows(_read(shard[: end + 1024])) == _rows(
        full
    )  # the record padding after the end blocks is optional


def test_corrupt_header(shard, members):
    full = _read(shard)
    _, header_at, _ = members[6]
    damaged = bytearray(shard)
    damaged[header_at + 1024 + 3] ^= 0x20  # the name in sample 3's own header (after its pax header)
    items = _damaged_rows(bytes(damaged))
    assert len(items) == 3
    _assert_intact(items, full, 2)
    assert items[2].error.code == ErrorCode.CORRUPT and "checksum" in items[2].error.message
    damaged = bytearray(shard)
    damaged[5] ^= 1  # the very first header: no sample yet
    items = _damaged_rows(bytes(damaged))
    assert [(i.path, i.error.code, i.source["source_row"]) for i in items] == [
        (f"{URL}#@0", ErrorCode.CORRUPT, 0)
    ]


def test_empty_files():
    """A tar with no samples gives no rows; a file with no bytes is no tar (a cut-short copy)."""
    assert _read(_write([])) == [] and index_tar(io.BytesIO(_write([])), 1) == ([], 0)
    [item] = _read(b"")
    assert (
        item.path == f"{URL}#@0" and item.error.code == ErrorCode.TRUNCATED and item.source["source_row"] == 0
    )


def test_every_cut_gives_rows_never_an_exception(shard):
    """Wherever a copy stops, the rows before are the full read's and the last row says truncated."""
    full = _read(shard)
    end_blocks = max(at for _, _, at in _member_offsets(shard)) + 512
    cuts = sorted(
        {*range(0, end_blocks + 1024, 512), *random.Random(7).sample(range(end_blocks + 1024), 200)}
    )
    for cut in cuts:
        items = _read(shard[:cut])
        assert items, cut
        assert items[-1].error is not None and items[-1].error.code == ErrorCode.TRUNCATED, cut
        for item in items[:-1]:
            assert _rows([item]) == _rows([full[item.source["source_row"]]])
        assert len({i.path for i in items}) == len(items) <= len(full) + 1


def test_ranges_from_the_index_are_slices_of_the_full_read(shard, members):
    full = _read(shard)
    for every in (1, 2, 4, 10):
        starts, count = index_tar(io.BytesIO(shard), every)
        assert count == 6 and [s.ordinal for s in starts] == list(range(0, 6, every))
        assert [s.offset for s in starts] == [members[2 * s.ordinal][1] for s in starts]
        bounds = [*starts[1:], None]
        pieces = []
        for begin, end in zip(starts, bounds, strict=True):
            stream = io.BytesIO(shard)
            stream.seek(begin.offset)
            stop = end.ordinal if end else None
            pieces += iter_tar_samples(
                stream, URL, max_bytes=CAP, start=begin.ordinal, stop=stop, offset=begin.offset
            )
            assert _rows(_read(shard, start=begin.ordinal, stop=stop)) == _rows(full[begin.ordinal : stop])
        assert _rows(pieces) == _rows(full)
    assert _read(shard, start=3, stop=3) == [] and _read(shard, start=9) == []
    assert index_tar(_Unseekable(shard), 4) == index_tar(io.BytesIO(shard), 4)


def test_index_of_a_damaged_tar_counts_whole_samples(shard, members):
    _, header_at, _ = members[6]
    assert index_tar(io.BytesIO(shard[:header_at]), 1)[1] == 3  # cut between samples 2 and 3
    starts, count = index_tar(io.BytesIO(shard[: header_at + 100]), 1)  # sample 2 cut short
    assert count == 2 and [s.ordinal for s in starts] == [0, 1]


def test_gzip_tar(shard, members):
    full = _read(shard)
    compressed = _write(DAMAGE_SAMPLES, compress=True)
    assert compressed[:2] == b"\x1f\x8b"
    assert _rows(_read(compressed, gzip=True)) == _rows(full)
    assert _rows(_read(gzip.compress(shard[:100]) + gzip.compress(shard[100:]), gzip=True)) == _rows(full)
    assert _rows(_read(compressed, gzip=True, start=2, stop=4)) == _rows(full[2:4])
    stream = _Unseekable(compressed, most=333)
    assert _rows(iter_tar_samples(stream, URL, max_bytes=CAP, gzip=True)) == _rows(full)
    # A cut .tar.gz: the samples decompressed before the cut, then truncated.
    recompressed = gzip.compress(shard)
    cut = _read(recompressed[: len(recompressed) // 2], gzip=True)
    assert cut[-1].error.code == ErrorCode.TRUNCATED and cut[0].error is None
    # Bad deflate data: the sample in progress gets the corrupt row (here at sample 3's header).
    first, rest = shard[: members[6][1]], shard[members[6][1] :]
    damaged = bytearray(gzip.compress(first, mtime=0) + gzip.compress(rest, mtime=0))
    damaged[len(gzip.compress(first, mtime=0)) + 20] ^= 0xFF
    items = _read(bytes(damaged), gzip=True)
    assert len(items) == 3 and _rows(items[:2]) == _rows(full[:2])
    assert items[2].error.code == ErrorCode.CORRUPT and "gzip" in items[2].error.message
    # A changed byte only the CRC can catch (stored deflate blocks): checked after the tar's end.
    stored = bytearray(gzip.compress(shard, compresslevel=0, mtime=0))
    stored[stored.index(_jpeg(2)[50:70])] ^= 1
    items = _read(bytes(stored), gzip=True)
    assert (
        len(items) == 7 and items[6].path.startswith(f"{URL}#@") and items[6].error.code == ErrorCode.CORRUPT
    )
    items = _read(gzip.compress(shard, mtime=0)[:-4], gzip=True)  # the gzip trailer cut off
    assert _rows(items[:6]) == _rows(full) and items[6].error.code == ErrorCode.TRUNCATED
    with pytest.raises(ValueError):
        _read(compressed, gzip=True, offset=512)


def test_stream_errors_propagate(shard):
    class Failing(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            if self.tell() > 5000:
                raise OSError("connection reset")
            return super().read(n)

    with pytest.raises(OSError, match="connection reset"):
        list(iter_tar_samples(Failing(shard), URL, max_bytes=CAP))


_names = st.text(alphabet="abc.-_ ", min_size=1, max_size=8).filter(
    lambda s: "." not in s and not s.startswith("__")
)
_folders = st.lists(
    st.text(alphabet="xy.", min_size=1, max_size=3).filter(lambda s: s not in (".", "..")), max_size=2
)
_samples = st.lists(
    st.tuples(
        _folders,
        _names,
        st.dictionaries(
            st.sampled_from(["jpg", "png", "seg.png", "txt", "json", "cls", "webp"]),
            st.binary(max_size=700),
            min_size=1,
            max_size=4,
        ),
    ),
    max_size=8,
    unique_by=lambda s: "/".join([*s[0], s[1]]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_samples)
def test_any_shard_reads_back_as_written(samples):
    written = [{"__key__": "/".join([*folders, name]), **members} for folders, name, members in samples]
    items = _read(_write(written), max_bytes=600)
    assert [i.source["source_key"] for i in items] == [s["__key__"] for s in written]
    for sample, item in zip(written, items, strict=True):
        image = next(
            (sample[e] for e in sorted(sample) if e.rpartition(".")[2] in ("jpg", "png", "webp")), None
        )
        if image is None:
            assert item.error.code == ErrorCode.NO_IMAGE
        elif len(image) > 600:
            assert item.error.code == ErrorCode.TOO_LARGE
        else:
            assert item.data == image and item.error is None
