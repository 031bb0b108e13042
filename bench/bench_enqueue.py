"""Enqueue rate for a million paths (no workers) against raw pipelined redis-py, and Redis memory.

    python bench/bench_enqueue.py [--paths 1000000] [--chunk-size 500] [--skip-cli]

On a private redis-server (password, AOF everysec, as deploy configures it; its data directory
is under the system temp dir):
1. Baseline: raw redis-py, one LPUSH per path, pipelined 10,000 commands per round trip.
2. `enqueue_paths`: resume check and claim of every path (Lua, per 1,000), protocol v2 job
   messages of `--chunk-size` paths, one LPUSH per 20,000 paths. Ratio against the baseline.
3. The same through the CLI (`labeler enqueue @list`), a subprocess, reading a list file.
4. Redis memory per queued image (queue + run hash), and per finished record (top-5 labels).
5. `enqueue_paths` again on a server with AOF off: the part of the time that is the disk.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "tests" / "distributed")]
from common import machine_description  # noqa: E402
from distributed_helpers import RedisServer  # noqa: E402

from worker.client.enqueue import enqueue_paths  # noqa: E402
from worker.runs.store import RunStore  # noqa: E402


def used_memory(client) -> int:
    return int(client.info("memory")["used_memory"])


def raw_pipelined_lpush(client, paths: list[str], batch: int = 10000) -> float:
    started = time.perf_counter()
    for start in range(0, len(paths), batch):
        pipe = client.pipeline(transaction=False)
        for path in paths[start : start + batch]:
            pipe.lpush("raw-baseline", path)
        pipe.execute()
    return time.perf_counter() - started


class RedisServerNoAof(RedisServer):
    """The same server with persistence off: what enqueueing costs Redis itself, without the disk."""

    def server_args(self) -> list[str]:
        args = super().server_args()
        args[args.index("--appendonly") + 1] = "no"
        return args


def enqueue_without_aof(paths: list[str], chunk_size: int, folder: Path) -> float:
    server = RedisServerNoAof(folder).start()
    try:
        started = time.perf_counter()
        enqueue_paths(server.client(), "bench", paths, "labeler", chunk_size, max_queued_jobs=10**9)
        return time.perf_counter() - started
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--paths", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=500)
    parser.add_argument("--skip-cli", action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine_description()}")
    paths = [f"/data/images/{i // 1000:05d}/img_{i:08d}.jpg" for i in range(args.paths)]
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        try:
            client = server.client()
            print(f"redis-server {client.info('server')['redis_version']}, {args.paths} paths")
            baseline = raw_pipelined_lpush(client, paths)
            print(f"raw pipelined LPUSH per path:   {baseline:6.2f} s  {args.paths / baseline:10.0f} paths/s")
            client.flushall()

            before = used_memory(client)
            started = time.perf_counter()
            summary = enqueue_paths(client, "bench", paths, "labeler", args.chunk_size, max_queued_jobs=10**9)
            elapsed = time.perf_counter() - started
            after = used_memory(client)
            assert summary.queued == args.paths, summary
            print(
                f"enqueue_paths (chunk {args.chunk_size}):    {elapsed:6.2f} s  {args.paths / elapsed:10.0f} paths/s"
                f"  ({summary.jobs} jobs; {elapsed / baseline:.2f}x the baseline's time)"
            )
            store = RunStore(client)
            queue_bytes = int(client.memory_usage("labeler") or 0)
            hash_bytes = int(client.memory_usage(store.keys("bench").records) or 0)
            print(
                f"Redis memory per queued image: {(after - before) / args.paths:.0f} B "
                f"(queue {queue_bytes / args.paths:.0f} B, run hash {hash_bytes / args.paths:.0f} B)"
            )

            again = time.perf_counter()
            resumed = enqueue_paths(client, "bench", paths[:100000], "labeler-resume", args.chunk_size, 10**9)
            print(
                f"re-enqueue 100k already-queued paths: {time.perf_counter() - again:.2f} s "
                f"({resumed.queued} republished: no record yet)"
            )

            client.flushall()
            before = used_memory(client)
            records = [
                {
                    "path": p,
                    "labels": [
                        {"index": i, "label": f"n0144{i:04d} label {i}", "score": 0.123456} for i in range(5)
                    ],
                }  # fmt: skip
                for p in paths[:20000]
            ]
            for start in range(0, len(records), 256):
                store.write_records("mem", records[start : start + 256])
            print(
                f"Redis memory per finished top-5 record: {(used_memory(client) - before) / len(records):.0f} B"
            )

            if not args.skip_cli:
                client.flushall()
                list_file = Path(tmp) / "paths.txt"
                list_file.write_text("\n".join(paths) + "\n")
                env = dict(os.environ, LABELER_BROKER_URL=server.url)
                started = time.perf_counter()
                done = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "worker",
                        "enqueue",
                        f"@{list_file}",
                        "--run",
                        "cli",
                        "--no-progress",
                        "--max-queued",
                        str(10**9),
                    ],  # fmt: skip
                    cwd=REPO,
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                wall = time.perf_counter() - started
                print(
                    f"labeler enqueue @list (subprocess, wall): {wall:6.2f} s  {args.paths / wall:10.0f} paths/s"
                )
                print("  " + done.stderr.strip().splitlines()[-1])
        finally:
            server.stop()
        no_aof_dir = Path(tmp) / "no-aof"
        no_aof_dir.mkdir()
        elapsed = enqueue_without_aof(paths, args.chunk_size, no_aof_dir)
        print(f"enqueue_paths, AOF off:         {elapsed:6.2f} s  {args.paths / elapsed:10.0f} paths/s")


if __name__ == "__main__":
    main()
