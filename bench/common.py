"""Shared benchmark helpers: an ImageNet-like image set made from real photos, and machine facts."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import cv2
import numpy as np


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description() -> str:
    cpu = cpu_name()
    import onnxruntime

    return (
        f"{cpu}, {os.cpu_count()} cores visible, Python {platform.python_version()}, "
        f"OpenCV {cv2.__version__}, ONNX Runtime {onnxruntime.__version__}"
    )


def make_photo_set(folder: Path, count: int, seed: int = 0, large_every: int = 0) -> list[Path]:
    """`count` JPEGs cut from scikit-image's photographs at ImageNet-typical sizes (about 500x375),
    every `large_every`-th one 4x larger (a phone photo), quality 90."""
    import skimage.data as data

    sources = [
        data.astronaut(),
        data.chelsea(),
        data.coffee(),
        data.rocket(),
        data.hubble_deep_field(),
        data.retina(),
        data.stereo_motorcycle()[0],
    ]
    sources = [cv2.resize(np.ascontiguousarray(s[..., :3][..., ::-1]), None, fx=2, fy=2) for s in sources]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        source = sources[index % len(sources)]
        h, w = source.shape[:2]
        cw, ch = (500, 375) if index % 3 else (375, 500)
        y, x = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
        image = source[y : y + ch, x : x + cw]
        if large_every and index % large_every == 0:
            image = cv2.resize(image, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
        path = folder / f"photo{index:05d}.jpg"
        cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def bundle_or_default(model: Path | None) -> Path:
    """The bundle a benchmark was given, else the embedded default (built once, as `labeler run` does)."""
    if model is not None:
        return model
    from engine_build.default_bundle import ensure_default_bundle

    return ensure_default_bundle()


# -- Redis and worker processes for the distributed benchmarks (bench_enqueue, bench_recovery,
# bench_distributed): a private password-protected redis-server with AOF everysec, as deploy
# configures it, and real `python -m worker worker` subprocesses configured by LABELER_* only.

REPO = Path(__file__).resolve().parents[1]
REDIS_PASSWORD = "bench-secret-5c1d"


def machine_load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class RedisServer:
    """A private redis-server on a free port (password; AOF everysec unless `aof=False`)."""

    def __init__(self, data_dir: Path, aof: bool = True) -> None:
        self.data_dir = data_dir
        self.aof = aof
        self.port = free_port()
        self.process = None

    @property
    def url(self) -> str:
        return f"redis://:{REDIS_PASSWORD}@127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def start(self) -> RedisServer:
        import subprocess

        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", REDIS_PASSWORD,
                "--dir", str(self.data_dir), "--appendonly", "yes" if self.aof else "no",
                "--appendfsync", "everysec", "--save", "", "--maxmemory-policy", "noeviction"]  # fmt: skip
        log = open(self.data_dir / "redis.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._ready, 15, "redis-server")
        return self

    def _ready(self) -> bool:
        import redis

        try:
            return bool(self.client().ping())
        except (redis.exceptions.BusyLoadingError, redis.exceptions.ConnectionError):
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.data_dir / 'redis.log'}") from None
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)
        self.process = None


def worker_env(url: str, bundle: Path, output_root: Path, **overrides: object) -> dict[str, str]:
    """A worker's environment: the production defaults (leases, heartbeat, sweep, visibility
    timeout) except `overrides`; datasets may be written under `output_root`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LABELER_")}
    values: dict[str, object] = {"broker_url": url, "model": str(bundle), "output_roots": output_root}
    values.update(overrides)
    env.update({f"LABELER_{key.upper()}": str(value) for key, value in values.items()})
    env["PYTHONPATH"] = str(REPO)
    return env


class LabelerWorker:
    """One `python -m worker worker` subprocess in its own process group; its log in `log_dir`."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.process = None

    def start(self, ready_timeout: float = 120) -> LabelerWorker:
        import subprocess
        import sys

        argv = [sys.executable, "-m", "worker", "worker", "-n", f"{self.name}@%h", "-l", "INFO"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip
        wait_for(self._ready, ready_timeout, f"worker {self.name} to be ready", interval=0.2)
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited early:\n{self.log()[-3000:]}")
        return " ready." in self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group: no warm shutdown, no acks, no lease released."""
        import signal

        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(15)

    def stop(self) -> None:
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()


def tiny_bundle(folder: Path) -> Path:
    """The tests' tiny ResNet-50 (every width / 8, 10 classes, random weights), built once into `folder`."""
    out = folder / "tiny"
    if not (out / "model.json").exists() and not any(out.glob("*.onnx")):
        from engine_build.build import build_from_weights
        from engine_build.weights import random_weights

        build_from_weights(random_weights(10, seed=1, base_width=8), out)
    return out


def print_medians(rounds: list[dict[str, float]]) -> None:
    """Each figure's median and range over the rounds."""
    import statistics

    for key in rounds[0]:
        values = [r[key] for r in rounds]
        print(f"  {key}: median {statistics.median(values):.3f} (range {min(values):.3f}-{max(values):.3f})")
