"""WebDataset tar shards, read member by member: one `SourceItem` per sample.

The field's rules are the `webdataset` package's (tariterators.py; Ray Data, DALI and Hugging Face
copy them): only regular files count; a member name splits by `^((?:.*/|)[^.]+)[.]([^/]*)$` into the
sample key (folders included, up to the first dot of the base name) and the extension (lowercased,
may hold dots: `seg.png`); names that do not split and `__*__` metadata names are skipped;
consecutive members with the same key form one sample. A sample's row carries its image member's
bytes, or an error: `no_image`; `too_large` (decided from the header, the bytes are skipped unread);
`duplicate_key` for an extension twice in one sample (webdataset raises) or a key that came before
in the file (the first keeps the plain path, later ones get `repeated_sample_path`).

The archive is parsed here, not by `tarfile`: in stream mode `tarfile` ends the archive quietly at
a bad header after the first member, so a cut-short or damaged shard would lose samples without a
word. Here damage gives rows, then reading stops:
- samples completed before the damage get their rows as usual;
- the sample in progress gets one error row instead of its labels: `truncated` where the file ends
  inside a member or a header, `corrupt` where a header fails its checksum (or gzip data is bad);
- where no sample is in progress, or the file ends cleanly at a member boundary without its two
  end-of-archive blocks (then after the last sample's own row), one row `URL#@OFFSET` (no key, the
  next ordinal) says so, OFFSET being the byte offset of the damaged or missing block; so does a
  .tar.gz whose gzip data fails its check (CRC) or ends early after a whole tar.
I/O errors of the stream itself (OSError) propagate: the caller decides between retrying and rows.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from worker.pipeline.errors import ImageError
from worker.pipeline.inputs import IMAGE_EXTENSIONS
from worker.records import ErrorCode
from worker.sources.item import SourceItem, repeated_sample_path, sample_path

BLOCK = 512
CHUNK = 1 << 20  # the most one read asks for while skipping data it does not keep
_ZERO_BLOCK = bytes(BLOCK)
_EXTENDED_CAP = 1 << 20  # pax or GNU long-name data past this is damage, not a name
_REGULAR = frozenset(b"0\x007")  # the typeflags tarfile (so webdataset) reads as plain files
_SPLIT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_IMAGE_EXTS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
_SIGNED = struct.Struct("148b8x356b")


@dataclass(frozen=True)
class SampleStart:
    """Where a sample begins: its ordinal and the byte offset of its first member's first header."""

    ordinal: int
    offset: int


class _Member(NamedTuple):
    key: str
    ext: str  # lowercased
    size: int
    offset: int  # of the member's first header (pax or GNU long name included)


class _Damage(NamedTuple):
    code: ErrorCode
    message: str
    offset: int
    boundary: bool = False  # the file ends cleanly between members: the members read are whole


def iter_tar_samples(
    stream: BinaryIO,
    url: str,
    *,
    max_bytes: int,
    image_extension: str | None = None,
    start: int = 0,
    stop: int | None = None,
    offset: int = 0,
    gzip: bool = False,
) -> Iterator[SourceItem]:
    """One item per sample with ordinal in [start, stop), in file order (see the module docstring).

    `stream` is positioned at byte `offset` of the file: 0, or a `SampleStart.offset` from
    `index_tar`, whose sample then counts as ordinal `start`; with offset 0 the samples before
    `start` are read through (headers only). `image_extension` names the image member's extension;
    None takes each sample's first member with an image extension. `gzip`: a .tar.gz stream,
    decompressed as it is read (offset must be 0)."""
    if gzip and offset:
        raise ValueError("a gzip tar is read from its start: offset must be 0")
    if stop is not None and stop <= start:
        return
    wanted = image_extension.lower().lstrip(".") if image_extension else None
    gunzip = _Gunzip(stream) if gzip else None
    reader = _Reader(gunzip or stream, offset)
    seen: set[int] = set()
    sample: _Sample | None = None
    ordinal = start - 1 if offset else -1
    for event in _members(reader):
        if isinstance(event, _Member):
            if sample is None or event.key != sample.key:
                if sample is not None and sample.ordinal >= start:
                    yield sample.item(url)
                ordinal += 1
                if stop is not None and ordinal >= stop:
                    return
                sample = _Sample(url, event.key, ordinal, seen)
            if ordinal >= start:
                sample.add(event, reader, wanted, max_bytes)
            continue
        if event is None and gunzip is not None and (problem := gunzip.finish()):
            code = ErrorCode.CORRUPT if gunzip.damage else ErrorCode.TRUNCATED
            event = _Damage(code, problem, reader.pos, True)
        if isinstance(event, _Damage) and not event.boundary and sample is not None:
            sample.error = ImageError(event.code, event.message)
            sample.image = None
        if sample is not None and sample.ordinal >= start:
            yield sample.item(url)
        if isinstance(event, _Damage) and (event.boundary or sample is None):
            ordinal += 1
            if ordinal >= start and (stop is None or ordinal < stop):
                source = {"source_url": url, "source_key": None, "source_row": ordinal}
                error = ImageError(event.code, event.message)
                yield SourceItem(f"{url}#@{event.offset}", error=error, source=source)
        return


