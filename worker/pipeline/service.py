"""The labeling service: a decode thread pool feeding one inference thread through the batcher.

Object URLs are read first by the fetch stage (worker/pipeline/fetching.py), many at a time on
their own threads, and only their bytes reach the decode pool; local files are read on the pool.

Decoding is the decode stage's (worker/pipeline/decode_stage.py): OpenCV on the pool by default;
with `--decode gpu` the pool only reads and checks files, the stage decodes each batch on the GPU
on the inference thread, and images it cannot decode go back to the pool for OpenCV.

One service lives in each process that infers and is shared by every job in it, so images from
concurrent jobs (or one long local run) share engine batches. Decoding overlaps inference, finished
crops enter the queue in completion order (a slow file never holds up a batch), bad files become
error records on the way, and `submit` blocks when too many images are in flight (backpressure).
The runner is loaded and used on the inference thread only: CUDA contexts are per thread. With a
GPU runner the thread keeps `runner.pipeline_depth` batches started: it gathers and starts batch
n+1 before it waits for batch n, so the GPU never idles while the host labels and emits records.

A failed batch (the runner raised, or its outputs could not become records) gives its images
`inference_failed` records and the service goes on, but a run of `max_failed_batches` failures in a
row, a failed warm-up or a crash of the inference thread means the engine itself is broken (a lost
GPU, a sticky CUDA error): the service then gives up (`failure`), refuses new images and answers the
ones it holds with records its callers know not to keep, so a distributed worker hands the jobs
back instead of failing a whole run on one bad node.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import numpy as np

from worker.dataset.storage import DEFAULT_FETCH_CONCURRENCY
from worker.machine import usable_cores
from worker.pipeline.batcher import STOP, collect_batch
from worker.pipeline.decode_stage import CpuDecodeStage, DecodeStage, Deferred
from worker.pipeline.errors import ImageError, unexpected_error
from worker.pipeline.fetching import FetchStage
from worker.pipeline.labels import top_k_labels
from worker.pipeline.preprocess import DEFAULT_MAX_PIXELS, decode_and_crop
from worker.pipeline.reading import ReadPolicy, read_image
from worker.records import ErrorCode, error_record, label_record
from worker.runners.base import InferenceOutput, PendingInference, Runner, RunnerError
from worker.setting_table import default

log = logging.getLogger(__name__)

RecordCallback = Callable[[dict[str, Any]], None]


class ServiceFailed(RuntimeError):
    """The service gave up: its engine cannot infer any more. Hand the work back; restart the worker."""


class ServiceObserver(Protocol):
    """Told what the service did, for metrics (worker/celery_worker/metrics.py). Calls must be cheap;
    one that raises is logged and labeling goes on."""

    def prepared(self, seconds: float) -> None: ...  # read + decode + crop of one image
    # seconds: batch started -> outputs back; waits: each crop ready -> batch started
    def batch(self, size: int, seconds: float, waits: list[float]) -> None: ...
    def emitted(self, record: dict[str, Any]) -> None: ...  # every record, labeled or error


@dataclass(frozen=True)
class ServiceOptions:
    max_batch_size: int = 32
    max_wait_s: float = default("max_wait_ms") / 1000
    decode_threads: int = default("decode_threads")  # 0: one per core
    # Images submitted and not answered yet (bytes, crops): the memory bound. 0: four batches plus
    # one per fetch thread, so URL reads fill the fetch stage and still leave batches to decode.
    max_in_flight: int = 0
    fetch_concurrency: int = DEFAULT_FETCH_CONCURRENCY  # URL reads at once (0: on the decode threads)
    top_k: int = default("top_k")
    embeddings: bool = False
    read_policy: ReadPolicy = field(default_factory=ReadPolicy)
    max_pixels: int = DEFAULT_MAX_PIXELS
    observer: ServiceObserver | None = None  # None (local runs): no metrics
    warm_up: bool = True  # one batch of one blank crop at load: a broken engine fails start()
    max_failed_batches: int = 3  # failed batches in a row after which the service gives up (0: never)


@dataclass
class BatchStats:
    """The sizes of the batches a service ran, in memory that does not grow with their number: a
    worker lives for days, and a list of every batch size grew all night (issue 18)."""

    batches: int = 0
    images: int = 0
    largest: int = 0
    by_size: Counter[int] = field(default_factory=Counter)  # batches per size: at most max_batch_size keys

    def add(self, size: int) -> None:
        self.batches += 1
        self.images += size
        self.largest = max(self.largest, size)
        self.by_size[size] += 1

    @property
    def mean(self) -> float:
        return self.images / self.batches if self.batches else 0.0


@dataclass
class _Prepared:
    path: str
    callback: RecordCallback
    crop: np.ndarray | Deferred | None = None  # a host crop, or bytes the decode stage does per batch
    error: ImageError | None = None
    ready_at: float = 0.0
    features: bool = False  # this image's record carries the embedding (or every one: options.embeddings)
    answered: bool = False  # its record went out (never twice, even while failing after a crash)
    source: dict[str, Any] | None = None  # source columns (a sample's container, a file's version), copied into its record


@dataclass
class _Started:
    """A batch started on the runner; its records go out when it is finished."""

    items: list[_Prepared]
    pending: PendingInference
    started: float


class LabelingService:
    """submit(path, callback) from any thread; callbacks run on the inference thread."""

    def __init__(
        self, runner: Runner, options: ServiceOptions | None = None, stage: DecodeStage | None = None
    ) -> None:
        self.runner = runner
        self.stage: DecodeStage = stage or CpuDecodeStage()
        self.options = options or ServiceOptions()
        limit = runner.max_batch_size
        self.batch_size = min(self.options.max_batch_size, limit) if limit else self.options.max_batch_size
        self.fetcher = FetchStage(self.options.fetch_concurrency, self.options.read_policy)
        self._in_flight_limit = self.options.max_in_flight or 4 * self.batch_size + self.fetcher.concurrency
        self._ready: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(self._in_flight_limit)
        self._idle = threading.Condition()
        self._in_flight = 0
        self._pool = ThreadPoolExecutor(
            max_workers=self.options.decode_threads or usable_cores(),
            thread_name_prefix="decode",
        )
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._inference_loop, name="inference", daemon=True)
        self._closed = False
        self._started: deque[_Started] = deque()
        self._holding: list[_Prepared] = []  # gathered by the loop, not yet in a started batch
        self._stop_taken = False
        self._failures_in_a_row = 0
        self.failure: str | None = None  # why the service gave up; None while it works
        self.batch_stats = BatchStats()

    @property
    def batches_run(self) -> int:
        return self.batch_stats.batches

    def start(self) -> LabelingService:
        """Start the inference thread and wait until the runner is loaded (or failed to load)."""
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error
        return self

    def submit(
        self, path: str, callback: RecordCallback, features: bool = False, *,
        data: bytes | None = None, error: ImageError | None = None, source: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Queue one image; its record reaches `callback` (with its embedding when `features` or
        `options.embeddings`). Blocks while too many are in flight.

        A container's sample comes with its `data` (read by worker/sources/), or with the `error`
        that is its record; `source` columns (worker/sources/item.py) go into its record."""
        if self._closed:
            raise RuntimeError("service is closed")
        if self.failure is not None:
            raise ServiceFailed(self.failure)
        self._slots.acquire()
        with self._idle:
            self._in_flight += 1
        features = features or self.options.embeddings
        if error is not None:
            self._put_ready(_Prepared(path, callback, error=error, features=features, source=source), time.perf_counter())
        elif data is not None:
            self._pool.submit(self._prepare, path, callback, features, data, 0, source)
        elif self.fetcher.takes(path):
            self.fetcher.submit(path, partial(self._fetched, path, callback, features, time.perf_counter()))
        else:
            self._pool.submit(self._prepare, path, callback, features)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted image has its record. False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.drain()
        self._ready.put(STOP)
        self._thread.join()
        self.fetcher.close()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> LabelingService:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _fetched(
        self, path: str, callback: RecordCallback, features: bool, started: float,
        data: bytes | None, version: str | None, error: ImageError | None,
    ) -> None:  # fmt: skip
        """On a fetch thread: the object's bytes go to the decode pool, a failed read is ready now."""
        if error is None:
            self._pool.submit(self._prepare, path, callback, features, data, started, {"source_version": version})
        else:
            self._put_ready(_Prepared(path, callback, error=error, features=features), started)

    def _prepare(
        self, path: str, callback: RecordCallback, features: bool, data: bytes | None = None, started: float = 0,
        source: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """On the pool: read the file (unless the fetch stage or a container brought its bytes), decode, crop."""
        item = _Prepared(path, callback, features=features, source=source)
        started = started or time.perf_counter()
        try:
            if data is None:
                data, version = read_image(path, self.options.read_policy)
                item.source = {**(source or {}), "source_version": version}
            item.crop = self.stage.prepare(data, self.runner.spec.preprocessing, self.options.max_pixels)
        except ImageError as exc:
            item.error = exc
        except Exception as exc:  # noqa: BLE001 - one odd file must not kill the pipeline
            log.exception("unexpected failure preparing %s", path)
            item.error = unexpected_error(exc)
        self._put_ready(item, started)

    def _put_ready(self, item: _Prepared, started: float) -> None:
        item.ready_at = time.perf_counter()
        self._ready.put(item)
        self._observe(lambda observer: observer.prepared(item.ready_at - started))

    def _observe(self, tell: Callable[[ServiceObserver], None]) -> None:
        """Tell the observer, if any; metrics never stop labeling, so its failure is only logged."""
        if self.options.observer is None:
            return
        try:
            tell(self.options.observer)
        except Exception:  # noqa: BLE001 - a metrics bug must not fail images or the service
            log.exception("the service's observer failed")

    def _inference_loop(self) -> None:
        try:
            self.runner.load()
            self._load_stage()
            if self.options.warm_up:
                self._warm_up()
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._load_error = exc
            self._loaded.set()
            self.stage.close()
            self.runner.close()
            return
        self._loaded.set()
        try:
            self._pipeline(max(1, self.runner.pipeline_depth))
        except BaseException as exc:  # noqa: BLE001 - a fault outside any one batch
            log.critical("the inference thread failed", exc_info=exc)
            self._give_up(f"inference thread failed: {type(exc).__name__}: {exc}")
            self._answer_the_rest()
        finally:
            self.stage.close()
            self.runner.close()

    def _load_stage(self) -> None:
        """Load the decode stage on this thread; under `--decode auto` one that cannot load here
        gives way to the CPU stage instead of failing the service."""
        try:
            self.stage.load()
        except Exception as exc:
            if not self.stage.optional:
                raise
            log.warning("decode auto: the %s stage cannot load (%s); decoding on the CPU", self.stage.name, exc)
            self.stage = CpuDecodeStage()

    def _decode_on_cpu(self, item: _Prepared, data: bytes) -> None:
        """An image the decode stage could not do, decoded by OpenCV on the pool (the reference
        path); it then joins a later batch, or gets its own error record."""
        try:
            item.crop = decode_and_crop(data, self.runner.spec.preprocessing, self.options.max_pixels)
        except ImageError as exc:
            item.error = exc
        except Exception as exc:  # noqa: BLE001 - as in _prepare
            log.exception("unexpected failure decoding %s on the CPU", item.path)
            item.error = unexpected_error(exc)
        item.ready_at = time.perf_counter()
        self._ready.put(item)

    def _warm_up(self) -> None:
        """Infer one blank crop: kernels get chosen now, and an engine that loads but cannot run
        fails start() instead of failing every batch of the first jobs."""
        shape = (1, self.runner.spec.input.height, self.runner.spec.input.width, 3)
        self.runner.infer(np.zeros(shape, np.uint8))

    def _pipeline(self, depth: int) -> None:
        """Gather, start, and finish batches, keeping up to `depth` started at once.

        With batches in flight the batcher does not wait for a first crop: an idle moment is spent
        finishing the oldest batch instead, so records never wait for images that are not coming."""
        started = self._started
        stopped = False
        while not stopped:
            first_wait = 0.0 if started else None
            items, stopped = collect_batch(
                self._ready, self.batch_size, self.options.max_wait_s, first_wait_s=first_wait
            )
            self._stop_taken = stopped
            self._holding = items
            batch = self._start_batch(items)
            if batch is not None:
                started.append(batch)
            self._holding = []
            while started and (stopped or batch is None or len(started) >= depth):
                self._finish_batch(started[0])
                started.popleft()

    def _answer_the_rest(self) -> None:
        """After a crash of the loop: every image still held gets a record, so no caller waits
        forever; those of the batch being gathered too, its bad images included (the crash may
        have come while their error records went out)."""
        reason = RuntimeError(self.failure)
        for item in self._holding:
            self._answer_failed(item, reason)
        while self._started:
            self._fail_batch(self._started.popleft().items, reason)
        while not self._stop_taken:
            item = self._ready.get()
            if item is STOP:
                return
            self._answer_failed(item, reason)

    def _answer_failed(self, item: _Prepared, reason: BaseException) -> None:
        """Its own error record for a bad image, an engine failure for a good one (once, as ever)."""
        if item.error is not None:
            self._emit_error(item)
        else:
            self._fail_batch([item], reason)

    def _emit_error(self, item: _Prepared) -> None:
        assert item.error is not None
        self._emit(item, error_record(item.path, str(item.error.code), item.error.message))

    def _start_batch(self, items: list[_Prepared]) -> _Started | None:
        """Emit the error records, start inference on the good crops (None: nothing to run)."""
        good = [item for item in items if item.crop is not None]
        for item in items:
            if item.error is not None:
                self._emit_error(item)
        if not good:
            return None
        if self.failure is not None:
            self._fail_batch(good, RuntimeError(self.failure))
            return None
        started = time.perf_counter()
        try:
            staging = None if self.stage.on_device else self.runner.staging(len(good))
            assembled = self.stage.assemble([item.crop for item in good], staging)
            if assembled.failed:
                good = self._fall_back(good, assembled.failed)
            if not good:
                return None
            features = any(item.features for item in good)
            if self.stage.on_device:
                pending = self.runner.submit_device(assembled.batch, features)
            else:
                pending = self.runner.submit(assembled.batch, features)
        except Exception as exc:  # noqa: BLE001 - the batch's images get error records instead
            self._fail_batch(good, exc)
            return None
        for item in good:
            item.crop = None  # the runner holds its own copy now
        return _Started(good, pending, started)

    def _fall_back(self, good: list[_Prepared], failed: list[int]) -> list[_Prepared]:
        """Send the images the stage could not decode back to the pool for OpenCV; the rest stay."""
        for index in failed:
            item = good[index]
            data, item.crop = item.crop.data, None
            self._pool.submit(self._decode_on_cpu, item, data)
        dropped = set(failed)
        return [item for index, item in enumerate(good) if index not in dropped]

    def _finish_batch(self, batch: _Started) -> None:
        """The batch's records, made whole before any goes out: whatever fails between the runner
        and the records (its outputs, or memory for them on a loaded machine) fails this batch's
        images, as a failed inference does, and the loop goes on to the next batch."""
        good = batch.items
        try:
            output = batch.pending.result()
            seconds = time.perf_counter() - batch.started
            records = self._records(good, output)
        except Exception as exc:  # noqa: BLE001 - the batch's images get error records instead
            self._fail_batch(good, exc)
            return
        self._failures_in_a_row = 0
        self.batch_stats.add(len(good))
        self._observe(lambda observer: observer.batch(len(good), seconds, [batch.started - i.ready_at for i in good]))
        for item, record in zip(good, records, strict=True):
            self._emit(item, record)

    def _records(self, good: list[_Prepared], output: InferenceOutput) -> list[dict[str, Any]]:
        """One label record per image of a finished batch (the runner checked the probabilities'
        shape; the features are checked here, where rows of them are taken)."""
        features = output.features
        if features is not None and len(features) != len(good):
            raise RunnerError(f"the runner returned {len(features)} feature rows for {len(good)} images")
        labels = top_k_labels(output.probabilities, self.runner.spec.classes, self.options.top_k)
        return [
            label_record(item.path, labels[row], features[row] if features is not None and item.features else None)
            for row, item in enumerate(good)
        ]

    def _fail_batch(self, good: list[_Prepared], exc: BaseException) -> None:
        message = f"service stopped: {self.failure}" if self.failure else str(exc)
        if self.failure is None:
            log.error("inference failed for a batch of %d: %s", len(good), exc, exc_info=exc)
            self._failures_in_a_row += 1
            limit = self.options.max_failed_batches
            if limit and self._failures_in_a_row >= limit:
                self._give_up(f"{self._failures_in_a_row} batches in a row failed, the last with: {exc}")
        for item in good:
            self._emit(item, error_record(item.path, str(ErrorCode.INFERENCE_FAILED), message))

    def _give_up(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            log.critical("labeling service gives up: %s", reason)

    def _emit(self, item: _Prepared, record: dict[str, Any]) -> None:
        if item.answered:
            return
        item.answered = True
        item.crop = None
        if item.source:
            record.update(item.source)
        try:
            item.callback(record)
        except Exception:  # noqa: BLE001 - a failing consumer must not stop other jobs
            log.exception("record callback failed for %s", item.path)
        finally:
            self._observe(lambda observer: observer.emitted(record))
            self._slots.release()
            with self._idle:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.notify_all()
