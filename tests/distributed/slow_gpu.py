"""Test-only STAND-IN for a slow or stalling GPU node, loaded into a test worker with
`--include slow_gpu`.

A real node's pace cannot be steered, so every engine batch after the warm-up (call 1, at load)
sleeps LABELER_TEST_BATCH_SLEEP_S (a busy or throttled GPU: a shard stays running long past its
lease, and the tests see whether the heartbeat keeps it), and once LABELER_TEST_HOLD_AFTER batches
are done, batches wait while the file LABELER_TEST_HOLD_FILE exists (the partition test removes it
to let the node go on). Each batch logs `test stand-in engine: batch N (K images) labeled` or
`... batch N held`. Everything else in the worker is the production code.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from runner_patch import wrap_engine_calls

log = logging.getLogger("slow_gpu")

BATCH_SLEEP_S = float(os.environ.get("LABELER_TEST_BATCH_SLEEP_S", "1.0"))
HOLD_AFTER = int(os.environ.get("LABELER_TEST_HOLD_AFTER", "0"))
HOLD_FILE = os.environ.get("LABELER_TEST_HOLD_FILE", "")


def _slow_down(call: int, images: int) -> None:
    if call == 1:  # the warm-up at load
        return
    batch = call - 1
    time.sleep(BATCH_SLEEP_S)
    if HOLD_FILE and batch > HOLD_AFTER and Path(HOLD_FILE).exists():
        log.warning("test stand-in engine: batch %d held", batch)
        while Path(HOLD_FILE).exists():
            time.sleep(0.05)
    log.warning("test stand-in engine: batch %d (%d images) labeled", batch, images)


wrap_engine_calls(_slow_down)
