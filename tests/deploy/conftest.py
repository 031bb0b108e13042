"""Fixtures of the deploy/ and monitoring tests: a private redis-server and one real Celery
worker (with its metrics endpoint on) that labels one small run for the whole module, plus
headless Chromium for the report. The redis/worker helpers are the distributed tests' own.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "distributed"))

import distributed_helpers  # noqa: E402
from distributed_helpers import (  # noqa: E402
    CeleryWorker,
    RedisServer,
    free_port,
    wait_run_done,
    worker_env,
)

GOOD_IMAGES = 40


@pytest.fixture(scope="session", autouse=True)
def output_root(tmp_path_factory) -> Path:
    """Runs of these tests write their datasets under one private folder the workers may write."""
    root = tmp_path_factory.mktemp("datasets")
    distributed_helpers.OUTPUT_ROOT = root
    return root


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def run_images(tmp_path_factory, photos) -> dict[str, list[str]]:
    """40 small JPEGs, 2 corrupt files and 1 missing path: labels and two error codes."""
    folder = tmp_path_factory.mktemp("deploy-images")
    rng = np.random.default_rng(5)
    sources = list(photos.values())
    good = []
    for i in range(GOOD_IMAGES):
        photo = sources[i % len(sources)]
        y, x = int(rng.integers(0, photo.shape[0] - 96)), int(rng.integers(0, photo.shape[1] - 96))
        path = folder / f"img{i:03d}.jpg"
        cv2.imwrite(str(path), np.ascontiguousarray(photo[y : y + 96, x : x + 96, ::-1]))
        good.append(str(path))
    corrupt = []
    for i in range(2):
        path = folder / f"corrupt{i}.jpg"
        path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
        corrupt.append(str(path))
    return {"good": good, "corrupt": corrupt, "missing": [str(folder / "missing.jpg")]}


@pytest.fixture(scope="module")
def labeled_run(tmp_path_factory, redis_server, tiny_bundle, run_images) -> Iterator[dict[str, object]]:
    """One real worker (metrics on a free port) labels a run enqueued through the real CLI."""
    port = free_port()
    env = worker_env(redis_server.url, tiny_bundle, metrics_port=port, concurrency=2)
    logs = tmp_path_factory.mktemp("worker-logs")
    argv = [sys.executable, "-m", "worker", "worker", "-n", "metrics1@%h", "-l", "INFO"]
    worker = CeleryWorker("metrics1", env, logs, argv).start()
    paths = run_images["good"] + run_images["corrupt"] + run_images["missing"]
    listing = logs / "paths.txt"
    listing.write_text("\n".join(paths) + "\n")
    run = "deploy-metrics-run"
    try:
        subprocess.run(
            [sys.executable, "-m", "worker", "enqueue", f"@{listing}", "--run", run, "--shard-size", "10"],
            env=env,
            cwd=REPO,
            check=True,
            capture_output=True,
            timeout=60,
        )
        counts = wait_run_done(redis_server.client(), run, timeout=120)
        yield {"run": run, "port": port, "env": env, "worker": worker, "counts": counts, "paths": paths}
    finally:
        worker.stop()


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Headless Chromium driven by chromedriver (Debian packages chromium, chromium-driver)."""
    binary, driver_path = chromium_binary(), shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("chromium and chromedriver are not installed (scripts/install-system-deps installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_window_size(1000, 2400)
    yield driver
    driver.quit()
