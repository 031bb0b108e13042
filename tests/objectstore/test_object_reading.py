"""Reading objects with the safety of files, against the real server: each failure its stable code.

Calls read_image_bytes (the reader the decode threads use) with s3:// URLs as the read-only
`labeler` identity.
"""

from __future__ import annotations

import sys
import time

import pytest
from objectstore_helpers import IMAGES_BUCKET, PRIVATE_BUCKET, free_ports

from worker.dataset import storage
from worker.pipeline.errors import ImageError
from worker.pipeline.reading import ReadPolicy, read_image_bytes
from worker.records import ErrorCode


def code_of(url: str, policy: ReadPolicy) -> str:
    with pytest.raises(ImageError) as caught:
        read_image_bytes(url, policy)
    return caught.value.code


def test_reads_an_object_and_confines_to_its_prefix(s3_admin, s3_prefix, labeler_s3_env):
    s3_admin.pipe(f"{IMAGES_BUCKET}/{s3_prefix}/in/a.jpg", b"A" * 100)
    s3_admin.pipe(f"{IMAGES_BUCKET}/{s3_prefix}/other/b.jpg", b"B" * 100)
    s3_admin.pipe(f"{IMAGES_BUCKET}/{s3_prefix}/in2/c.jpg", b"C" * 100)
    base = f"s3://{IMAGES_BUCKET}/{s3_prefix}"
    policy = ReadPolicy.create([f"{base}/in/"])
    assert read_image_bytes(f"{base}/in/a.jpg", policy) == b"A" * 100
    assert read_image_bytes(f"s3a://{IMAGES_BUCKET}/{s3_prefix}/in/a.jpg", policy) == b"A" * 100
    assert code_of(f"{base}/other/b.jpg", policy) == ErrorCode.OUTSIDE_ALLOWED_ROOTS
    assert code_of(f"{base}/in2/c.jpg", ReadPolicy.create([f"{base}/in"])) == ErrorCode.OUTSIDE_ALLOWED_ROOTS
    assert code_of(f"{base}/in/../other/b.jpg", policy) == ErrorCode.OUTSIDE_ALLOWED_ROOTS
    assert code_of(f"{base}/in/./a.jpg", policy) == ErrorCode.OUTSIDE_ALLOWED_ROOTS
    assert code_of(f"{base}/in//a.jpg", policy) == ErrorCode.OUTSIDE_ALLOWED_ROOTS
    assert code_of(f"s3://{PRIVATE_BUCKET}/{s3_prefix}/in/a.jpg", policy) == ErrorCode.OUTSIDE_ALLOWED_ROOTS
    # Directory roots and URL roots never admit each other.
    assert code_of(f"{base}/in/a.jpg", ReadPolicy.create(["/"])) == ErrorCode.OUTSIDE_ALLOWED_ROOTS
    assert code_of("/etc/hostname", policy) == ErrorCode.OUTSIDE_ALLOWED_ROOTS


def test_missing_denied_too_large_and_empty(s3_admin, s3_prefix, labeler_s3_env):
    base = f"s3://{IMAGES_BUCKET}/{s3_prefix}"
    s3_admin.pipe(f"{IMAGES_BUCKET}/{s3_prefix}/big.jpg", b"x" * 5000)
    s3_admin.pipe(f"{IMAGES_BUCKET}/{s3_prefix}/empty.jpg", b"")
    s3_admin.pipe(f"{PRIVATE_BUCKET}/{s3_prefix}/secret.jpg", b"y" * 10)
    policy = ReadPolicy.create([], max_bytes=4096)
    assert code_of(f"{base}/missing.jpg", policy) == ErrorCode.NOT_FOUND
    assert code_of(f"s3://no-such-bucket-{s3_prefix}/a.jpg", policy) in (ErrorCode.NOT_FOUND, ErrorCode.PERMISSION_DENIED)
    assert code_of(f"s3://{PRIVATE_BUCKET}/{s3_prefix}/secret.jpg", policy) == ErrorCode.PERMISSION_DENIED
    assert code_of(f"{base}/big.jpg", policy) == ErrorCode.TOO_LARGE
    assert code_of(f"{base}/empty.jpg", policy) == ErrorCode.DECODE_FAILED
    assert code_of(f"{base}", policy) == ErrorCode.NOT_A_FILE
    assert read_image_bytes(f"{base}/big.jpg", ReadPolicy.create([], max_bytes=5000)) == b"x" * 5000


def test_a_store_that_keeps_failing_is_read_failed_after_backoff(labeler_s3_env, monkeypatch):
    (closed,) = free_ports(1)
    monkeypatch.setenv("LABELER_S3_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    storage.clear_cache()
    policy = ReadPolicy(read_attempts=2, backoff_s=0.05)
    started = time.monotonic()
    with pytest.raises(ImageError) as caught:
        read_image_bytes(f"s3://{IMAGES_BUCKET}/a.jpg", policy)
    assert caught.value.code == ErrorCode.READ_FAILED
    assert "2 attempts" in caught.value.message
    assert labeler_s3_env["AWS_SECRET_ACCESS_KEY"] not in caught.value.message
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("missing", ["fsspec", "s3fs"])
def test_without_the_client_package_a_clear_error(monkeypatch, missing):
    import builtins

    from worker.pipeline.inputs import InputError, iter_input_paths

    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name == missing or name.startswith(missing + "."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    import importlib

    classes = importlib.import_module("fsspec.registry")._registry  # fsspec's cache of imported classes
    storage.clear_cache()
    monkeypatch.delitem(classes, "s3", raising=False)
    monkeypatch.setitem(sys.modules, missing, None)  # any import of it fails, importlib's too
    monkeypatch.setattr(builtins, "__import__", without)
    with pytest.raises(ImageError) as caught:
        read_image_bytes("s3://bucket/a.jpg", ReadPolicy())
    assert caught.value.code == ErrorCode.INTERNAL_ERROR
    assert "resnet-labeler[s3]" in caught.value.message
    with pytest.raises(InputError, match=r"resnet-labeler\[s3\]"):
        list(iter_input_paths(["s3://bucket/prefix/"]))
    storage.clear_cache()


def test_allowed_roots_setting_keeps_urls_whole():
    from worker.settings import Settings

    settings = Settings.from_env({"LABELER_ALLOWED_ROOTS": "/data:s3://images/in/:/more"})
    assert settings.allowed_roots == ("/data", "s3://images/in/", "/more")
    assert Settings.from_env(settings.env()).allowed_roots == settings.allowed_roots


def test_the_size_cap_is_checked_before_any_download(s3_admin, s3_prefix, labeler_s3_env, monkeypatch):
    s3_admin.pipe(f"{IMAGES_BUCKET}/{s3_prefix}/huge.jpg", b"z" * 300_000)
    fs = storage.filesystem("s3")

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded an object over the cap")

    monkeypatch.setattr(fs, "cat_file", no_download)
    policy = ReadPolicy.create([], max_bytes=1000)
    assert code_of(f"s3://{IMAGES_BUCKET}/{s3_prefix}/huge.jpg", policy) == ErrorCode.TOO_LARGE
