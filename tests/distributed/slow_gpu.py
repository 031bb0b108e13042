"""Test-only STAND-IN for a slow engine, loaded into a test worker with `--include slow_gpu`.

Every batch after the warm-up takes LABELER_TEST_BATCH_SLEEP_S longer (a busy or throttled GPU, a
huge model), so a shard stays running long past its lease and the tests can see whether the
heartbeat keeps it. Everything else in the worker is the production code.
"""

from __future__ import annotations

import os
import time

from runner_patch import wrap_engine_calls

BATCH_SLEEP_S = float(os.environ.get("LABELER_TEST_BATCH_SLEEP_S", "1.0"))


def _slow_down(call: int) -> None:
    if call > 1:  # call 1 is the warm-up at load
        time.sleep(BATCH_SLEEP_S)


wrap_engine_calls(_slow_down)
