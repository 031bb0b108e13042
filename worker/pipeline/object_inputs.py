"""Object URLs as inputs: `s3://bucket/prefix/` listings, single objects, and lists or manifests
that live in a bucket.

A prefix may hold millions of keys, so it is listed page by page (S3 ListObjectsV2, no delimiter)
and yielded as it arrives; S3 returns keys in UTF-8 byte order, which is Python's string order, so
the walk is deterministic (sorted by key) without holding the listing. Other fsspec protocols are
walked directory by directory, each directory sorted, as local directories are. Only keys with an
image extension are kept, as in directories. A listing that cannot be read at all (no such bucket,
access denied) is an InputError: there is no image to give a record to.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from worker.dataset.storage import StorageUnavailable, filesystem_for, join_url, split_url
from worker.pipeline.input_forms import (
    IMAGE_EXTENSIONS,
    MANIFEST_EXTENSIONS,
    Entry,
    InputError,
    csv_column,
    has_image_column,
    iter_manifest_values,
    parquet_input,
)
from worker.sources.container import PARQUET, TAR, ContainerOptions, is_tar_name

LIST_PAGE_SIZE = 1000  # S3's own maximum per ListObjectsV2 page


def iter_url_input(url: str, formats: ContainerOptions | None = None, page_size: int = LIST_PAGE_SIZE) -> Iterator[Entry]:
    """Expand one URL input: a prefix into its image objects and containers, a manifest into its
    paths, a tar into a container, an object as itself (a missing one still gets its not_found
    record when read)."""
    formats = formats or ContainerOptions()
    extension = _extension(url)
    if extension in IMAGE_EXTENSIONS:
        yield url
    elif is_tar_name(url):
        yield formats.container(TAR, url)
    elif extension in MANIFEST_EXTENSIONS and not url.endswith("/") and _is_object(url):  # one HEAD
        if extension == ".parquet":
            fs, path = _fs(url)
            with _listing_errors(url), fs.open(path, "rb") as handle:
                yield from parquet_input(handle, url, formats)
        else:
            yield from _iter_object_manifest(url, formats)
    elif is_prefix(url):
        yield from iter_prefix_images(url, formats, page_size)
    else:
        yield url


def is_prefix(url: str) -> bool:
    """Whether the URL names a prefix ("directory") rather than an object."""
    if url.endswith("/"):
        return True
    if _extension(url) in IMAGE_EXTENSIONS:
        return False
    fs, path = _fs(url)
    with _listing_errors(url):
        return bool(fs.isdir(path))


def iter_prefix_images(
    url: str, formats: ContainerOptions | None = None, page_size: int = LIST_PAGE_SIZE
) -> Iterator[Entry]:
    """Image objects and containers under a prefix, sorted by key, listed lazily page by page (a
    Parquet object's footer is read to see whether it holds image bytes)."""
    formats = formats or ContainerOptions()
    protocol, rest = split_url(url)
    fs, _ = _fs(url)
    bucket, _, key = rest.partition("/")
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    if protocol == "s3" and hasattr(fs, "call_s3"):
        keys = _s3_keys(fs, bucket, prefix, page_size, url)
    else:
        keys = _walk_keys(fs, f"{bucket}/{prefix}".rstrip("/"), bucket, url)
    for object_key in keys:
        object_url = join_url(protocol, f"{bucket}/{object_key}")
        if os.path.splitext(object_key)[1].lower() in IMAGE_EXTENSIONS:
            yield object_url
        elif is_tar_name(object_key):
            yield formats.container(TAR, object_url)
        elif object_key.lower().endswith(".parquet"):
            with _listing_errors(object_url), fs.open(f"{bucket}/{object_key}", "rb") as handle:
                if has_image_column(handle, object_url, formats):
                    yield formats.container(PARQUET, object_url)


@contextmanager
def open_object_text(url: str) -> Iterator[TextIO]:
    """A text (UTF-8) stream over an object: a list of paths living in a bucket."""
    fs, path = _fs(url)
    with _listing_errors(url):
        handle = fs.open(path, "rb")
    with handle, io.TextIOWrapper(handle, encoding="utf-8", newline="") as text:
        yield text


def _iter_object_manifest(url: str, formats: ContainerOptions) -> Iterator[Entry]:
    fs, path = _fs(url)
    with _listing_errors(url), fs.open(path, "rb") as handle, io.TextIOWrapper(handle, encoding="utf-8", newline="") as text:
        yield from iter_manifest_values(csv_column(text, url), formats)


def _s3_keys(fs: Any, bucket: str, prefix: str, page_size: int, url: str) -> Iterator[str]:
    request: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
    while True:
        with _listing_errors(url):
            page = fs.call_s3("list_objects_v2", **request)
        for item in page.get("Contents", []):
            yield item["Key"]
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return
        request["ContinuationToken"] = token


def _walk_keys(fs: Any, root: str, bucket: str, url: str) -> Iterator[str]:
    with _listing_errors(url):
        for directory, dirs, files in fs.walk(root):
            dirs.sort()
            base = directory.strip("/")  # some filesystems (memory://) root their paths at "/"
            for name in sorted(files):
                full = f"{base}/{name}"
                yield full[len(bucket) + 1 :]


def _is_object(url: str) -> bool:
    fs, path = _fs(url)
    with _listing_errors(url):
        return bool(fs.isfile(path))


def _fs(url: str) -> tuple[Any, str]:
    try:
        return filesystem_for(url)
    except StorageUnavailable as exc:
        raise InputError(str(exc)) from None


def _extension(url: str) -> str:
    return os.path.splitext(url.rstrip("/").rsplit("/", 1)[-1])[1].lower()


@contextmanager
def _listing_errors(url: str) -> Iterator[None]:
    """The store's failures as InputErrors that name the URL and never the client's text (which
    could carry an endpoint's userinfo)."""
    try:
        yield
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{url}: no such bucket or object") from None
    except PermissionError:
        raise InputError(f"{url}: access denied (credentials or bucket policy)") from None
    except Exception as exc:  # botocore's connection errors are not OSErrors
        raise InputError(f"{url}: the store failed ({type(exc).__name__})") from None
