"""Opening a container file for one sequential read, with the safety of an image read.

Local files: the allowed-root check on the resolved path, no symlink as the last component, no
FIFO or device (O_NONBLOCK + fstat), a buffered sequential read. Objects: the allowed-root check
on the URL, one HEAD for the size, then ranged GETs of `block_bytes` each, `read_ahead` blocks
fetched in the background while the reader parses the one before: one request per 8 MiB instead
of two per image, and never the whole object in memory (at most `read_ahead + 1` blocks).

Failures to open say what is wrong with the file (not_found, permission_denied, not_a_file,
outside_allowed_roots) as an ImageError: the container gets one error row. A store that keeps
failing in the middle of a read raises SourceUnavailable: the samples after that point are
unknown, so the shard is not finished (a worker hands it back; `labeler run` leaves it for --resume).
"""

from __future__ import annotations

import io
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from worker.dataset.storage import StorageUnavailable, filesystem_for, is_url
from worker.pipeline.errors import ImageError
from worker.pipeline.object_reading import transient_errors
from worker.pipeline.reading import ReadPolicy, open_regular_file
from worker.records import ErrorCode
from worker.sources.version import file_version, object_version

BLOCK_BYTES = 8 * 2**20
READ_AHEAD = 2
LOCAL_BUFFER = 2**20


class SourceUnavailable(OSError):
    """The store failed in the middle of a container: retry the shard later; no row is written."""


def open_container(url: str, policy: ReadPolicy, offset: int = 0) -> BinaryIO:
    """A binary stream over the file or object `url`, positioned at `offset`."""
    return open_versioned(url, policy, offset)[0]


def open_versioned(url: str, policy: ReadPolicy, offset: int = 0) -> tuple[BinaryIO, str]:
    """`open_container`'s stream and the version it reads (worker/sources/version.py): every
    sample's row records it, so a later run can skip the unchanged file whole."""
    if is_url(url):
        policy.check_url(url)
        return _open_object(url, policy, offset)
    return _open_local(url, policy, offset)


def _open_local(path: str, policy: ReadPolicy, offset: int) -> tuple[BinaryIO, str]:
    fd, info = open_regular_file(path, policy)
    try:
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb", buffering=LOCAL_BUFFER)
    except BaseException:
        os.close(fd)
        raise
    if offset:
        handle.seek(offset)
    return handle, file_version(info)


def _open_object(url: str, policy: ReadPolicy, offset: int) -> tuple[BinaryIO, str]:
    try:
        fs, path = filesystem_for(url)
    except StorageUnavailable as exc:
        raise ImageError(ErrorCode.INTERNAL_ERROR, str(exc)) from None
    try:
        info = _with_retries(lambda: fs.info(path), policy)
    except FileNotFoundError:
        raise ImageError(ErrorCode.NOT_FOUND, "no such object") from None
    except PermissionError:
        raise ImageError(ErrorCode.PERMISSION_DENIED, "access denied (credentials or bucket policy)") from None
    if info.get("type") != "file":
        raise ImageError(ErrorCode.NOT_A_FILE, "a prefix, not an object")
    reader = BlockReader(fs, path, int(info.get("size") or 0), policy, start=offset)
    return io.BufferedReader(reader, buffer_size=LOCAL_BUFFER), object_version(info)  # type: ignore[arg-type]


def _with_retries(action: Any, policy: ReadPolicy) -> Any:
    """`action()`, retried with backoff on the store's own failures; SourceUnavailable after the last."""
    attempts = max(1, policy.read_attempts)
    last: BaseException | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(policy.backoff_s * 2 ** (attempt - 1))
        try:
            return action()
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except transient_errors() as exc:
            last = exc
    raise SourceUnavailable(f"the store kept failing ({type(last).__name__}) after {attempts} attempts")


class BlockReader(io.RawIOBase):
    """A forward-only raw stream over an object: blocks of `block_bytes` fetched by ranged GETs,
    `read_ahead` of them in flight on one background thread while the caller parses.

    Seeking forward within the object is allowed (a tar reader skipping an over-cap member): blocks
    the seek passes over are dropped and fetching restarts at the new position."""

    def __init__(
        self, fs: Any, path: str, size: int, policy: ReadPolicy, *, start: int = 0,
        block_bytes: int = BLOCK_BYTES, read_ahead: int = READ_AHEAD,
    ) -> None:  # fmt: skip
        self._fs, self._path, self._size, self._policy = fs, path, size, policy
        self._block, self._ahead = block_bytes, max(1, read_ahead)
        self._pos = min(start, size)
        self._next_fetch = self._pos
        self._pending: list[Future[bytes]] = []
        self._current = b""
        self._current_start = self._pos
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="container-read")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self._pos + offset, io.SEEK_END: self._size + offset}[whence]
        target = max(0, min(target, self._size))
        if target != self._pos:
            end = self._current_start + len(self._current)
            if not (self._current_start <= target < end):
                self._drop_pending()
                self._current, self._current_start, self._next_fetch = b"", target, target
            self._pos = target
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pos >= self._size or not len(view):
            return 0
        end = self._current_start + len(self._current)
        if not (self._current_start <= self._pos < end):
            self._current_start = self._pos if not self._pending else self._current_start + len(self._current)
            self._current = self._take_block()
            end = self._current_start + len(self._current)
            if not self._current:
                raise SourceUnavailable("the object ended before its recorded size (replaced while reading?)")
        begin = self._pos - self._current_start
        count = min(len(view), end - self._pos)
        view[:count] = self._current[begin : begin + count]
        self._pos += count
        return count

    def _take_block(self) -> bytes:
        while len(self._pending) < self._ahead and self._next_fetch < self._size:
            start, stop = self._next_fetch, min(self._next_fetch + self._block, self._size)
            self._pending.append(self._pool.submit(self._fetch, start, stop))
            self._next_fetch = stop
        if not self._pending:
            return b""
        data = self._pending.pop(0).result()
        if len(self._pending) < self._ahead and self._next_fetch < self._size:
            start, stop = self._next_fetch, min(self._next_fetch + self._block, self._size)
            self._pending.append(self._pool.submit(self._fetch, start, stop))
            self._next_fetch = stop
        return data

    def _fetch(self, start: int, stop: int) -> bytes:
        def get() -> bytes:
            return bytes(self._fs.cat_file(self._path, start=start, end=stop))

        try:
            return _with_retries(get, self._policy)
        except FileNotFoundError:
            raise SourceUnavailable("the object was deleted while it was read") from None
        except PermissionError:
            raise SourceUnavailable("access to the object was lost while it was read") from None

    def _drop_pending(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending = []

    def close(self) -> None:
        if not self.closed:
            self._drop_pending()
            self._pool.shutdown(wait=True, cancel_futures=True)
        super().close()
