"""The labeling service: a slow file never holds up the batch, and one failure stays with its images."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import worker.service as service_module
from worker.runners.base import InferenceOutput, Runner
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner
from worker.service import LabelingService, ServiceOptions


@pytest.fixture(scope="module")
def image_paths(photo_dir):
    return sorted(str(p) for p in photo_dir.glob("*.jpg"))


def collect(service, paths):
    records, lock = [], threading.Lock()

    def on_record(record):
        with lock:
            records.append((time.monotonic(), record))

    for path in paths:
        service.submit(path, on_record)
    assert service.drain(timeout=120)
    return records


def test_a_slow_file_does_not_hold_up_the_others(tiny_bundle, image_paths, monkeypatch):
    """One read stalls for 2 s (a slow network mount, simulated); everything else is labeled first."""
    slow = image_paths[0]
    real_read = service_module.read_image_bytes

    def read(path, policy):
        if path == slow:
            time.sleep(2.0)
        return real_read(path, policy)

    monkeypatch.setattr(service_module, "read_image_bytes", read)
    options = ServiceOptions(max_batch_size=4, max_wait_s=0.01, decode_threads=4)
    started = time.monotonic()
    with LabelingService(OnnxRuntimeRunner(tiny_bundle), options) as service:
        records = collect(service, image_paths)
    by_path = {rec["path"]: when - started for when, rec in records}
    others = [t for p, t in by_path.items() if p != slow]
    assert len(by_path) == len(image_paths)
    assert max(others) < by_path[slow], "the slow file should be the last record"
    assert max(others) < 1.9, "the other images must not wait for the slow one"


class FlakyRunner(Runner):
    """Fails every other batch: stands in for a backend error (e.g. a GPU out-of-memory)."""

    name = "flaky"

    def __init__(self, bundle_dir):
        super().__init__(bundle_dir)
        self.calls = 0

    def _load(self):
        self.calls = 0

    def _infer(self, crops, want_features):
        self.calls += 1
        if self.calls % 2 == 1:
            raise RuntimeError("simulated backend failure")
        probabilities = np.full((len(crops), self.spec.num_classes), 1.0 / self.spec.num_classes, np.float32)
        return InferenceOutput(probabilities)


def test_a_failed_batch_gives_error_records_and_the_service_goes_on(tiny_bundle, image_paths):
    options = ServiceOptions(max_batch_size=2, max_wait_s=0.0, decode_threads=1)
    with LabelingService(FlakyRunner(tiny_bundle), options) as service:
        records = [rec for _, rec in collect(service, image_paths)]
    assert len(records) == len(image_paths)
    failed = [r for r in records if "error" in r]
    labeled = [r for r in records if "labels" in r]
    assert failed and labeled
    assert all(r["error"]["code"] == "inference_failed" for r in failed)


def test_a_runner_that_cannot_load_fails_start(tmp_path, tiny_bundle):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(Exception, match="model file missing"):
        LabelingService(OnnxRuntimeRunner(copy)).start()


def test_batches_are_shared_by_concurrent_submitters(tiny_bundle, image_paths):
    """Two jobs submitting at once: their images meet in the same engine batches."""
    options = ServiceOptions(max_batch_size=32, max_wait_s=0.2, decode_threads=2)
    with LabelingService(OnnxRuntimeRunner(tiny_bundle), options) as service:
        half = len(image_paths) // 2
        threads = [
            threading.Thread(target=collect, args=(service, part))
            for part in (image_paths[:half], image_paths[half:])
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(service.batch_sizes) == len(image_paths)
        assert service.batches_run < len(image_paths) / 2
