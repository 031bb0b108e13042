"""Distributed throughput (one worker, through Redis, writing the Parquet dataset) against `labeler run`.

    python bench/bench_distributed.py [--model BUNDLE] [--images 300] [--shard-size 50] [--rounds 2]

Same bundle, same batch size (32), same max wait (20 ms), decode and ONNX Runtime threads one per
core on both sides. Rounds alternate local and distributed so machine noise hits both.
- local: `labeler run DIR` as a subprocess; its own summary line gives images/s (from the loaded
  model to the last record written; the load is reported apart). It writes JSONL (its Parquet
  `--out DIR/` layout is not in this checkout yet).
- warm in-process: the same pipeline (LabelingService + JSONL writer) with the model loaded before
  the clock starts: the strict baseline, since the distributed worker is warm too.
- distributed: a `labeler worker` subprocess on a private redis-server (password, AOF everysec),
  default lease settings, warmed up with one small run (model loaded); the run is enqueued with
  `enqueue_run` in shards of `--shard-size` (its path lists written to the run's output folder);
  images/s from the enqueue's start to the last shard marked done in the ledger, so the shard
  list, queue latency, each shard's Parquet file (written and fsynced) and the ledger all count.
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
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # this checkout, not an installed copy
from common import (  # noqa: E402
    LabelerWorker,
    RedisServer,
    bundle_or_default,
    machine_description,
    machine_load,
    make_photo_set,
    wait_for,
    worker_env,
)

from worker.client.enqueue import enqueue_run  # noqa: E402
from worker.dataset.files import iter_records  # noqa: E402
from worker.ledger.ledger import RunLedger  # noqa: E402

QUEUE = "labeler"

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


def run_done(client, run: str, timeout: float, interval: float):
    ledger = RunLedger(client)
    return wait_for(
        lambda: (s := ledger.status(run, QUEUE)).finished() and s, timeout, f"run {run}", interval
    )


def distributed_rate(
    client, worker_pid: int, run: str, paths: list[str], output: Path, shard_size: int
) -> tuple[float, float]:
    """(images/s from the enqueue's start to the last shard done, CPU s/image of worker + Redis + enqueue)."""
    started, worker_cpu, redis_cpu = time.perf_counter(), process_cpu_s(worker_pid), redis_cpu_s(client)
    own = time.process_time()
    enqueue_run(client, run, paths, str(output), QUEUE, shard_size)
    own = time.process_time() - own
    status = run_done(client, run, 3600, interval=0.05)  # polling costs Redis CPU too
    elapsed = time.perf_counter() - started
    worker_cpu = process_cpu_s(worker_pid) - worker_cpu
    redis_cpu = redis_cpu_s(client) - redis_cpu
    assert status.done == len(paths) and status.failed == 0, status
    rows = sum(1 for _ in iter_records(output))
    assert rows == len(paths), rows
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
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    args.model = bundle_or_default(args.model)
    print(f"machine: {machine_description()}, {machine_load()}")
    print(f"model {args.model}, {args.images} images, shards of {args.shard_size}, batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        paths = [str(p) for p in make_photo_set(folder, args.images)]
        server = RedisServer(Path(tmp)).start()
        runs = Path(tmp) / "runs"
        env = worker_env(server.url, args.model, runs, batch_size=args.batch_size, max_wait_ms=20)
        worker = LabelerWorker("bench", env, Path(tmp))
        try:
            worker.start()
            client = server.client()
            # Warm-up: load the model and run full batches once (ONNX Runtime plans memory per shape).
            warmup = paths[: 2 * args.batch_size]
            enqueue_run(client, "warmup", warmup, str(runs / "warmup"), QUEUE, len(warmup))
            run_done(client, "warmup", 600, 0.25)
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
                        client, worker.process.pid, f"bench-{r}", paths, runs / f"bench-{r}", args.shard_size
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
            print(f"after: {machine_load()}")
        finally:
            worker.stop()
            server.stop()


if __name__ == "__main__":
    main()
