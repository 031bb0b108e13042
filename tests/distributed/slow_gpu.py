"""Test-only STAND-IN for a slow engine, loaded into a test worker with `--include slow_gpu`.

Every batch after the warm-up takes LABELER_TEST_BATCH_SLEEP_S longer (a busy or throttled GPU, a
huge model), so a shard stays running long past its lease and the tests can see whether the
heartbeat keeps it. Everything else in the worker is the production code.
"""

from __future__ import annotations

import os
import time

import worker.runners as runners

BATCH_SLEEP_S = float(os.environ.get("LABELER_TEST_BATCH_SLEEP_S", "1.0"))
_real_create_runner = runners.create_runner


def _create_slow_runner(*args, **kwargs):
    runner = _real_create_runner(*args, **kwargs)
    real_infer = runner._infer
    calls = {"n": 0}

    def infer(crops, want_features):
        calls["n"] += 1
        if calls["n"] > 1:  # call 1 is the warm-up at load
            time.sleep(BATCH_SLEEP_S)
        return real_infer(crops, want_features)

    runner._infer = infer
    return runner


runners.create_runner = _create_slow_runner
