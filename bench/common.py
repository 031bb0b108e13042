"""Shared benchmark helpers: an ImageNet-like image set made from real photos, and machine facts."""

from __future__ import annotations

import os
import platform
import resource
import sys
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
# The private redis-server and worker subprocesses are the distributed tests' own helpers.
sys.path.insert(0, str(REPO / "tests" / "distributed"))
from distributed_helpers import CeleryWorker, RedisServer, free_port, wait_for  # noqa: E402

__all__ = ["LabelerWorker", "RedisServer", "free_port", "wait_for"]  # re-exported for the benches


def process_cpu(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (all threads), or of `pid` from /proc."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def worker_env(url: str, bundle: Path, output_root: Path, **overrides: object) -> dict[str, str]:
    """A worker's environment: the production defaults (leases, heartbeat, sweep, visibility
    timeout) except `overrides`; datasets may be written under `output_root`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("LABELER_")}
    values: dict[str, object] = {"broker_url": url, "model": str(bundle), "output_roots": output_root}
    values.update(overrides)
    env.update({f"LABELER_{key.upper()}": str(value) for key, value in values.items()})
    env["PYTHONPATH"] = str(REPO)
    return env


class LabelerWorker(CeleryWorker):
    """One `python -m worker worker` subprocess (the tests' CeleryWorker), ready within two minutes."""

    def start(self, ready_timeout: float = 120) -> LabelerWorker:
        super().start(ready_timeout)
        return self


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
