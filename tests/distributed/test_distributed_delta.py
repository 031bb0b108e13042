"""Incremental runs on real workers (issue 22): `labeler enqueue --skip-done-in` publishes only the
delta (new files, touched ones), the manifest names its lineage, a night with nothing new still
finishes with a manifest the next night builds on, and a worker serving another model refuses the
run and stops the waiting client instead of mixing two models' rows into one chain."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_helpers import QUEUE, run_output

from worker.dataset.files import iter_records

pytestmark = pytest.mark.slow


def enqueue(redis_url: str, folder: Path, run: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker", "enqueue", str(folder), "--run", run, "--broker", redis_url, "--queue", QUEUE,
         "--output", str(run_output(run)), "--wait", "--interval", "0.2", "--no-progress", *extra],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def paths_of(run: str) -> set[str]:
    rows = list(iter_records(run_output(run)))
    assert len(rows) == len({row["path"] for row in rows}), "a path has two rows"
    return {row["path"] for row in rows}


def test_enqueue_publishes_only_the_delta_and_another_model_is_refused(
    redis_url, start_worker, small_jpegs, tmp_path
) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for path in small_jpegs[:24]:
        shutil.copy(path, folder)
    worker = start_worker(redis_url, "d1")
    first = enqueue(redis_url, folder, "night1")
    assert first.returncode == 0, first.stderr
    assert len(paths_of("night1")) == 24

    touched = sorted(folder.iterdir())[:2]
    for path in touched:
        info = path.stat()
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 5_000_000))
    added = [shutil.copy(path, folder) for path in small_jpegs[24:27]]
    second = enqueue(redis_url, folder, "night2", "--skip-done-in", str(run_output("night1")))
    assert second.returncode == 0, second.stderr
    assert "left out: 22 images" in second.stderr
    assert paths_of("night2") == {str(p) for p in touched} | {str(Path(p)) for p in added}
    lineage = json.loads((run_output("night2") / "manifest.json").read_text())["lineage"]
    assert [entry["location"] for entry in lineage] == [str(run_output("night1"))]

    third = enqueue(redis_url, folder, "night3", "--skip-done-in", "night2")  # the run's name: the ledger knows its output
    assert third.returncode == 0, third.stderr
    assert (run_output("night3") / "manifest.json").is_file(), "an empty night still finishes its chain"
    assert "left out: 27 images" in third.stderr

    worker.stop()
    from engine_build.build import build_from_weights
    from engine_build.weights import random_weights

    rebuilt = tmp_path / "rebuilt"
    build_from_weights(random_weights(10, seed=2, base_width=8), rebuilt)
    start_worker(redis_url, "d2", model=str(rebuilt))
    shutil.copy(small_jpegs[27], folder)
    fourth = enqueue(redis_url, folder, "night4", "--skip-done-in", str(run_output("night3")))
    assert fourth.returncode != 0
    assert "builds on datasets labeled by model" in fourth.stderr + fourth.stdout
    labels = run_output("night4") / "labels"
    assert not labels.exists() or not list(iter_records(run_output("night4"))), "no row of the other model"
