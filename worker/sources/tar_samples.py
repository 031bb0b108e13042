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
from worker.pipeline.input_forms import IMAGE_EXTENSIONS
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
_HEADER = struct.Struct("100s24x12s12x8sB100x6s82x155s12x")  # name, size, chksum, typeflag, magic, prefix
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
    repeats: frozenset[int] = frozenset(),
) -> Iterator[SourceItem]:
    """One item per sample with ordinal in [start, stop), in file order (see the module docstring).

    `stream` is positioned at byte `offset` of the file: 0, or a `SampleStart.offset` from
    `index_tar`, whose sample then counts as ordinal `start`; with offset 0 the samples before
    `start` are read through (headers only). `image_extension` names the image member's extension;
    None takes each sample's first member with an image extension. `gzip`: a .tar.gz stream,
    decompressed as it is read (offset must be 0). Keys are remembered from where reading starts;
    `repeats`: ordinals whose key came before where reading starts (found by `index_tar` when the
    file was cut into ranges), so a key repeated across ranges gets one label row too."""
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
                sample = _Sample(url, event.key, ordinal, seen, ordinal in repeats)
            if ordinal >= start:
                sample.add(event, reader, wanted, max_bytes)
            continue
        # The archive's end, or damage: reading stops here.
        damage = event if event is not None else _gzip_end(gunzip, reader.pos)
        if damage and not damage.boundary and sample is not None:
            sample.error = ImageError(damage.code, damage.message)  # it may have lost members
            sample.image = None
        if sample is not None and sample.ordinal >= start:
            yield sample.item(url)
        ordinal += 1  # a row for the damage itself takes the next ordinal
        in_range = ordinal >= start and (stop is None or ordinal < stop)
        if damage and (damage.boundary or sample is None) and in_range:
            source = {"source_url": url, "source_key": None, "source_row": ordinal}
            error = ImageError(damage.code, damage.message)
            yield SourceItem(f"{url}#@{damage.offset}", error=error, source=source)
        return


def _gzip_end(gunzip: _Gunzip | None, pos: int) -> _Damage | None:
    """After a whole tar, whether its gzip data fails its check or ends early."""
    problem = gunzip.finish() if gunzip is not None else None
    if problem is None:
        return None
    return _Damage(ErrorCode.CORRUPT if gunzip.damage else ErrorCode.TRUNCATED, problem, pos, True)


def index_tar(stream: BinaryIO, every: int, repeats: list[int] | None = None) -> tuple[list[SampleStart], int]:
    """The starts of samples 0, every, 2*every, ... and the number of samples, from the headers
    alone (data is seeked over where the stream allows, else read and dropped), to cut a large tar
    into ranges of `every` samples (as DALI's wds2idx). `stream` is at the file's start.
    `repeats` (where given) receives the ordinals whose key an earlier sample had.

    Damage ends the walk; the sample it cut short is not counted, though `iter_tar_samples` gives
    it (or the damage) a row: read the last range with stop=None so that row comes too."""
    if every < 1:
        raise ValueError(f"every must be at least 1, not {every}")
    starts: list[SampleStart] = []
    count = 0
    key: str | None = None
    keys: set[bytes] = set()
    for event in _members(_Reader(stream, 0)):
        if isinstance(event, _Member):
            if event.key != key:
                key = event.key
                if count % every == 0:
                    starts.append(SampleStart(count, event.offset))
                if repeats is not None:
                    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).digest()
                    if digest in keys:
                        repeats.append(count)
                    keys.add(digest)
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

    def __init__(self, url: str, key: str, ordinal: int, seen: set[int], repeated: bool = False) -> None:
        self.key = key
        self.ordinal = ordinal
        self.exts: list[str] = []
        self.image: bytes | None = None
        self.error: ImageError | None = None
        digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=16).digest()
        number = int.from_bytes(digest, "little")
        if number in seen or repeated:
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
    long_name: bytes | None = None
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
                long_name = long_name or data[:size].partition(b"\0")[0]
            elif b" path=" in data or b" size=" in data:  # else only times and owners
                records = _pax_records(data[:size])
                if long_name is None and b"path" in records:
                    long_name = records[b"path"]
                if long_size is None and b"size" in records:
                    long_size = int(records[b"size"])
        except ValueError as exc:
            return _Damage(ErrorCode.CORRUPT, f"bad extended tar header at byte {at}: {exc}", at)
    if typeflag == ord("S") and block[482] and not _skip_sparse_blocks(reader):
        return _cut(reader, reader.pos, "inside a sparse member's headers")
    return (
        typeflag,
        size if long_size is None else long_size,
        _text(name if long_name is None else long_name),
    )


def _parse_header(block: bytes) -> tuple[int, int, bytes]:
    """(typeflag, size, name) of a ustar, GNU or v7 header; ValueError if it is none of them."""
    name, size_field, sum_field, typeflag, magic, prefix = _HEADER.unpack(block)
    if not magic.startswith(b"ustar") and magic != b"\0\0\0\0\0\0":
        raise ValueError(f"no tar magic ({magic!r})")
    try:  # octal text, as nearly every writer writes them
        stored = int(sum_field.partition(b"\0")[0], 8)
        size = int(size_field.partition(b"\0")[0], 8)
    except ValueError:
        stored, size = _number(sum_field), _number(size_field)
    # The byte sum, the checksum field counting as eight spaces (adler32's low half sums bytes).
    unsigned = (
        (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:]) & 0xFFFF) + 254 - sum(sum_field)
    )
    if stored != unsigned and stored != sum(_SIGNED.unpack(block)) + 256:
        raise ValueError(f"checksum {stored} where the header sums to {unsigned}")
    if size < 0:
        raise ValueError(f"negative size {size}")
    name = name.partition(b"\0")[0]
    if prefix[0] and typeflag not in b"LKS":  # ustar keeps a long name's folders here (as tarfile)
        name = prefix.partition(b"\0")[0] + b"/" + name
    return typeflag, size, name


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (as tarfile.nti)."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    digits = field.partition(b"\0")[0]
    try:
        return int(digits, 8)
    except ValueError:
        if digits.strip():
            raise
        return 0


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
    return name.startswith("__") and (("/" not in name and name.endswith("__")) or bool(_META.match(name)))


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
        self._read = stream.read
        self.pos = pos
        self._end: int | None = None  # the stream's end (as a file offset), where skips seek
        if stream.seekable():
            here = stream.tell()
            self._end = pos + stream.seek(0, io.SEEK_END) - here
            stream.seek(here)

    @property
    def damage(self) -> str | None:
        return getattr(self._stream, "damage", None)

    def read(self, n: int) -> bytes:
        data = self._read(n) or b""
        if 0 < len(data) < n:  # a raw stream may give less before its end: ask again
            parts = [data]
            got = len(data)
            while got < n and (more := self._read(n - got)):
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> int:
        """Skips up to n bytes (fewer where the data ends); returns how many."""
        if self._end is not None:
            n = max(0, min(n, self._end - self.pos))
            self._stream.seek(n, io.SEEK_CUR)
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
