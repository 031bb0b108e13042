"""What watching a run costs: the metrics observer in the labeling service, and the per-worker
activity written to Redis with each flush of records.

    python bench/bench_metrics.py [--images 400] [--repeats 3] [--flushes 300]

1. The observer's calls alone, per image (a micro-benchmark: the service numbers below are noisy
   on a shared machine, and this is the cost they would hide). Then `LabelingService` on the tiny bundle (ResNet-50 at 1/8 width, so the engine is cheap and any
   observer cost shows) over `--images` ImageNet-size JPEGs, one decode thread, one ONNX Runtime
   thread: no observer (the baseline, measured in the same run, runs interleaved) against
   `WorkerMetrics` as the observer. Median images/s of `--repeats` runs each.
2. On a private redis-server (password, AOF everysec, as deploy configures it): `--flushes`
   groups of 256 top-5 records written as shard files with `write_shard` alone (the baseline: what
   a worker does with its records) against `write_shard` + `activity.note_records` (the per-worker
   activity a worker adds per `LABELER_FLUSH_RECORDS` records).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "tests" / "distributed")]
from common import machine_description, make_photo_set  # noqa: E402
from distributed_helpers import RedisServer  # noqa: E402

from worker.celery_worker.metrics import WorkerMetrics  # noqa: E402
from worker.dataset.files import DatasetSpec, write_shard  # noqa: E402
from worker.ledger import activity as activity_store  # noqa: E402


def label_all(bundle: Path, paths: list[str], observer: WorkerMetrics | None) -> float:
    from worker.pipeline.service import LabelingService, ServiceOptions
    from worker.runners import create_runner

    runner = create_runner(bundle, "onnxruntime", intra_op_threads=1)
    options = ServiceOptions(max_batch_size=32, decode_threads=1, observer=observer)
    with LabelingService(runner, options) as service:
        started = time.perf_counter()
        for path in paths:
            service.submit(path, lambda _record: None)
        service.drain()
        return len(paths) / (time.perf_counter() - started)


def service_overhead(folder: Path, images: int, repeats: int) -> None:
    from engine_build.build import build_from_weights
    from engine_build.weights import random_weights

    bundle = folder / "tiny"
    build_from_weights(random_weights(10, seed=1, base_width=8), bundle)
    paths = [str(p) for p in make_photo_set(folder / "photos", images)]
    label_all(bundle, paths[:64], None)  # warm up the page cache and the runtime
    plain, observed = [], []
    for _ in range(repeats):
        plain.append(label_all(bundle, paths, None))
        observed.append(label_all(bundle, paths, WorkerMetrics("bench")))
    base, with_metrics = statistics.median(plain), statistics.median(observed)
    print(
        f"service, no observer (baseline): {base:8.1f} images/s  (runs: {', '.join(f'{r:.0f}' for r in plain)})"
    )
    print(
        f"service, WorkerMetrics observer: {with_metrics:8.1f} images/s  "
        f"(runs: {', '.join(f'{r:.0f}' for r in observed)})  ratio {with_metrics / base:.3f}"
    )


def observer_calls(images: int = 200_000, batch: int = 32) -> None:
    """The observer's own cost per image, without the noise of decoding and inference."""
    metrics = WorkerMetrics("bench")
    labeled = {"path": "x", "labels": []}
    waits = [0.001] * batch
    started = time.perf_counter()
    for i in range(images):
        metrics.prepared(0.004)
        metrics.emitted(labeled)
        if i % batch == 0:
            metrics.batch(batch, 0.01, waits)
    per_image = (time.perf_counter() - started) / images * 1e6
    print(f"observer calls alone: {per_image:.2f} us per image (prepared + emitted + 1/{batch} batch)")


def records(flush: int, size: int = 256) -> list[dict]:
    labels = [{"index": i, "label": f"class {i}", "score": 0.1} for i in range(5)]
    return [{"path": f"/data/images/{flush:06d}/{i:04d}.jpg", "labels": labels} for i in range(size)]


def flush_overhead(folder: Path, flushes: int) -> None:
    server = RedisServer(folder).start()
    try:
        client = server.client()
        spec = DatasetSpec(model_sha256="0" * 64, precision="fp32")
        batches = [records(i) for i in range(flushes)]
        timings: dict[str, float] = {}
        for mode in ("baseline", "activity", "baseline", "activity"):
            client.flushall()
            started = time.perf_counter()
            for number, batch in enumerate(batches):
                write_shard(folder / "dataset", f"{number:06d}", batch, spec, worker="bench@host")
                if mode == "activity":
                    activity_store.note_records(client, "labeler", "bench", "bench@host", batch)
            timings[mode] = time.perf_counter() - started  # second pass of each mode kept (warm)
        per_image = {mode: seconds / (flushes * 256) * 1e6 for mode, seconds in timings.items()}
        print(f"256 records, write_shard only (baseline): {per_image['baseline']:.2f} us/record")
        print(
            f"256 records, + note_records:              {per_image['activity']:.2f} us/record  "
            f"ratio {timings['activity'] / timings['baseline']:.3f}"
        )
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flushes", type=int, default=300)
    args = parser.parse_args()
    print(f"machine: {machine_description()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "redis").mkdir()
        flush_overhead(folder / "redis", args.flushes)
        observer_calls()
        service_overhead(folder, args.images, args.repeats)


if __name__ == "__main__":
    main()