def index_tar(stream: BinaryIO, every: int) -> tuple[list[SampleStart], int]:
    """The starts of samples 0, every, 2*every, ... and the number of samples, from the headers
    alone (data is seeked over where the stream allows, else read and dropped), to cut a large tar
    into ranges of `every` samples (as DALI's wds2idx). `stream` is at the file's start.

    Damage ends the walk; the sample it cut short is not counted, though `iter_tar_samples` gives
    it (or the damage) a row: read the last range with stop=None so that row comes too."""
    if every < 1:
        raise ValueError(f"every must be at least 1, not {every}")
    starts: list[SampleStart] = []
    count = 0
    key: str | None = None
    for event in _members(_Reader(stream, 0)):
        if isinstance(event, _Member):
            if event.key != key:
                key = event.key
                if count % every == 0:
                    starts.append(SampleStart(count, event.offset))
                count += 1
        elif isinstance(event, _Damage) and not event.boundary and count:
            count -= 1
            if starts[-1].ordinal == count:
                starts.pop()
    return starts, count


def count_samples(stream: BinaryIO) -> int:
    """The number of whole samples in a tar (see `index_tar`)."""
    return index_tar(stream, 1 << 62)[1]


class _Sample:
    """A sample being read: its row's path, and its image bytes or its error so far."""

    __slots__ = ("key", "ordinal", "path", "exts", "image", "error")

    def __init__(self, url: str, key: str, ordinal: int, seen: set[int]) -> None:
        self.key = key
        self.ordinal = ordinal
        self.exts: list[str] = []
        self.image: bytes | None = None
        self.error: ImageError | None = None
        digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).digest()
        number = int.from_bytes(digest, "little")
        if number in seen:
            self.path = repeated_sample_path(url, key, ordinal)
            self.error = ImageError(
                ErrorCode.DUPLICATE_KEY, f"the key {key!r} came before in this file, in another sample"
            )
        else:
            seen.add(number)
            self.path = sample_path(url, key)

    def add(self, member: _Member, reader: _Reader, wanted: str | None, max_bytes: int) -> None:
        """Take one member: read its bytes if it is the image, else leave them to be skipped."""
        ext = member.ext
        if ext in self.exts:
            self.error = self.error or ImageError(
                ErrorCode.DUPLICATE_KEY, f"the extension {ext!r} repeats in sample {self.key!r}"
            )
            self.image = None
        self.exts.append(ext)
        if self.error is not None or self.image is not None:
            return
        if not _is_image(ext, wanted):
            return
        if member.size > max_bytes:
            self.error = ImageError(
                ErrorCode.TOO_LARGE,
                f"the {ext!r} member is {member.size} bytes, over the cap of {max_bytes}",
            )
            return
        data = reader.read(member.size)
        if len(data) == member.size:  # else the file ends inside it, and the damage comes next
            self.image = data

    def item(self, url: str) -> SourceItem:
        source = {"source_url": url, "source_key": self.key, "source_row": self.ordinal}
        if self.error is None and self.image is None:
            self.error = ImageError(
                ErrorCode.NO_IMAGE,
                f"sample {self.key!r} has no image member (its extensions: {', '.join(self.exts)})",
            )
        return SourceItem(self.path, data=self.image, error=self.error, source=source)


