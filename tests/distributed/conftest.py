"""Fixtures of the distributed tests: a private password-protected redis-server (shared and
flushed per test, or a test's own for restarts), real worker subprocesses, and small JPEGs.
See distributed_helpers.py for the parts themselves.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import distributed_helpers
import pytest
from distributed_helpers import CeleryWorker, RedisServer, small_crops, worker_env


@pytest.fixture(scope="session", autouse=True)
def output_root(tmp_path_factory) -> Path:
    """Every run of the session writes its dataset under one private folder the workers may write."""
    root = tmp_path_factory.mktemp("datasets")
    distributed_helpers.OUTPUT_ROOT = root
    return root


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The shared private server, emptied for each test (and the runs' datasets with it)."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.client().flushall()
    shutil.rmtree(distributed_helpers.OUTPUT_ROOT / "runs", ignore_errors=True)
    return redis_server.url


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    """A private server for a test that restarts Redis."""
    data = tmp_path / "redis"
    data.mkdir()
    server = RedisServer(data).start()
    yield server
    server.stop()


@pytest.fixture
def start_worker(tmp_path, tiny_bundle) -> Iterator[Callable[..., CeleryWorker]]:
    """Start real worker subprocesses; every one still running is stopped at the end of the test."""
    started: list[CeleryWorker] = []

    def start(
        url: str, name: str = "w1", argv_extra: list[str] | None = None, **settings: object
    ) -> CeleryWorker:
        env = worker_env(url, tiny_bundle, **settings)
        argv = [
            sys.executable,
            "-m",
            "worker",
            "worker",
            "-n",
            f"{name}@%h",
            "-l",
            "INFO",
            *(argv_extra or []),
        ]
        worker = CeleryWorker(name, env, tmp_path / "logs", argv)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def small_jpegs(tmp_path_factory, photos) -> list[str]:
    """3000 distinct 64x64 JPEGs (crops of the test photographs), as absolute paths."""
    folder = tmp_path_factory.mktemp("small-jpegs")
    paths = []
    for i, crop in enumerate(small_crops(photos, 3000, seed=0)):
        path = folder / f"{i // 1000:02d}" / f"img{i:05d}.jpg"
        path.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(path), crop, [cv2.IMWRITE_JPEG_QUALITY, 85])
        paths.append(str(path))
    return paths
