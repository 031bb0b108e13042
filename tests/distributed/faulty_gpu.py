"""Test-only FAKE GPU fault, loaded into a test worker with `--include faulty_gpu`.

A GPU that falls off the bus or a sticky CUDA error cannot be produced on this CPU machine, so this
module stands in for one: every runner the worker creates labels the warm-up and the first
LABELER_TEST_GOOD_BATCHES batches, then raises on every batch as a lost device would. With
LABELER_TEST_FAILING_CALLS (e.g. "3") only those engine calls fail (call 1 is the warm-up): a
transient fault such as an out-of-memory. Everything else in the worker (Celery, the service, the
task's hand-back, the warm shutdown, the exit code) is the production code.
"""

from __future__ import annotations

import os

from runner_patch import wrap_engine_calls

GOOD_BATCHES = int(os.environ.get("LABELER_TEST_GOOD_BATCHES", "2"))
FAILING_CALLS = {int(n) for n in os.environ.get("LABELER_TEST_FAILING_CALLS", "").split(",") if n}


def _lose_the_gpu(call: int, _images: int) -> None:
    failing = call in FAILING_CALLS if FAILING_CALLS else call > 1 + GOOD_BATCHES
    if failing:  # call 1 is the warm-up at load
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected fault)")


wrap_engine_calls(_lose_the_gpu)
