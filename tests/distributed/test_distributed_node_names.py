"""Two CPU workers started on one host without --hostname get distinct Celery node names (they
used to both be `labeler@host`: Celery warned and per-worker activity merged them)."""

from __future__ import annotations

import sys

import pytest
from celery import Celery
from distributed_helpers import CeleryWorker, wait_for, worker_env

from worker.cli.worker import default_node_name

pytestmark = pytest.mark.slow


def test_default_names_are_per_gpu_or_per_process() -> None:
    assert default_node_name(3) == "labeler-gpu3@%h"
    assert default_node_name(None, pid=4242) == "labeler-4242@%h"
    assert default_node_name(None) != default_node_name(None, pid=1)


def test_two_cpu_workers_on_one_host_answer_under_their_own_names(redis_url, tiny_bundle, tmp_path) -> None:
    argv = [sys.executable, "-m", "worker", "worker", "-l", "INFO"]
    workers = [
        CeleryWorker(f"unnamed{i}", worker_env(redis_url, tiny_bundle), tmp_path / "logs", argv).start()
        for i in range(2)
    ]
    try:
        control = Celery(broker=redis_url, backend=redis_url).control

        def both_names() -> set[str] | None:
            names = {name for reply in control.ping(timeout=1.0) for name in reply}
            return names if len(names) >= 2 else None

        names = wait_for(both_names, 30, "both workers to answer a ping")
        expected = {f"labeler-{worker.process.pid}@" for worker in workers}
        assert {name.split("@")[0] + "@" for name in names} == expected
        assert not any("DuplicateNodenameWarning" in worker.log() for worker in workers)
    finally:
        for worker in workers:
            worker.stop()
