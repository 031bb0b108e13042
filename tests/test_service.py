"""The labeling service: a slow file never holds up the batch, and one failure stays with its images.

No test here reads a clock: order comes from events, batches from a service whose images are all
decoded and queued before its inference thread starts (then max_batch_size alone cuts them), so a
busy machine changes how long they take, never what they find.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import is_dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

import worker.pipeline.service as service_module
from worker.pipeline.errors import ImageError
from worker.pipeline.service import LabelingService, ServiceFailed, ServiceOptions
from worker.records import ErrorCode
from worker.runners.base import InferenceOutput, Runner
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner


def collect(service, paths):
    records, lock = [], threading.Lock()

    def on_record(record):
        with lock:
            records.append(record)

    for path in paths:
        service.submit(path, on_record)
    assert service.drain(timeout=120)
    return records


class _Ready:
    """An observer that says when `count` images are decoded and queued for the engine."""

    def __init__(self, count: int) -> None:
        self.left, self.all, self._lock = count, threading.Event(), threading.Lock()

    def prepared(self, seconds):
        with self._lock:
            self.left -= 1
            if self.left == 0:
                self.all.set()

    def batch(self, size, seconds, waits):
        pass

    def emitted(self, record):
        pass


def queued_service(runner, count: int, **options) -> tuple[LabelingService, threading.Event]:
    """A service not started yet, and an event set once `count` submitted images are queued for its
    engine: started after it, its batches are exactly max_batch_size (nothing waits on max_wait_s)."""
    ready = _Ready(count)
    options = {"max_in_flight": 64, "decode_threads": 2, **options}
    return LabelingService(runner, ServiceOptions(observer=ready, **options)), ready.all


def test_a_slow_file_does_not_hold_up_the_others(tiny_bundle, image_paths, monkeypatch):
    """One read stalls (a slow network mount, simulated) until every other image has its record:
    were a batch held up for it, they never would, and its read would give up waiting."""
    slow = image_paths[0]
    others_answered, waited = threading.Event(), []
    real_read = service_module.read_image

    def read(path, policy):
        if path == slow:
            waited.append(others_answered.wait(120))
        return real_read(path, policy)

    order = []

    def on_record(record):
        order.append(record["path"])
        if len(order) == len(image_paths) - 1:
            others_answered.set()

    monkeypatch.setattr(service_module, "read_image", read)
    options = ServiceOptions(max_batch_size=4, max_wait_s=0.01, decode_threads=4)
    with LabelingService(OnnxRuntimeRunner(tiny_bundle), options) as service:
        for path in image_paths:
            service.submit(path, on_record)
        assert service.drain(timeout=240)
    assert waited == [True], "the other images waited for the slow one"
    assert sorted(order) == image_paths and order[-1] == slow


class FailingRunner(Runner):
    """Fails the calls `fails(n)` picks (n = 1 is the warm-up at load) with `message`: stands in for
    backend errors that cannot be caused on this machine (a GPU out of memory, a lost device)."""

    name = "failing"

    def __init__(self, bundle_dir, fails, message="simulated backend failure"):
        super().__init__(bundle_dir)
        self.fails, self.message, self.calls = fails, message, 0

    def _load(self):
        self.calls = 0

    def _infer(self, crops, want_features):
        self.calls += 1
        if self.fails(self.calls):
            raise RuntimeError(self.message)
        probabilities = np.full((len(crops), self.spec.num_classes), 1.0 / self.spec.num_classes, np.float32)
        return InferenceOutput(probabilities)


def flaky_runner(bundle_dir) -> FailingRunner:
    """Every other batch fails after the warm-up."""
    return FailingRunner(bundle_dir, lambda n: n % 2 == 0)


def lost_gpu_runner(bundle_dir, from_call: int = 2) -> FailingRunner:
    """Every call from `from_call` on fails, as after a GPU fell off the bus."""
    return FailingRunner(
        bundle_dir, lambda n: n >= from_call, "CUDA error: an illegal memory access was encountered"
    )


def test_a_failed_batch_gives_error_records_and_the_service_goes_on(tiny_bundle, image_paths):
    options = ServiceOptions(max_batch_size=2, max_wait_s=0.0, decode_threads=1)
    with LabelingService(flaky_runner(tiny_bundle), options) as service:
        records = collect(service, image_paths)
    assert len(records) == len(image_paths)
    failed = [r for r in records if "error" in r]
    labeled = [r for r in records if "labels" in r]
    assert failed and labeled
    assert all(r["error"]["code"] == "inference_failed" for r in failed)


def _held_lengths(service: LabelingService) -> dict[str, int]:
    """len() of every list, dict, set and deque the service holds, and of those its dataclasses hold."""
    lengths = {}
    for name, value in vars(service).items():
        inner = vars(value).items() if is_dataclass(value) else ()
        for key, item in [(name, value), *((f"{name}.{k}", v) for k, v in inner)]:
            if isinstance(item, list | dict | set | deque):
                lengths[key] = len(item)
    return lengths


def test_the_service_holds_nothing_that_grows_with_the_batches_it_runs(tiny_bundle, tmp_path):
    """A worker runs millions of batches: a service that ran 200 holds as much as one that ran 50
    (issue 18: it kept every batch size), and its statistics still count them all. Both are looked
    at once closed, when no batch is on its way through."""
    image = tmp_path / "small.jpg"
    cv2.imwrite(str(image), np.full((32, 32, 3), 90, np.uint8))
    options = ServiceOptions(max_batch_size=1, max_wait_s=0.0, decode_threads=1)
    services = {}
    for count in (50, 200):
        with LabelingService(FailingRunner(tiny_bundle, lambda n: False), options) as service:
            collect(service, [str(image)] * count)
        services[count] = service
    assert _held_lengths(services[200]) == _held_lengths(services[50])
    stats = services[200].batch_stats
    assert (stats.batches, stats.images, stats.largest, dict(stats.by_size)) == (200, 200, 1, {1: 200})
    assert stats.mean == 1.0 and services[200].batches_run == 200


def test_a_runner_that_cannot_load_fails_start(tmp_path, tiny_bundle):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(Exception, match="model file missing"):
        LabelingService(OnnxRuntimeRunner(copy)).start()


def test_batches_are_shared_by_concurrent_submitters(tiny_bundle, image_paths):
    """Two jobs submitting at once: their images meet in the same engine batch."""
    service, ready = queued_service(FailingRunner(tiny_bundle, lambda n: False), len(image_paths), max_batch_size=32)
    half = len(image_paths) // 2
    jobs = {"first": image_paths[:half], "second": image_paths[half:]}
    records = {name: [] for name in jobs}
    threads = [
        threading.Thread(target=lambda name=name: [service.submit(p, records[name].append) for p in jobs[name]])
        for name in jobs
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ready.wait(120)
    with service:
        assert service.drain(timeout=120)
    assert {name: sorted(r["path"] for r in got) for name, got in records.items()} == jobs
    assert dict(service.batch_stats.by_size) == {len(image_paths): 1}  # one batch held both jobs' images


def test_batches_failing_in_a_row_make_the_service_give_up_and_answer_every_image(tiny_bundle, image_paths):
    """Three failed batches in a row: the engine is broken, not the images. Every image submitted
    still gets a record (nobody waits forever), later ones say the service stopped, and new
    images are refused so a worker can hand its jobs back."""
    options = {"max_batch_size": 2, "max_wait_s": 0.0, "decode_threads": 1, "max_failed_batches": 3}
    records: list[dict] = []
    service, ready = queued_service(lost_gpu_runner(tiny_bundle), len(image_paths), **options)
    for path in image_paths:  # all queued before the engine starts: the batches are deterministic
        service.submit(path, records.append)
    assert ready.wait(120)
    with service:
        assert service.drain(timeout=120)
        assert service.failure is not None and "3 batches in a row failed" in service.failure
        assert "illegal memory access" in service.failure
        with pytest.raises(ServiceFailed, match="in a row"):
            service.submit(image_paths[0], records.append)
    assert len(records) == len(image_paths)
    assert {r["error"]["code"] for r in records} == {"inference_failed"}
    stopped = [r for r in records if r["error"]["message"].startswith("service stopped")]
    assert len(image_paths) - len(stopped) == 3 * 2  # only three batches of two reached the engine
    assert service.batches_run == 0


def test_a_runner_that_loads_but_cannot_infer_fails_start(tiny_bundle):
    with pytest.raises(RuntimeError, match="illegal memory access"):
        LabelingService(lost_gpu_runner(tiny_bundle, from_call=1)).start()  # the warm-up fails


class _ObserverThatRaises:
    """Breaks the rule that observers are cheap and quiet: metrics must not stop labeling."""

    def prepared(self, seconds):
        raise ValueError("observer bug")

    def batch(self, size, seconds, waits):
        raise ValueError("observer bug")

    def emitted(self, record):
        raise ValueError("observer bug")


def test_an_observer_that_raises_stops_neither_images_nor_the_service(tiny_bundle, image_paths):
    options = ServiceOptions(max_batch_size=4, max_wait_s=0.0, decode_threads=2, observer=_ObserverThatRaises())
    with LabelingService(FailingRunner(tiny_bundle, lambda n: False), options) as service:
        records = collect(service, image_paths)
        assert service.failure is None
    assert sorted(r["path"] for r in records) == image_paths and all("labels" in r for r in records)


class _Crash(BaseException):
    """Not an Exception: no per-batch handler takes it, so it ends the inference loop."""


class CrashingRunner(FailingRunner):
    """Raises _Crash on call `crash_call` (1 is the warm-up)."""

    def __init__(self, bundle_dir, crash_call: int):
        super().__init__(bundle_dir, lambda n: False)
        self.crash_call = crash_call

    def _infer(self, crops, want_features):
        if self.calls + 1 == self.crash_call:
            self.calls += 1
            raise _Crash("the loop itself broke")
        return super()._infer(crops, want_features)


def test_a_crashed_inference_thread_still_answers_every_image(tiny_bundle, image_paths):
    """Every image is submitted before the crash (else, on a busy machine, the crash can come before
    the last submit, which then meets ServiceFailed); each is answered once, none waits."""
    records: list[dict] = []
    service, ready = queued_service(CrashingRunner(tiny_bundle, crash_call=2), len(image_paths), max_batch_size=4)
    for path in image_paths:
        service.submit(path, records.append)
    assert ready.wait(120)
    with service:
        assert service.drain(timeout=120)
        assert "inference thread failed: _Crash: the loop itself broke" in (service.failure or "")
        with pytest.raises(ServiceFailed):
            service.submit(image_paths[0], lambda record: None)
    assert sorted(r["path"] for r in records) == image_paths  # each image answered exactly once
    assert all(r["error"]["code"] == "inference_failed" for r in records)


def test_a_crash_while_error_records_go_out_still_answers_the_rest_of_the_batch(tiny_bundle):
    """The loop crashed in the callback of a batch's first bad image: the other bad images of that
    batch were held by the loop, not queued, and drain() waited for their records for ever."""
    bad = [f"/missing/{i}.jpg" for i in range(4)]
    records: list[dict] = []

    def on_record(record):
        records.append(record)
        if len(records) == 1:
            raise _Crash("a consumer broke the loop")

    service = LabelingService(FailingRunner(tiny_bundle, lambda n: False), ServiceOptions(max_batch_size=8))
    for path in bad:  # their errors are ready at once: one batch holds the four
        service.submit(path, on_record, error=ImageError(ErrorCode.NOT_FOUND, "gone"))
    service.start()
    assert service.drain(timeout=60), "images of the crashed batch were never answered"  # close() would hang
    service.close()
    assert "_Crash" in (service.failure or "")
    assert sorted(r["path"] for r in records) == bad
    assert {r["error"]["code"] for r in records} == {"not_found"}


class _OutOfMemory(np.ndarray):
    """Probabilities that pass the runner's shape check, whose labels cannot be made: NumPy raising
    MemoryError for the batch's arrays, as it does on a machine whose memory others took."""

    def __neg__(self):
        raise MemoryError("simulated: no memory for the batch's labels")


