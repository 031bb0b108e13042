"""Host work per batch on the inference thread: stacking crops into a new array and copying it into
the runner's (pinned) input buffer, against stacking straight into that buffer (Runner.staging).

    .venv/bin/python bench/bench_batch_staging.py [--repeats 30]

The inference thread is the one serial part of the pipeline: at 10,000 images/s a batch of 256
has 25 ms for stacking, copy-in, top-k and records. The two paths are the numpy operations the
service and the GPU runners perform (np.stack into `runner.staging()`; before it, np.stack into a
new array, then `host[...] = crops` into the slot), here into plain memory where a GPU runner's
slot buffer is pinned; the engine itself is not involved.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import machine_description  # noqa: E402


def timed(action, repeats: int) -> float:
    """Median seconds of `action` over `repeats` runs, after one warm-up."""
    action()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def stack_then_copy(crops: list[np.ndarray], slot_buffer: np.ndarray) -> None:
    stacked = np.stack(crops)  # before: a fresh array per batch ...
    slot_buffer[...] = stacked  # ... copied into the slot by submit()


def stack_into_staging(crops: list[np.ndarray], slot_buffer: np.ndarray) -> None:
    np.stack(crops, out=slot_buffer)  # now: submit() finds the batch already in place


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"machine: {machine_description()}")
    print(f"{'batch':>6} {'stack + copy-in ms':>19} {'stack into staging ms':>22} {'ratio':>6}")
    for batch in (64, 128, 256):
        crops = [rng.integers(0, 255, (args.size, args.size, 3), np.uint8) for _ in range(batch)]
        slot_buffer = np.empty((batch, args.size, args.size, 3), np.uint8)  # the runner's slot input

        before = timed(partial(stack_then_copy, crops, slot_buffer), args.repeats)
        after = timed(partial(stack_into_staging, crops, slot_buffer), args.repeats)
        print(f"{batch:>6} {before * 1e3:>19.2f} {after * 1e3:>22.2f} {after / before:>6.2f}")


if __name__ == "__main__":
    main()
