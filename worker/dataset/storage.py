"""Which filesystem serves a path: local paths stay paths, `proto://...` URLs go to fsspec.

One helper for inputs, reads and (later) dataset writes, so s3://, gs:// and az:// take the same
code and one place sets the client up. fsspec and its protocol packages (s3fs, gcsfs, adlfs) are
optional (the `s3` extra): they are imported only when a URL shows up, and a worker without them
gets a message that names the extra instead of an ImportError from deep inside.

Credentials are never handled here: the clients find them in the standard places (environment,
shared config and credentials files, instance or pod identity). Only the endpoint of an
S3-compatible store is ours to pass on (LABELER_S3_ENDPOINT_URL; botocore also honours
AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_S3 by itself).
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

from worker.setting_table import SETTINGS, default

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Spellings of one store: an allowed root written s3:// also confines s3a:// URLs.
_ALIASES = {"s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}
S3_ENDPOINT_ENV = SETTINGS["s3_endpoint_url"].env
# botocore retries each request (throttling, 5xx, connection errors, with jittered backoff); the
# reader retries whole reads on top (object_reading.py). s3fs's own retry loop is turned off
# (1 try) so the attempts multiply only once: a dead store costs 3 x 3 short tries per image.
# Connections kept open per client: botocore's default is 10; this is the default fetch concurrency
# (worker/pipeline/fetching.py), and `reserve_connections` raises it for a larger one, so every
# fetch thread's request reuses an open connection instead of queueing for one.
DEFAULT_FETCH_CONCURRENCY: int = default("fetch_concurrency")  # object reads in flight per process (fetching.py)
S3_CLIENT_CONFIG: dict[str, Any] = {
    "connect_timeout": 5,
    "read_timeout": 60,
    "retries": {"max_attempts": 3, "mode": "standard"},
    "max_pool_connections": DEFAULT_FETCH_CONCURRENCY,
}
S3FS_RETRIES = 1


class StorageUnavailable(RuntimeError):
    """A URL whose protocol needs a package this install lacks."""


def is_under(path: str, root: str, separator: str = os.sep) -> bool:
    """Whether `path` is `root` or inside it (by whole segments: /data/a is not under /data/ab).
    Both must already be resolved: real paths, or canonical URLs (separator "/")."""
    root = root.rstrip(separator)
    return path == root or path.startswith(root + separator)


def has_unsafe_segments(url: str) -> bool:
    """Whether a URL's bucket is empty or its key has empty, `.` or `..` segments: a filer-backed
    store may resolve those to another key, so no root check can trust them."""
    segments = split_url(url)[1].split("/")
    return not segments[0] or any(segment in ("", ".", "..") for segment in segments[1:])


def url_is_under(url: str, roots: tuple[str, ...]) -> bool:
    """Whether `url` is a safe key under one of the canonical URL `roots` (others are ignored)."""
    canonical = canonical_url(url)
    if has_unsafe_segments(canonical):
        return False
    return any(is_under(canonical, root, "/") for root in roots if is_url(root))


def url_protocol(path: str) -> str | None:
    """The canonical protocol of a URL (`s3`), or None for a local path (file:// counts as local)."""
    match = _URL.match(path)
    if not match:
        return None
    protocol = match.group(1).lower()
    return None if protocol == "file" else _ALIASES.get(protocol, protocol)


def is_url(path: str) -> bool:
    return url_protocol(path) is not None


def split_url(url: str) -> tuple[str, str]:
    """(protocol, "bucket/key") for a URL; the protocol canonical, the rest as written."""
    protocol = url_protocol(url)
    if protocol is None:
        raise ValueError(f"not a URL: {url!r}")
    return protocol, url.split("://", 1)[1]


def join_url(protocol: str, path: str) -> str:
    return f"{protocol}://{path}"


def canonical_url(url: str) -> str:
    """The URL with its canonical protocol (s3a://b/k -> s3://b/k), for comparing against roots."""
    protocol, rest = split_url(url)
    return join_url(protocol, rest)


_lock = threading.Lock()
_cache: dict[tuple[int, str, str, int], Any] = {}
_connections: int = S3_CLIENT_CONFIG["max_pool_connections"]


def reserve_connections(count: int) -> None:
    """S3 clients made from now on keep at least `count` connections (the fetch stage asks for its
    concurrency); a client made before keeps its pool, and a request beyond it waits for one."""
    global _connections
    with _lock:
        _connections = max(_connections, count)


def filesystem(protocol: str) -> Any:
    """The fsspec filesystem for a protocol, one per process (a forked child makes its own: an
    async client's event loop and sockets must not cross a fork)."""
    endpoint = os.environ.get(S3_ENDPOINT_ENV, "").strip()
    s3 = protocol == "s3"
    key = (os.getpid(), protocol, endpoint if s3 else "", _connections if s3 else 0)
    with _lock:
        fs = _cache.get(key)
        if fs is None:
            fs = _cache[key] = _create(protocol, endpoint, _connections)
        return fs


def filesystem_for(url: str) -> tuple[Any, str]:
    """(filesystem, its path for this URL: "bucket/key")."""
    protocol, rest = split_url(url)
    return filesystem(protocol), rest


def _create(protocol: str, endpoint: str, connections: int) -> Any:
    try:
        import fsspec
    except ImportError:
        raise StorageUnavailable(_missing(protocol)) from None
    options: dict[str, Any] = {}
    if protocol == "s3":
        # No listing cache: other writers (a fleet's workers) change the prefixes we list.
        config = {**S3_CLIENT_CONFIG, "max_pool_connections": connections}
        options = {"config_kwargs": config, "use_listings_cache": False}
        if endpoint:
            options["endpoint_url"] = endpoint
    try:
        # skip_instance_cache: our cache is per process and per endpoint; fsspec's would hand a
        # client made for one endpoint to a caller that changed it.
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
    except (ImportError, ValueError) as exc:
        if isinstance(exc, ImportError) or "Protocol not known" in str(exc):
            raise StorageUnavailable(_missing(protocol)) from None
        raise
    if protocol == "s3":
        fs.retries = S3FS_RETRIES  # s3fs's own per-call retries (a class attribute, default 5)
    return fs


def _missing(protocol: str) -> str:
    package = {"s3": "s3fs", "gs": "gcsfs", "az": "adlfs"}.get(protocol, f"an fsspec package for {protocol}://")
    extra = " (pip install 'resnet-labeler[s3]')" if protocol == "s3" else ""
    return f"{protocol}:// paths need fsspec and {package}{extra}, which this install lacks"


def clear_cache() -> None:
    """Forget the clients made so far (the next URL makes a new one that looks for credentials
    again): after rotating credentials in the environment, and between tests."""
    with _lock:
        _cache.clear()