class UnusableOutputRunner(FailingRunner):
    """Answers call `bad_call` with outputs the runner's own checks pass but records cannot use."""

    def __init__(self, bundle_dir, bad_call: int, spoil):
        super().__init__(bundle_dir, lambda n: False)
        self.bad_call, self.spoil = bad_call, spoil

    def _infer(self, crops, want_features):
        output = super()._infer(crops, want_features)
        return self.spoil(output) if self.calls == self.bad_call else output


@pytest.mark.parametrize(
    "spoil",
    [
        lambda out: InferenceOutput(out.probabilities.view(_OutOfMemory)),
        lambda out: InferenceOutput(out.probabilities, np.zeros((len(out.probabilities) - 1, 4), np.float32)),
    ],
    ids=["no memory for the labels", "a feature row short"],
)
def test_a_batch_whose_outputs_cannot_become_records_fails_alone(tiny_bundle, image_paths, spoil):
    """What goes wrong between the runner's outputs and the records fails that batch's images, as
    a failed inference does; it used to end the inference loop, and the service gave up on the
    first one, stopping its worker."""
    records: list[dict] = []
    runner = UnusableOutputRunner(tiny_bundle, bad_call=2, spoil=spoil)
    service, ready = queued_service(runner, len(image_paths), max_batch_size=4)
    for path in image_paths:
        service.submit(path, records.append)
    assert ready.wait(120)
    with service:
        assert service.drain(timeout=120)
        assert service.failure is None
    failed = [r for r in records if "error" in r]
    assert len(records) == len(image_paths) and len(failed) == 4  # the first batch of four
    assert {r["error"]["code"] for r in failed} == {"inference_failed"}
    assert service.batch_stats.batches == len(image_paths) // 4 - 1


