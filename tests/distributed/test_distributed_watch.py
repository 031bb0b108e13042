"""`labeler status RUN --watch` against a real private redis-server and a real worker: it keeps
watching while images are pending and exits 0 on its own once the run is finished."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import redis
from distributed_helpers import QUEUE, REPO, CeleryWorker, enqueue, wait_for

IMAGES = 12


def test_status_watch_follows_the_run_until_it_finishes(
    redis_url: str, start_worker: Callable[..., CeleryWorker], small_jpegs: list[str], tmp_path: Path
) -> None:
    client = redis.Redis.from_url(redis_url)
    summary = enqueue(client, "watched", small_jpegs[:IMAGES], shard_size=4)
    assert (summary.queued, summary.jobs) == (IMAGES, 3)

    env = {k: v for k, v in os.environ.items() if not k.startswith("LABELER_")}
    env["LABELER_QUEUE"] = QUEUE
    argv = [sys.executable, "-m", "worker", "status", "watched", "--watch", "--interval", "0.2",
            "--broker", redis_url]  # fmt: skip
    out_path = tmp_path / "watch.out"
    with open(out_path, "wb") as out:
        watcher = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:

        def updates_while_pending() -> bool:
            """No worker yet: several updates go by, and the watch must not end while images are pending."""
            text = out_path.read_text()
            assert watcher.poll() is None, f"the watch ended with {IMAGES} images pending:\n{text}"
            return text.count(f"pending {IMAGES}") >= 3

        wait_for(updates_while_pending, 60, "three watch updates")

        start_worker(redis_url, argv_extra=["--precision", "fp32"])  # fp32 passes the start check
        assert watcher.wait(timeout=120) == 0, out_path.read_text()
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    final = out_path.read_text().rsplit("run watched", 1)[-1]
    assert f"done {IMAGES} (100.0%)" in final and "pending 0" in final and "ETA finished" in final
