"""Test-only STAND-IN for a slow GPU node that stalls mid-shard, loaded into a test worker with
`--include slow_engine`.

The partition test needs a worker to be in the middle of a shard when it is cut off from Redis,
and to finish labeling that shard only after another worker has relabeled it. A real node's pace
cannot be steered, so this module stands in for one: every engine batch after the warm-up (call 1,
at load) sleeps LABELER_TEST_BATCH_SLEEP_S, and once LABELER_TEST_HOLD_AFTER batches are done,
batches wait while the file LABELER_TEST_HOLD_FILE exists (the test removes it to let the node go
on). Each batch logs one line the test reads:
`test stand-in engine: batch N (K images) labeled` or `... batch N held`.
Everything else in the worker (Celery, the service, leases, the ledger, the dataset) is the
production code.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path

import worker.runners as runners

log = logging.getLogger("slow_engine")

BATCH_SLEEP_S = float(os.environ.get("LABELER_TEST_BATCH_SLEEP_S", "0"))
HOLD_AFTER = int(os.environ.get("LABELER_TEST_HOLD_AFTER", "0"))
HOLD_FILE = os.environ.get("LABELER_TEST_HOLD_FILE", "")
_real_create_runner = runners.create_runner


class _SlowInfer:
    """A runner's `_infer`, slowed and held as the module docstring says."""

    def __init__(self, real_infer) -> None:
        self.real_infer = real_infer
        self.batches = itertools.count()  # 0 is the warm-up at load

    def __call__(self, crops, want_features):
        batch = next(self.batches)
        if batch == 0:
            return self.real_infer(crops, want_features)
        time.sleep(BATCH_SLEEP_S)
        if HOLD_FILE and batch > HOLD_AFTER and Path(HOLD_FILE).exists():
            log.warning("test stand-in engine: batch %d held", batch)
            while Path(HOLD_FILE).exists():
                time.sleep(0.05)
        output = self.real_infer(crops, want_features)
        log.warning("test stand-in engine: batch %d (%d images) labeled", batch, len(crops))
        return output


def _create_slow_runner(*args, **kwargs):
    runner = _real_create_runner(*args, **kwargs)
    runner._infer = _SlowInfer(runner._infer)
    return runner


runners.create_runner = _create_slow_runner