def _members(reader: _Reader) -> Iterator[_Member | _Damage | None]:
    """The archive's regular, named members in file order; after each, whatever of its data the
    consumer did not read is skipped. Ends with None at a proper end, or with one `_Damage`."""
    while True:
        first = reader.pos
        header = _header(reader)
        if header is None or isinstance(header, _Damage):
            yield header
            return
        typeflag, size, name = header
        data_end = reader.pos + _padded(size)
        if typeflag in _REGULAR and not _is_meta(name):
            match = _SPLIT.match(name)
            if match:
                yield _Member(match[1], match[2].lower(), size, first)
        need = data_end - reader.pos
        if need > 0 and reader.skip(need) < need:
            yield _cut(reader, reader.pos, f"inside the data of {name!r}")
            return


def _header(reader: _Reader) -> tuple[int, int, str] | _Damage | None:
    """The next member's (typeflag, size, name), its pax and GNU long-name headers applied (the
    first to name it wins, as in tarfile); None at the end of the archive, or the damage met."""
    first = reader.pos
    long_name: str | None = None
    long_size: int | None = None
    while True:
        at = reader.pos
        block = reader.read(BLOCK)
        if len(block) < BLOCK:
            if not block and at == first and not reader.damage:
                return _Damage(
                    ErrorCode.TRUNCATED, f"the tar ends at byte {at} without its end blocks", at, True
                )
            return _cut(reader, at, "inside a tar header")
        if block == _ZERO_BLOCK:
            if at != first:
                return _Damage(ErrorCode.CORRUPT, f"an extended tar header at byte {first} has no member", at)
            if len(reader.read(BLOCK)) < BLOCK:
                return _Damage(ErrorCode.TRUNCATED, "the tar ends inside its end blocks", at + BLOCK, True)
            return None
        try:
            typeflag, size, name = _parse_header(block)
        except ValueError as exc:
            return _Damage(ErrorCode.CORRUPT, f"bad tar header at byte {at}: {exc}", at)
        if typeflag not in b"xXL":
            break
        if size > _EXTENDED_CAP:
            return _Damage(ErrorCode.CORRUPT, f"an extended tar header of {size} bytes at byte {at}", at)
        data = reader.read(_padded(size))
        if len(data) < _padded(size):
            return _cut(reader, at, "inside an extended tar header")
        try:
            if typeflag == ord("L"):
                long_name = long_name or _text(data[:size].split(b"\0", 1)[0])
            else:
                records = _pax_records(data[:size])
                if long_name is None and b"path" in records:
                    long_name = _text(records[b"path"])
                if long_size is None and b"size" in records:
                    long_size = int(records[b"size"])
        except ValueError as exc:
            return _Damage(ErrorCode.CORRUPT, f"bad extended tar header at byte {at}: {exc}", at)
    if typeflag == ord("S") and block[482] and not _skip_sparse_blocks(reader):
        return _cut(reader, reader.pos, "inside a sparse member's headers")
    return (
        typeflag,
        size if long_size is None else long_size,
        name if long_name is None else long_name,
    )


def _parse_header(block: bytes) -> tuple[int, int, str]:
    """(typeflag, size, name) of a ustar, GNU or v7 header; ValueError if it is none of them."""
    magic = block[257:263]
    if magic[:5] != b"ustar" and magic != b"\0" * 6:
        raise ValueError(f"no tar magic ({magic!r})")
    field = block[148:156]
    stored = _number(field)
    unsigned = (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) - 2
    unsigned += 256 - sum(field)  # the checksum field counts as eight spaces
    if stored != unsigned and stored != sum(_SIGNED.unpack(block)) + 256:
        raise ValueError(f"checksum {stored} where the header sums to {unsigned}")
    size = _number(block[124:136])
    if size < 0:
        raise ValueError(f"negative size {size}")
    typeflag = block[156]
    name = _text(block[:100].split(b"\0", 1)[0])
    prefix = block[345:500].split(b"\0", 1)[0]
    if prefix and typeflag not in b"LKS":  # ustar keeps a long name's folders here (as tarfile)
        name = _text(prefix) + "/" + name
    return typeflag, size, name


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (as tarfile.nti)."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """The `LENGTH KEY=VALUE\\n` records of a pax header."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos]:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space - pos or pos + length > len(data):
            raise ValueError(f"a pax record of length {length}")
        key, equals, value = data[space + 1 : pos + length - 1].partition(b"=")
        if not equals:
            raise ValueError("a pax record without '='")
        records[key] = value
        pos += length
    return records