def test_local_run_keeps_no_record_for_engine_failures_and_resume_retries_them(
    tiny_bundle, image_paths, tmp_path
):
    """`labeler run`'s loop: images whose batch failed in the engine get no record (it is not their
    fault), the summary says so, and a --resume run labels exactly those, once."""
    from worker.local.results import completed_paths
    from worker.local.run import run_local

    out = tmp_path / "labels.jsonl"
    options = ServiceOptions(max_batch_size=2, max_wait_s=0.0, decode_threads=1)
    first = run_local(image_paths, LabelingService(flaky_runner(tiny_bundle), options), out)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert first.not_labeled > 0 and not first.complete
    assert first.labeled == len(written) == len(image_paths) - first.not_labeled
    assert not [r for r in written if "error" in r]
    assert any("--resume" in line for line in first.lines())

    healthy = LabelingService(OnnxRuntimeRunner(tiny_bundle, intra_op_threads=1), options)
    second = run_local(image_paths, healthy, out, resume=True)
    assert second.complete and second.skipped == first.labeled and second.labeled == first.not_labeled
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["path"] for r in records) == image_paths  # each image once, none lost
    assert completed_paths(out) == set(image_paths)


def test_local_run_stops_when_the_engine_gives_up_and_resume_finishes(tiny_bundle, image_paths, tmp_path):
    from worker.local.run import run_local

    out = tmp_path / "labels.jsonl"
    options = ServiceOptions(max_batch_size=2, max_wait_s=0.0, decode_threads=1, max_in_flight=4)
    broken = run_local(image_paths, LabelingService(lost_gpu_runner(tiny_bundle, from_call=3), options), out)
    assert broken.engine_failure is not None and "in a row" in broken.engine_failure
    assert not broken.complete and broken.labeled + broken.not_labeled == len(image_paths)
    assert broken.never_submitted > 0  # it stopped taking images instead of failing them all
    assert any("the engine gave up" in line for line in broken.lines())
    assert len(out.read_text().splitlines()) == broken.labeled

    healthy = LabelingService(OnnxRuntimeRunner(tiny_bundle, intra_op_threads=1), options)
    resumed = run_local(image_paths, healthy, out, resume=True)
    assert resumed.complete and resumed.labeled == broken.not_labeled
    assert sorted(json.loads(line)["path"] for line in out.read_text().splitlines()) == image_paths


def test_local_files_make_no_fetch_threads_and_import_no_object_store_client(tiny_bundle, image_paths):
    """The fetch stage starts with the first URL: a CPU worker without s3fs labels files as before."""
    import subprocess
    import sys

    script = f"""
import sys
from worker.pipeline.service import LabelingService, ServiceOptions
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner
records = []
options = ServiceOptions(max_batch_size=2, decode_threads=1, fetch_concurrency=8)
with LabelingService(OnnxRuntimeRunner({str(tiny_bundle)!r}, intra_op_threads=1), options) as service:
    for path in {image_paths[:3]!r}:
        service.submit(path, records.append)
    service.drain()
    assert service.fetcher._pool is None and service.fetcher.high_water == 0
assert len(records) == 3 and all("labels" in r for r in records), records
loaded = sorted(m for m in ("fsspec", "s3fs", "aiobotocore", "botocore") if m in sys.modules)
assert not loaded, loaded
"""
    repo = str(Path(__file__).resolve().parents[1])  # this tree's code, not an installed copy's
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=repo)
    assert result.returncode == 0, result.stderr
