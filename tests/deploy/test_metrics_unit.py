"""WorkerMetrics as the service's observer in a real local labeling run, and the NVML collector:
degrading on this GPU-less machine for real, and reading GPUs through a fake pynvml."""

from __future__ import annotations

import sys
import types
from pathlib import Path

from prometheus_client import generate_latest

from worker.celery_worker.metrics import NvmlCollector, WorkerMetrics


def sample(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"hostname": metrics.hostname, **labels})


def test_observer_counts_a_real_local_run(tiny_bundle, photo_dir: Path, tmp_path: Path) -> None:
    from worker.pipeline.service import LabelingService, ServiceOptions
    from worker.runners import create_runner

    metrics = WorkerMetrics("local-test")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    paths = sorted(str(p) for p in photo_dir.glob("*.jpg"))[:6]
    paths += [str(tmp_path / "broken.jpg"), str(tmp_path / "absent.jpg")]
    records = []
    runner = create_runner(tiny_bundle, "onnxruntime", intra_op_threads=1)
    options = ServiceOptions(max_batch_size=4, decode_threads=1, observer=metrics)
    with LabelingService(runner, options) as service:
        for path in paths:
            service.submit(path, records.append)
        assert service.drain(120)
        batches = service.batches_run
    assert len(records) == 8
    assert sample(metrics, "labeler_images_labeled_total") == 6
    assert sample(metrics, "labeler_image_errors_total", code="decode_failed") == 1
    assert sample(metrics, "labeler_image_errors_total", code="not_found") == 1
    assert sample(metrics, "labeler_batch_size_count") == batches
    assert sample(metrics, "labeler_batch_size_sum") == 6
    assert sample(metrics, "labeler_decode_seconds_count") == 8
    assert sample(metrics, "labeler_queue_wait_seconds_count") == 6
    assert sample(metrics, "labeler_inference_seconds_sum") > 0


def test_nvml_without_a_driver_gives_no_gpu_samples() -> None:
    """Real pynvml (nvidia-ml-py) on a machine without the NVIDIA driver, or no pynvml at all."""
    metrics = WorkerMetrics("cpu-node")
    text = generate_latest(metrics.registry).decode()  # must not raise
    assert "labeler_gpu_" not in text
    assert "labeler_worker_up" in text


def _fake_pynvml(calls: list[str], fail: bool = False) -> types.ModuleType:
    fake = types.ModuleType("pynvml")
    memory = {0: (1_000, 80_000), 1: (2_000, 80_000), 3: (5_000, 40_000)}
    fake.nvmlInit = lambda: calls.append("init")
    fake.nvmlDeviceGetCount = lambda: 2
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetHandleByUUID = lambda uuid: 3

    def memory_info(handle: int) -> types.SimpleNamespace:
        if fail:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        used, total = memory[handle]
        return types.SimpleNamespace(used=used, total=total, free=total - used)

    fake.nvmlDeviceGetMemoryInfo = memory_info
    fake.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=10 * (handle + 1), memory=0)
    return fake


def _gauges(collector: NvmlCollector) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels["gpu"]): s.value for family in collector.collect() for s in family.samples}


def test_nvml_reads_the_visible_gpus_fake_pynvml(monkeypatch) -> None:
    """Fake pynvml (no NVIDIA driver here): CUDA_VISIBLE_DEVICES indices and UUIDs pick the GPUs."""
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(calls))
    gauges = _gauges(NvmlCollector("node", visible="1"))
    assert gauges == {
        ("labeler_gpu_memory_used_bytes", "1"): 2_000,
        ("labeler_gpu_memory_total_bytes", "1"): 80_000,
        ("labeler_gpu_utilization_ratio", "1"): 0.2,
    }
    assert set(_gauges(NvmlCollector("node", visible=""))) == {
        (name, gpu)
        for gpu in ("0", "1")
        for name in (
            "labeler_gpu_memory_used_bytes",
            "labeler_gpu_memory_total_bytes",
            "labeler_gpu_utilization_ratio",
        )
    }
    by_uuid = _gauges(NvmlCollector("node", visible="GPU-8f2e"))
    assert by_uuid[("labeler_gpu_memory_used_bytes", "GPU-8f2e")] == 5_000


def test_nvml_query_failure_keeps_the_scrape_alive_fake_pynvml(monkeypatch) -> None:
    """Fake pynvml whose queries fail (a lost GPU): the collector yields nothing instead of raising."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([], fail=True))
    assert _gauges(NvmlCollector("node", visible="0")) == {}


def test_metrics_endpoint_reports_a_taken_port() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert WorkerMetrics("busy").serve(port, addr="127.0.0.1") is False


def test_worker_lines_show_rate_and_last_record() -> None:
    from worker.ledger.activity import WorkerActivity, format_workers

    workers = [
        WorkerActivity("labeler-gpu0@node1", 1000, 3, 100.0, 110.0),
        WorkerActivity("labeler-gpu1@node1", 500, 0, 100.0, 200.0),
    ]
    lines = format_workers(workers, now=230.0)
    assert lines[0] == "  workers (2):"
    assert "labeler-gpu0@node1  1000 images  3 failed  100.0 images/s  last record 120 s ago" in lines[1]
    assert "5.0 images/s" in lines[2] and "last record 30 s ago" in lines[2]
    assert format_workers([]) == []
