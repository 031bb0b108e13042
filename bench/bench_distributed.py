"""Distributed throughput (one worker, through Redis) against `labeler run` on the same images.

    python bench/bench_distributed.py [--model BUNDLE] [--images 300] [--chunk-size 50] [--rounds 2]

Same bundle, same batch size (32), same max wait (20 ms), decode and ONNX Runtime threads one per
core on both sides. Rounds alternate local and distributed so machine noise hits both.
- local: `labeler run DIR` as a subprocess; its own summary line gives images/s (from the loaded
  model to the last record written; the load is reported apart).
- warm in-process: the same pipeline (LabelingService + JSONL writer) with the model loaded before
  the clock starts: the strict baseline, since the distributed worker is warm too.
- distributed: a `labeler worker` subprocess on a private redis-server (password, AOF everysec),
  warmed up with one small run (model loaded); images/s from the first job published to the last
  record in Redis, so enqueue, queue latency and Redis writes all count.
Ratios distributed / each local figure; target >= 0.95 on this machine. The machine is shared, so
wall-clock rates swing with other people's load; CPU seconds per image (bench process for the warm
local run; worker + redis-server + enqueue for distributed) are printed too, as the steadier
measure of overhead: on a dedicated CPU-bound box, throughput follows it.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "tests" / "distributed")]
from common import bundle_or_default, machine_description, make_photo_set  # noqa: E402
from distributed_helpers import QUEUE, CeleryWorker, RedisServer, run_counts, wait_run_done, worker_env  # noqa: E402

from worker.client.enqueue import enqueue_paths  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def redis_cpu_s(client) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def local_rate(bundle: Path, folder: Path, out: Path, batch: int) -> tuple[float, float]:
    """`labeler run` as a subprocess: (its own images/s, None: CPU includes imports, not comparable)."""
    command = [sys.executable, "-m", "worker", "run", str(folder), "--model", str(bundle), "--out", str(out),
               "--no-progress", "--batch-size", str(batch), "--max-wait-ms", "20"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    match = re.search(r"([\d.]+) images/s", done.stderr)
    if not match:
        raise RuntimeError(f"no rate in labeler run output:\n{done.stderr}")
    return float(match.group(1)), float("nan")


def warm_local_rate(bundle: Path, paths: list[str], out: Path, batch: int) -> tuple[float, float]:
    """`labeler run`'s pipeline in this process, model loaded before the clock: (images/s, CPU s/image)."""
    from worker.local.results import JsonlWriter
    from worker.pipeline.service import LabelingService, ServiceOptions
    from worker.runners.onnxruntime_runner import OnnxRuntimeRunner

    options = ServiceOptions(max_batch_size=batch, max_wait_s=0.02)
    with LabelingService(OnnxRuntimeRunner(bundle), options) as service, JsonlWriter(out) as writer:
        for path in paths[: 2 * batch]:  # the same warm-up as the worker's: full batches once
            service.submit(path, lambda _record: None)
        service.drain()
        started, cpu = time.perf_counter(), time.process_time()
        for path in paths:
            service.submit(path, writer.write)
        service.drain()
        return len(paths) / (time.perf_counter() - started), (time.process_time() - cpu) / len(paths)


def distributed_rate(
    client, worker_pid: int, run: str, paths: list[str], chunk_size: int
) -> tuple[float, float]:
    """(images/s from first publish to last record, CPU s/image of worker + Redis + enqueue)."""
    started, worker_cpu, redis_cpu = time.perf_counter(), process_cpu_s(worker_pid), redis_cpu_s(client)
    own = time.process_time()
    enqueue_paths(client, run, paths, QUEUE, chunk_size)
    own = time.process_time() - own
    counts = wait_run_done(client, run, 3600, interval=0.05)  # polling costs Redis CPU too
    elapsed = time.perf_counter() - started
    worker_cpu = process_cpu_s(worker_pid) - worker_cpu
    redis_cpu = redis_cpu_s(client) - redis_cpu
    assert counts["done"] == len(paths) and counts["failed"] == 0, counts
    n = len(paths)
    print(f"  distributed CPU ms/img: worker {worker_cpu / n * 1000:.2f}, redis-server {redis_cpu / n * 1000:.2f}, "
          f"enqueue {own / n * 1000:.2f}")  # fmt: skip
    return n / elapsed, (worker_cpu + redis_cpu + own) / n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="bundle (default: the embedded default ResNet-50)")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--chunk-size", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.model = bundle_or_default(args.model)
    print(f"machine: {machine_description()}, load average {os.getloadavg()[0]:.1f}")
    print(f"model {args.model}, {args.images} images, chunk {args.chunk_size}, batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        paths = [str(p) for p in make_photo_set(folder, args.images)]
        server = RedisServer(Path(tmp)).start()
        env = worker_env(
            server.url, args.model, batch_size=args.batch_size, max_wait_ms=20, decode_threads=0,
            intra_op_threads=0, task_deadline_s=1800, deadline_grace_s=15, visibility_timeout_s=3600,
            restore_interval_s=10, restore_throttle=10, flush_records=256,
        )  # fmt: skip
        env.pop("OMP_NUM_THREADS", None)
        worker = CeleryWorker(
            "bench", env, Path(tmp), [sys.executable, "-m", "worker", "worker", "-n", "bench@%h"]
        )
        try:
            worker.start()
            client = server.client()
            # Warm-up: load the model and run full batches once (ONNX Runtime plans memory per shape).
            warmup = paths[: 2 * args.batch_size]
            enqueue_paths(client, "warmup", warmup, QUEUE, len(warmup))
            wait_run_done(client, "warmup", 600)
            ratios, warm_ratios, cpu_ratios = [], [], []
            for round_number in range(args.rounds):
                measure = {
                    "local": lambda: local_rate(
                        args.model, folder, Path(tmp) / "local.jsonl", args.batch_size
                    ),
                    "warm": lambda: warm_local_rate(
                        args.model, paths, Path(tmp) / "warm.jsonl", args.batch_size
                    ),
                    "remote": lambda r=round_number: distributed_rate(
                        client, worker.process.pid, f"bench-{r}", paths, args.chunk_size
                    ),
                }
                order = list(measure) if round_number % 2 == 0 else list(reversed(measure))
                results = {name: measure[name]() for name in order}  # alternate: no side always goes first
                (local, _), (warm, warm_cpu), (remote, remote_cpu) = (
                    results[k] for k in ("local", "warm", "remote")
                )
                ratios.append(remote / local)
                warm_ratios.append(remote / warm)
                cpu_ratios.append(warm_cpu / remote_cpu)
                print(
                    f"round {round_number + 1}: labeler run {local:6.1f} images/s | warm in-process {warm:6.1f} "
                    f"({warm_cpu * 1000:.1f} CPU ms/img) | distributed {remote:6.1f} ({remote_cpu * 1000:.1f} CPU "
                    f"ms/img) | ratios: vs run {remote / local:.3f}, vs warm {remote / warm:.3f}, "
                    f"CPU cost warm/distributed {warm_cpu / remote_cpu:.3f}"
                )
            print(
                f"medians: distributed/labeler run {statistics.median(ratios):.3f}; distributed/warm in-process "
                f"{statistics.median(warm_ratios):.3f}; CPU per image warm/distributed "
                f"{statistics.median(cpu_ratios):.3f} (target >= 0.95)"
            )
            assert run_counts(client, "bench-0")["total"] == args.images
        finally:
            worker.stop()
            server.stop()


if __name__ == "__main__":
    main()
