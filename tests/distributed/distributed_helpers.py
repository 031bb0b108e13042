"""Helpers for the distributed tests: a private password-protected redis-server and real
`celery worker` subprocesses.

The redis-server runs on a free port with AOF persistence (as deploy configures it) and is
restartable on the same port and data directory. Workers are started the way operators start
them (`python -m worker worker ...`, or `celery -A worker.app worker`), configured only through
LABELER_* environment variables, with short visibility timeouts so redelivery tests stay fast.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PASSWORD = "test-secret-7f3a"
QUEUE = "labeler-test"
OUTPUT_ROOT = Path("/nonexistent")  # where runs write their datasets: a private folder per session (conftest)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    """Poll until `condition()` is truthy; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class RedisServer:
    """A private redis-server requiring a password, with AOF on, restartable in place."""

    def __init__(self, data_dir: Path, aof: bool = True) -> None:
        self.data_dir = data_dir
        self.aof = aof  # off only for benchmarks that measure what the disk costs
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def server_args(self) -> list[str]:
        return [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--requirepass", PASSWORD, "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.aof else "no", "--appendfsync", "everysec", "--save", "",
            "--maxmemory-policy", "noeviction", "--protected-mode", "yes",
        ]  # fmt: skip

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = self.server_args()
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._ready, 15, "redis-server to accept connections")
        return self

    def _ready(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.exceptions.BusyLoadingError:
            return False
        except redis.exceptions.ConnectionError:
            if self.process and self.process.poll() is not None:
                raise AssertionError("redis-server exited; see redis.log") from None
            return False

    def stop(self) -> None:
        """Clean shutdown (SIGTERM): Redis flushes the AOF before it exits."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)
        self.process = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


class CeleryWorker:
    """One real worker subprocess; its log is kept for assertions and failure messages."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, argv: list[str] | None = None) -> None:
        self.name = name
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.argv = argv or [sys.executable, "-m", "worker", "worker", "-n", f"{name}@%h", "-l", "INFO"]
        self.process: subprocess.Popen | None = None

    def start(self, ready_timeout: float = 60) -> CeleryWorker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._ready, ready_timeout, f"worker {self.name} to be ready", interval=0.2)
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"worker {self.name} exited early:\n{self.log()[-3000:]}")
        return " ready." in self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: no warm shutdown, no acks, no cleanup."""
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(15)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM: Celery's warm shutdown. Returns the exit status."""
        if not self.alive():
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        try:
            self.terminate(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()


def worker_env(url: str, bundle: Path, **overrides: object) -> dict[str, str]:
    """Environment for a test worker: short leases and redelivery times, one core's worth of
    threads, datasets written anywhere under this pytest session's temporary folder."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LABELER_")}
    values: dict[str, object] = {
        "broker_url": url,
        "queue": QUEUE,
        "model": str(bundle),
        "task_deadline_s": 8,
        "deadline_grace_s": 2,
        "visibility_timeout_s": 12,
        "restore_interval_s": 1,
        "restore_throttle": 1,
        "max_attempts": 10,
        "lease_s": 4,
        "heartbeat_s": 1,
        "sweep_interval_s": 0.5,
        "output_roots": OUTPUT_ROOT,
        "concurrency": 4,
        "batch_size": 16,
        "max_wait_ms": 10,
        "decode_threads": 1,
        "intra_op_threads": 1,
        "redis_retry_s": 60,
        "flush_records": 64,
    }
    values.update(overrides)
    env.update({f"LABELER_{key.upper()}": str(value) for key, value in values.items()})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE)])
    env["OMP_NUM_THREADS"] = "1"
    return env


def small_crops(photos: dict, count: int, seed: int) -> Iterator:
    """`count` distinct 64x64 crops (BGR, for OpenCV) of the test photographs, at random places."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sources = list(photos.values())
    for i in range(count):
        photo = sources[i % len(sources)]
        y, x = int(rng.integers(0, photo.shape[0] - 64)), int(rng.integers(0, photo.shape[1] - 64))
        yield np.ascontiguousarray(photo[y : y + 64, x : x + 64, ::-1])


def run_counts(client: redis.Redis, run: str) -> dict[str, int]:
    """The run's totals as the ledger keeps them."""
    meta = {k.decode(): v.decode() for k, v in client.hgetall(f"labeler:run:{run}:meta").items()}
    return {key: int(meta.get(key, 0)) for key in ("images", "done", "failed", "shards", "shards_done")}


def wait_run_done(client: redis.Redis, run: str, timeout: float, interval: float = 0.25) -> dict[str, int]:
    def finished() -> dict[str, int] | None:
        counts = run_counts(client, run)
        done = counts["images"] and counts["done"] >= counts["images"] and counts["shards_done"] >= counts["shards"]
        return counts if done else None

    return wait_for(finished, timeout, f"run {run} to finish", interval=interval)  # type: ignore[return-value]


def enqueue(client: redis.Redis, run: str, paths: list[str], shard_size: int, **options: object):
    """Enqueue `paths` as run `run` into OUTPUT_ROOT/runs/<run>; returns the summary."""
    from worker.client.enqueue import enqueue_run

    return enqueue_run(client, run, paths, str(run_output(run)), QUEUE, shard_size, options=dict(options))


def run_output(run: str) -> Path:
    return OUTPUT_ROOT / "runs" / run


def dataset_records(run: str, output: str | Path | None = None) -> list[dict]:
    """The rows of a run's dataset: in OUTPUT_ROOT/runs/<run>, or in `output` (a folder or URL)."""
    from worker.dataset.files import iter_records

    return list(iter_records(output or run_output(run)))


def assert_exactly_once(client: redis.Redis, run: str, paths: list[str], output: str | Path | None = None) -> dict[str, dict]:
    """Every path has exactly one row in the run's dataset, and the ledger's counts agree."""
    rows = dataset_records(run, output)
    records = {row["path"]: row for row in rows}
    assert len(rows) == len(records), "a path has more than one row"
    assert sorted(records) == sorted(set(paths))
    counts = run_counts(client, run)
    assert counts["images"] == counts["done"] == len(set(paths))
    assert counts["failed"] == sum(1 for r in rows if "error" in r)
    assert counts["shards"] == counts["shards_done"]
    return records
