"""Reading image bytes from object storage (s3://, gs://, az://) with the safety of local reads.

URLs come from queues and lists written by other people, like paths, so the same rules hold: the
URL must sit under an allowed root (keys with `.`/`..`/empty segments are refused there, since a
filer-backed store may resolve them to another key), the size cap is checked from the object's
metadata (a HEAD) before any byte is downloaded, and the download itself is a ranged read of at
most cap + 1 bytes, so an object replaced by a larger one between HEAD and GET is still refused.

Failures map to the stable codes of local reads (not_found, permission_denied, too_large); errors
of the store itself (connection refused, timeouts, 5xx) are retried with backoff and end as
`read_failed`. Messages are written here, never copied from the client's exception text, so no
credential, signed header or endpoint userinfo can reach a record or a log.
"""

from __future__ import annotations

import time

from worker.dataset.storage import (
    StorageUnavailable,
    canonical_url,
    filesystem_for,
    has_unsafe_segments,
    url_is_under,
)
from worker.pipeline.errors import ImageError
from worker.records import ErrorCode
from worker.sources.version import object_version


def check_url_allowed(url: str, roots: tuple[str, ...]) -> None:
    """Raise outside_allowed_roots unless `url` names a key under one of the URL roots."""
    if not roots:
        return
    if has_unsafe_segments(url):
        raise ImageError(
            ErrorCode.OUTSIDE_ALLOWED_ROOTS,
            "the key has empty, '.' or '..' segments, which a store may resolve elsewhere",
        )
    if not url_is_under(url, roots):
        raise ImageError(ErrorCode.OUTSIDE_ALLOWED_ROOTS, f"{canonical_url(url)} is not under an allowed root")


def read_object(url: str, max_bytes: int, attempts: int, backoff_s: float) -> tuple[bytes, str]:
    """The object's bytes and version (its ETag, from the HEAD before the GET), or ImageError.
    The caller has checked the URL against its roots (ReadPolicy.check_url, which also holds the
    defaults of `attempts` and `backoff_s`)."""
    try:
        fs, path = filesystem_for(url)
    except StorageUnavailable as exc:
        raise ImageError(ErrorCode.INTERNAL_ERROR, str(exc)) from None
    last: BaseException | None = None
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            return _read_once(fs, path, max_bytes)
        except ImageError:
            raise
        except FileNotFoundError:
            raise ImageError(ErrorCode.NOT_FOUND, "no such object") from None
        except PermissionError:
            raise ImageError(ErrorCode.PERMISSION_DENIED, "access denied (credentials or bucket policy)") from None
        except IsADirectoryError:
            raise ImageError(ErrorCode.NOT_A_FILE, "a prefix, not an object") from None
        except transient_errors() as exc:  # the store's own failures: retried, then read_failed
            last = exc
    raise ImageError(
        ErrorCode.READ_FAILED,
        f"the store kept failing ({type(last).__name__}) after {max(1, attempts)} attempts",
    )


def transient_errors() -> tuple[type[BaseException], ...]:
    """Failures of the store or the network (not of our code, which must surface as a bug):
    OSError and TimeoutError, and the client libraries' own error bases where installed."""
    errors: list[type[BaseException]] = [OSError, TimeoutError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientError as HttpClientError

        errors.append(HttpClientError)
    except ImportError:
        pass
    return tuple(errors)


def _read_once(fs, path: str, max_bytes: int) -> tuple[bytes, str]:
    info = fs.info(path)
    if info.get("type") != "file":
        raise ImageError(ErrorCode.NOT_A_FILE, "a prefix, not an object")
    size = int(info.get("size") or 0)
    if size > max_bytes:
        raise ImageError(ErrorCode.TOO_LARGE, f"object is {size} bytes, over the {max_bytes}-byte cap")
    if size == 0:
        raise ImageError(ErrorCode.DECODE_FAILED, "empty object (0 bytes)")
    data = fs.cat_file(path, start=0, end=max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageError(ErrorCode.TOO_LARGE, f"object grew past the {max_bytes}-byte cap")
    if not data:
        raise ImageError(ErrorCode.DECODE_FAILED, "empty object (0 bytes)")
    return bytes(data), object_version(info)
