"""The fetch stage against the real server, behind a slow link (a loopback proxy that holds each
request for a network round trip): URL reads overlap far beyond the decode threads on a few reused
connections, the records are those of reading on the decode threads, the in-flight bound still
holds, and every bad object still gets its own record."""

from __future__ import annotations

import threading

import cv2
import pytest
from objectstore_helpers import IMAGES_BUCKET, PRIVATE_BUCKET, slow_link

from worker.dataset import storage
from worker.dataset.storage import DEFAULT_FETCH_CONCURRENCY
from worker.pipeline.reading import ReadPolicy
from worker.pipeline.service import LabelingService, ServiceOptions
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner
from worker.settings import Settings

DECODE_THREADS = 2
FETCH = 8
DELAY_S = 0.03


@pytest.fixture
def small_objects(s3_admin, s3_prefix, photos) -> list[str]:
    """24 small JPEGs (the session's photos, shrunk and cycled) under PREFIX/small/: their URLs."""
    names = sorted(photos)
    blobs = {}
    for index in range(24):
        small = cv2.resize(photos[names[index % len(names)]][..., ::-1], (96 + index, 72))
        blobs[f"{IMAGES_BUCKET}/{s3_prefix}/small/{index:03d}.jpg"] = cv2.imencode(".jpg", small)[1].tobytes()
    s3_admin.pipe(blobs)
    return [f"s3://{key}" for key in sorted(blobs)]


@pytest.fixture
def link(s3_server, labeler_s3_env, monkeypatch):
    """The labeler's client talks to the server through the slow link."""
    with slow_link(s3_server.s3_port, DELAY_S) as proxy:
        monkeypatch.setenv(storage.S3_ENDPOINT_ENV, proxy.endpoint)
        storage.clear_cache()
        yield proxy
    storage.clear_cache()


def label(bundle, urls: list[str], **options: object) -> tuple[dict[str, dict], LabelingService]:
    """Every URL's record, by path, from a service with `options` (closed when this returns)."""
    records: dict[str, dict] = {}
    lock = threading.Lock()

    def keep(record: dict) -> None:
        with lock:
            records[record["path"]] = record

    settings = {"max_batch_size": 4, "max_wait_s": 0.005, "decode_threads": DECODE_THREADS, **options}
    runner = OnnxRuntimeRunner(bundle, intra_op_threads=1)
    with LabelingService(runner, ServiceOptions(**settings)) as service:
        for url in urls:
            service.submit(url, keep)
        assert service.drain(timeout=120)
    assert len(records) == len(urls), "one record per input"
    return records, service


def test_reads_overlap_on_reused_connections_and_give_the_old_records(tiny_bundle, small_objects, link):
    link.reset_counts()
    fetched, service = label(tiny_bundle, small_objects, fetch_concurrency=FETCH)
    assert service.fetcher.high_water > DECODE_THREADS, "more reads in flight than decode threads"
    assert link.high_water > DECODE_THREADS, "requests overlapped on the wire"
    assert link.requests >= 2 * len(small_objects)  # a HEAD and a ranged GET each
    assert link.connections <= FETCH, "connections are pooled and reused, one per fetch thread at most"
    assert all("labels" in record for record in fetched.values()), fetched

    link.reset_counts()
    old, old_service = label(tiny_bundle, small_objects, fetch_concurrency=0)  # read on the decode threads
    assert old_service.fetcher.high_water == 0
    assert link.high_water <= DECODE_THREADS
    assert fetched == old, "the same records as reading on the decode threads"


def test_the_in_flight_bound_caps_the_fetch_stage(tiny_bundle, small_objects, link):
    _, service = label(tiny_bundle, small_objects, fetch_concurrency=FETCH, max_in_flight=3)
    assert 0 < service.fetcher.high_water <= 3
    runner = OnnxRuntimeRunner(tiny_bundle)
    options = ServiceOptions(max_batch_size=4, fetch_concurrency=FETCH)
    assert LabelingService(runner, options)._in_flight_limit == 4 * 4 + FETCH, "room for every fetch thread"


def test_every_bad_object_keeps_its_record(tiny_bundle, small_objects, s3_admin, s3_prefix, link):
    base = f"s3://{IMAGES_BUCKET}/{s3_prefix}"
    good = s3_admin.cat_file(small_objects[0].removeprefix("s3://"))
    s3_admin.pipe({
        f"{IMAGES_BUCKET}/{s3_prefix}/small/zz-truncated.jpg": good[: len(good) // 2],
        f"{IMAGES_BUCKET}/{s3_prefix}/small/zz-big.jpg": good + b"\0" * 100_000,
        f"{IMAGES_BUCKET}/{s3_prefix}/other/outside.jpg": good,
        f"{PRIVATE_BUCKET}/{s3_prefix}/denied.jpg": good,
    })  # fmt: skip
    expected = {
        f"{base}/small/zz-truncated.jpg": "decode_failed",
        f"{base}/small/zz-big.jpg": "too_large",
        f"{base}/small/missing.jpg": "not_found",
        f"{base}/other/outside.jpg": "outside_allowed_roots",
        f"{base}/small/../other/outside.jpg": "outside_allowed_roots",
        f"s3://{PRIVATE_BUCKET}/{s3_prefix}/denied.jpg": "permission_denied",
    }
    policy = ReadPolicy.create([f"{base}/small/", f"s3://{PRIVATE_BUCKET}/{s3_prefix}/"], max_bytes=50_000)
    urls = small_objects[:6] + list(expected)
    fetched, _ = label(tiny_bundle, urls, fetch_concurrency=FETCH, read_policy=policy)
    for url, code in expected.items():
        assert fetched[url]["error"]["code"] == code, fetched[url]
    assert all("labels" in fetched[url] for url in small_objects[:6])
    old, _ = label(tiny_bundle, urls, fetch_concurrency=0, read_policy=policy)
    assert fetched == old, "the same records, errors included, as reading on the decode threads"


def test_the_connection_pool_matches_the_fetch_concurrency(labeler_s3_env, monkeypatch):
    assert Settings().fetch_concurrency == DEFAULT_FETCH_CONCURRENCY
    assert storage.S3_CLIENT_CONFIG["max_pool_connections"] == DEFAULT_FETCH_CONCURRENCY
    monkeypatch.setattr(storage, "_connections", storage._connections)  # undone after the test
    assert storage.filesystem("s3").config_kwargs["max_pool_connections"] >= DEFAULT_FETCH_CONCURRENCY
    storage.reserve_connections(DEFAULT_FETCH_CONCURRENCY + 16)
    assert storage.filesystem("s3").config_kwargs["max_pool_connections"] == DEFAULT_FETCH_CONCURRENCY + 16
