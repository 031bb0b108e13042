"""Prometheus metrics of one worker process, fed by the labeling service's observer hook.

Names follow the celery-exporter convention (`<namespace>_<thing>_total` counters, a `hostname`
label, `*_up`), so dashboards and alerts written for celery-exporter read these alike. Celery's own
task and queue metrics come from celery-exporter itself (deploy/ runs it); these add what it cannot
see inside a job: images, error codes, batch sizes, decode and inference time, and the GPU.

GPU memory and utilization come from NVML (`pynvml`, from nvidia-ml-py), imported lazily: a CPU
worker, or a node without the driver, simply has no GPU samples.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.records import error_code

log = logging.getLogger(__name__)

NAMESPACE = "labeler"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 512)
DECODE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
INFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class WorkerMetrics:
    """The metrics of one worker process, in their own registry (tests build as many as they like).

    Implements worker.pipeline.service.ServiceObserver: hand it to `ServiceOptions(observer=...)`.
    """

    def __init__(self, hostname: str | None = None, registry: CollectorRegistry | None = None) -> None:
        self.hostname = hostname or default_hostname()
        self.registry = registry or CollectorRegistry()
        labels = ["hostname"]
        self.up = Gauge(
            f"{NAMESPACE}_worker_up", "1 while the worker process runs", labels, registry=self.registry
        )
        self.labeled = Counter(
            f"{NAMESPACE}_images_labeled", "Images that got labels", labels, registry=self.registry
        )
        self.errors = Counter(
            f"{NAMESPACE}_image_errors",
            "Images that got an error record, by stable error code",
            [*labels, "code"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            f"{NAMESPACE}_batch_size",
            "Images per engine batch",
            labels,
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.decode_seconds = Histogram(
            f"{NAMESPACE}_decode_seconds",
            "Read, decode and crop of one image (decode thread)",
            labels,
            buckets=DECODE_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            f"{NAMESPACE}_inference_seconds",
            "Time from starting a batch on the engine to its outputs (GPU pipelining: includes the batch ahead)",
            labels,
            buckets=INFER_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            f"{NAMESPACE}_queue_wait_seconds",
            "Time a decoded image waits for its batch to reach the engine",
            labels,
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(NvmlCollector(self.hostname))
        self.up.labels(self.hostname).set(1)
        # Pre-create the children so a scrape shows zeros before the first image, not nothing.
        self._labeled = self.labeled.labels(self.hostname)
        self._batch = self.batch_size.labels(self.hostname)
        self._decode = self.decode_seconds.labels(self.hostname)
        self._infer = self.inference_seconds.labels(self.hostname)
        self._wait = self.queue_wait_seconds.labels(self.hostname)

    # -- ServiceObserver ---------------------------------------------------------------------

    def prepared(self, seconds: float) -> None:
        self._decode.observe(seconds)

    def batch(self, size: int, seconds: float, waits: list[float]) -> None:
        self._batch.observe(size)
        self._infer.observe(seconds)
        for wait in waits:
            self._wait.observe(max(wait, 0.0))

    def emitted(self, record: dict[str, Any]) -> None:
        code = error_code(record)
        if code is None:
            self._labeled.inc()
        else:
            self.errors.labels(self.hostname, code).inc()

    # -- exposition --------------------------------------------------------------------------

    def serve(self, port: int, addr: str = "0.0.0.0") -> bool:
        """Expose /metrics on `port` from a daemon thread; False (logged) if the port is taken."""
        try:
            start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            log.warning("metrics endpoint not started on %s:%d: %s", addr, port, exc)
            return False
        log.warning("metrics on http://%s:%d/metrics", addr, port)
        return True


def default_hostname() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class NvmlCollector(Collector):
    """GPU memory and utilization of the GPUs this process may use, read at scrape time.

    Degrades to no samples when pynvml is not installed, the driver is absent, or a query fails;
    it never makes a scrape fail.
    """

    def __init__(self, hostname: str, visible: str | None = None) -> None:
        self.hostname = hostname
        self.visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
        self._nvml: Any = None
        self._unavailable = False

    def _load(self) -> Any:
        if self._nvml is None and not self._unavailable:
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, ...
                log.info("no GPU metrics (NVML unavailable: %s)", exc)
                self._unavailable = True
        return self._nvml

    def _handles(self, nvml: Any) -> list[tuple[str, Any]]:
        """(label, handle) per GPU: CUDA_VISIBLE_DEVICES indices or UUIDs, else every GPU."""
        wanted = [part.strip() for part in (self.visible or "").split(",") if part.strip()]
        if not wanted:
            return [(str(i), nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(nvml.nvmlDeviceGetCount())]
        handles = []
        for item in wanted:
            if item.isdigit():
                handles.append((item, nvml.nvmlDeviceGetHandleByIndex(int(item))))
            else:
                handles.append((item, nvml.nvmlDeviceGetHandleByUUID(item)))
        return handles

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self._load()
        if nvml is None:
            return
        labels = ["hostname", "gpu"]
        used = GaugeMetricFamily(
            f"{NAMESPACE}_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=labels
        )
        total = GaugeMetricFamily(
            f"{NAMESPACE}_gpu_memory_total_bytes", "GPU memory size (NVML)", labels=labels
        )
        util = GaugeMetricFamily(
            f"{NAMESPACE}_gpu_utilization_ratio", "Share of time a kernel ran, 0-1 (NVML)", labels=labels
        )
        try:
            for gpu, handle in self._handles(nvml):
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                used.add_metric([self.hostname, gpu], float(memory.used))
                total.add_metric([self.hostname, gpu], float(memory.total))
                util.add_metric([self.hostname, gpu], rates.gpu / 100.0)
        except Exception as exc:  # noqa: BLE001 - a failed GPU query must not fail the scrape
            log.warning("NVML query failed: %s", exc)
            return
        yield from (used, total, util)
