"""The labeling service against a simulated GPU: does its pipelining keep a device busy?

    .venv/bin/python bench/bench_pipeline_sim.py [--images 1200] [--batch 64] [--device-share 0.7]

No GPU here, so the device is simulated: a runner whose submit() queues a batch on one virtual
device that takes a fixed time per image, and whose result() sleeps until that batch is done
(like waiting on a CUDA event; the host thread is free meanwhile). Everything else is the real
service on real JPEG files: decode threads, batcher, staging into slot buffers, top-k, records.
The device is set to `--device-share` of the measured decode rate, so it is the bottleneck, and
the service runs with one batch in flight (as before session 2) and with two. The ratio
end-to-end / min(device, decode) is the issue's GPU-check figure with the real engine swapped
for a clock: it measures the service's scheduling, not any GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import machine_description, make_photo_set  # noqa: E402

from worker.machine import usable_cores  # noqa: E402
from worker.pipeline.preprocess import decode_and_crop  # noqa: E402
from worker.pipeline.service import LabelingService, ServiceOptions  # noqa: E402
from worker.runners.base import InferenceOutput, Runner  # noqa: E402
from worker.sidecar import ModelInput, ModelSpec, Preprocessing  # noqa: E402


@dataclass
class _SimulatedBatch:
    done_at: float
    probabilities: np.ndarray

    def result(self) -> InferenceOutput:
        delay = self.done_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return InferenceOutput(self.probabilities)


class SimulatedDeviceRunner(Runner):
    """One virtual device, busy `seconds_per_image` per image, batches in submission order."""

    name = "simulated-device"

    def __init__(self, bundle_dir: Path, seconds_per_image: float, depth: int, max_batch: int) -> None:
        super().__init__(bundle_dir)
        self.seconds_per_image = seconds_per_image
        self.depth = depth
        shape = (max_batch, self.spec.input.height, self.spec.input.width, 3)
        self._buffers = [np.empty(shape, np.uint8) for _ in range(depth)]  # the slots' pinned inputs
        self._next = 0
        self._free_at = 0.0

    @property
    def pipeline_depth(self) -> int:
        return self.depth

    def staging(self, count: int) -> np.ndarray | None:
        return self._buffers[self._next][:count]

    def _load(self) -> None:
        self._uniform = np.full((1, self.spec.num_classes), 1.0 / self.spec.num_classes, np.float32)

    def _submit(self, crops: np.ndarray, want_features: bool) -> _SimulatedBatch:
        self._next = (self._next + 1) % self.depth
        start = max(time.perf_counter(), self._free_at)
        self._free_at = start + self.seconds_per_image * len(crops)
        return _SimulatedBatch(self._free_at, np.repeat(self._uniform, len(crops), axis=0))

    def _infer(self, crops: np.ndarray, want_features: bool) -> InferenceOutput:
        return self._submit(crops, want_features).result()


def decode_rate(paths: list[Path], prep: Preprocessing, threads: int) -> float:
    def one(path: Path) -> np.ndarray:
        return decode_and_crop(path.read_bytes(), prep)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, paths[: threads * 8]))  # warm-up (page cache, OpenCV)
        started = time.perf_counter()
        list(pool.map(one, paths))
        return len(paths) / (time.perf_counter() - started)


def end_to_end(bundle: Path, paths: list[Path], batch: int, seconds_per_image: float, depth: int) -> float:
    runner = SimulatedDeviceRunner(bundle, seconds_per_image, depth, batch)
    options = ServiceOptions(max_batch_size=batch, max_wait_s=0.005, warm_up=False)
    records = []
    with LabelingService(runner, options) as service:
        started = time.perf_counter()
        for path in paths:
            service.submit(str(path), records.append)
        service.drain()
        elapsed = time.perf_counter() - started
    assert len(records) == len(paths) and all("labels" in r for r in records)
    return len(paths) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device-share", type=float, default=0.7, help="Device rate / decode rate.")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {machine_description()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = make_photo_set(work / "images", args.images)
        bundle = work / "bundle"
        bundle.mkdir()
        prep = Preprocessing()  # torchvision's 256 -> 224 center crop
        classes = tuple(f"class_{i}" for i in range(1000))
        ModelSpec(prep, classes, input=ModelInput(height=224, width=224)).save(bundle)
        decode = max(decode_rate(paths, prep, usable_cores()) for _ in range(args.rounds))
        device = args.device_share * decode
        print(f"images: {len(paths)} JPEGs ~500x375 -> 224x224 crops; batch {args.batch}; "
              f"{usable_cores()} decode threads")  # fmt: skip
        print(f"decode only: {decode:.0f} images/s; simulated device: {device:.0f} images/s")
        for depth in (1, 2):
            rate = max(end_to_end(bundle, paths, args.batch, 1.0 / device, depth) for _ in range(args.rounds))
            ratio = rate / min(device, decode)
            print(f"end to end, {depth} batch(es) in flight: {rate:.0f} images/s, "
                  f"ratio to min(device, decode) {ratio:.2f} (target >= 0.9)")  # fmt: skip


if __name__ == "__main__":
    main()