def _skip_sparse_blocks(reader: _Reader) -> bool:
    """Reads past an old GNU sparse member's extension headers; False if the file ends first."""
    while True:
        block = reader.read(BLOCK)
        if len(block) < BLOCK:
            return False
        if not block[504]:
            return True


def _is_image(ext: str, wanted: str | None) -> bool:
    """The named image extension, or else any whose last part is an image format's."""
    return ext == wanted if wanted else ext.rpartition(".")[2] in _IMAGE_EXTS


def _is_meta(name: str) -> bool:
    """webdataset's metadata names, skipped: `__key__`-like names, `__*__/` folders."""
    return ("/" not in name and name.startswith("__") and name.endswith("__")) or bool(_META.match(name))


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _cut(reader: _Reader, at: int, where: str) -> _Damage:
    if reader.damage:
        return _Damage(ErrorCode.CORRUPT, f"{reader.damage} (byte {reader.pos})", at)
    return _Damage(ErrorCode.TRUNCATED, f"the tar ends {where} (byte {reader.pos})", at)


class _Reader:
    """Whole reads and skips over a stream, keeping the file offset. A short read means the data
    ended; `damage` then says if it ended because the gzip data is bad."""

    def __init__(self, stream: BinaryIO | _Gunzip, pos: int) -> None:
        self._stream = stream
        self.pos = pos
        self._left: int | None = None  # bytes to the stream's end, where skips seek
        if stream.seekable():
            here = stream.tell()
            self._left = stream.seek(0, io.SEEK_END) - here
            stream.seek(here)

    @property
    def damage(self) -> str | None:
        return getattr(self._stream, "damage", None)

    def read(self, n: int) -> bytes:
        data = self._stream.read(n) or b""
        if 0 < len(data) < n:  # a raw stream may give less before its end: ask again
            parts = [data]
            got = len(data)
            while got < n and (more := self._stream.read(n - got)):
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self.pos += len(data)
        if self._left is not None:
            self._left -= len(data)
        return data

    def skip(self, n: int) -> int:
        """Skips up to n bytes (fewer where the data ends); returns how many."""
        if self._left is not None:
            n = max(0, min(n, self._left))
            self._stream.seek(n, io.SEEK_CUR)
            self._left -= n
            self.pos += n
            return n
        done = 0
        while done < n and (got := len(self._stream.read(min(CHUNK, n - done)) or b"")):
            done += got
        self.pos += done
        return done


class _Gunzip:
    """The decompressed bytes of a gzip stream (one or more gzip members), read on demand. Bad
    compressed data ends them early, with `damage` saying why."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._inflate = zlib.decompressobj(31)
        self._input = b""
        self.damage: str | None = None

    def seekable(self) -> bool:
        return False

    def finish(self) -> str | None:
        """Reads what follows the tar (its record padding) to check the gzip data's CRC: what is
        wrong, if the data is bad or ends early (the bytes read before may then be wrong)."""
        while self.read(CHUNK):
            pass
        if self.damage:
            return f"{self.damage}, after the tar's end: some bytes read may be wrong"
        return None if self._inflate.eof else "the gzip data ends before its end, after the tar's"

    def read(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n and self.damage is None:
            if not self._input:
                self._input = self._raw.read(CHUNK) or b""
                if not self._input:
                    break  # the compressed data ends (inside a gzip member, unless at its end)
            if self._inflate.eof:  # another gzip member follows (after any zero padding)
                self._input = self._input.lstrip(b"\0")
                if not self._input:
                    continue
                self._inflate = zlib.decompressobj(31)
            try:
                out = self._inflate.decompress(self._input, n - got)
            except zlib.error as exc:
                self.damage = f"bad gzip data: {exc}"
                break
            inflate = self._inflate
            self._input = inflate.unused_data if inflate.eof else inflate.unconsumed_tail
            parts.append(out)
            got += len(out)
        return b"".join(parts)
