"""Reading image bytes safely: confined to allowed roots, capped in size, never blocking on devices.

Paths come from queues and list files written by other people, so every read is treated as
untrusted: symlinks are resolved before the root check, FIFOs and devices are refused without
blocking (O_NONBLOCK + fstat), and a file larger than the cap is refused before it is read.
Object URLs (s3://bucket/key, gs://, az://) go to worker/pipeline/object_reading.py under the same
policy: URL roots confine URLs, directory roots confine files, and neither admits the other.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

from worker.dataset.storage import canonical_url, is_under, is_url
from worker.pipeline.errors import ImageError
from worker.records import ErrorCode
from worker.setting_table import default
from worker.sources.version import file_version

DEFAULT_MAX_BYTES: int = default("max_bytes")


@dataclass(frozen=True)
class ReadPolicy:
    """Where reads may happen and how much may be read. No roots means anywhere.

    Roots are directories (resolved) or URL prefixes (`s3://bucket/prefix/`, kept as written with
    a canonical protocol); `read_attempts` and `backoff_s` apply to object stores only.
    """

    allowed_roots: tuple[str, ...] = field(default=())
    max_bytes: int = DEFAULT_MAX_BYTES
    read_attempts: int = 3  # object_reading.py has no default of its own: these are the retries'
    backoff_s: float = 0.25

    @classmethod
    def create(cls, allowed_roots: Iterable[str] = (), max_bytes: int = DEFAULT_MAX_BYTES) -> ReadPolicy:
        roots = tuple(_normalize_root(r) for r in allowed_roots)
        return cls(allowed_roots=roots, max_bytes=max_bytes)

    def url_roots(self) -> tuple[str, ...]:
        return tuple(root for root in self.allowed_roots if is_url(root))

    def check_url(self, url: str) -> None:
        """Raise outside_allowed_roots unless the URL roots admit `url` (directory roots admit no
        URL: a policy with roots but none of them a URL refuses every object)."""
        from worker.pipeline.object_reading import check_url_allowed

        if self.allowed_roots and not self.url_roots():
            raise ImageError(ErrorCode.OUTSIDE_ALLOWED_ROOTS, "object URLs are not under any allowed root")
        check_url_allowed(url, self.url_roots())

    def check_allowed(self, real_path: str) -> None:
        if not self.allowed_roots:
            return
        for root in self.allowed_roots:
            if is_url(root):
                continue
            if is_under(real_path, root):
                return
        raise ImageError(
            ErrorCode.OUTSIDE_ALLOWED_ROOTS,
            f"resolves to {real_path}, which is not under an allowed root",
        )


def _normalize_root(root: str) -> str:
    return canonical_url(root) if is_url(root) else os.path.realpath(os.path.expanduser(root))


def open_regular_file(path: str, policy: ReadPolicy) -> tuple[int, os.stat_result]:
    """A descriptor (and its stat) of the regular file `path` resolves to, under the policy's roots,
    opened without following a last symlink or blocking on a FIFO or device; ImageError otherwise.
    Images and container shard files (worker/sources/streams.py) are opened here."""
    real_path = os.path.realpath(path)
    policy.check_allowed(real_path)
    try:
        fd = os.open(real_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise ImageError(ErrorCode.NOT_FOUND, "no such file") from None
    except PermissionError:
        raise ImageError(ErrorCode.PERMISSION_DENIED, "permission denied") from None
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ELOOP, errno.ENODEV, errno.EISDIR):
            raise ImageError(ErrorCode.NOT_A_FILE, f"cannot open as a file: {exc.strerror}") from None
        raise ImageError(ErrorCode.NOT_FOUND, f"cannot open: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise ImageError(ErrorCode.NOT_A_FILE, f"{kind}")
    return fd, info


def read_image_bytes(path: str, policy: ReadPolicy) -> bytes:
    """Return the file's (or object's) bytes or raise ImageError with a stable code."""
    return read_image(path, policy)[0]


def read_image(path: str, policy: ReadPolicy) -> tuple[bytes, str]:
    """The file's (or object's) bytes and the version they were read at (worker/sources/version.py:
    the row's `source_version`), or ImageError with a stable code."""
    if is_url(path):
        from worker.pipeline.object_reading import read_object

        policy.check_url(path)
        return read_object(path, policy.max_bytes, policy.read_attempts, policy.backoff_s)
    fd, info = open_regular_file(path, policy)
    try:
        if info.st_size > policy.max_bytes:
            raise ImageError(
                ErrorCode.TOO_LARGE,
                f"file is {info.st_size} bytes, over the {policy.max_bytes}-byte cap",
            )
        if info.st_size == 0:
            raise ImageError(ErrorCode.DECODE_FAILED, "empty file (0 bytes)")
        return _read_at_most(fd, policy.max_bytes), file_version(info)
    finally:
        os.close(fd)


def _read_at_most(fd: int, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
        except OSError as exc:
            raise ImageError(ErrorCode.DECODE_FAILED, f"read failed: {exc.strerror}") from None
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise ImageError(ErrorCode.TOO_LARGE, f"file grew past the {max_bytes}-byte cap")
    data = b"".join(chunks)
    if not data:
        raise ImageError(ErrorCode.DECODE_FAILED, "empty file (0 bytes)")
    return data
