"""The ledger's model-based test (tests/distributed/ledger_model.py) run long: many more examples
and steps than CI's 25 x 30, to look for interleavings CI's budget rarely reaches.

    python bench/bench_ledger_model.py [--examples 500] [--steps 80] [--window 4]

A private redis-server (AOF everysec) in a temporary folder, outputs on tmpfs when there is one.
Prints the examples and steps run, the time, the rules run and the faults the runs met. A failure
prints Hypothesis's shrunk sequence of steps (and a blob to reproduce it) and exits non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "distributed")]  # this checkout, and the test's helpers
from distributed_helpers import RedisServer  # noqa: E402
from ledger_model import CHECKPOINT_WINDOW, STATS, timed_run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument(
        "--steps", type=int, default=80, help="steps per example (Hypothesis's stateful_step_count)"
    )
    parser.add_argument("--window", type=int, default=CHECKPOINT_WINDOW,
                        help="steps of writes a dying Redis host may lose at most")  # fmt: skip
    args = parser.parse_args()
    logging.getLogger("worker").setLevel(
        logging.CRITICAL
    )  # the sweeper's and reconciler's warnings: counted below
    scratch = "/dev/shm" if os.path.isdir("/dev/shm") else None  # fsync on tmpfs costs nothing
    with tempfile.TemporaryDirectory(prefix="bench-ledger-model-", dir=scratch) as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        outputs = Path(tmp) / "outputs"
        outputs.mkdir()
        failure = None
        seconds = 0.0
        try:
            seconds = timed_run(server, outputs, args.examples, args.steps, args.window, derandomize=False)
        except Exception as exc:  # noqa: BLE001 - report what ran before the failure
            failure = exc
        finally:
            server.stop()
    steps = STATS["steps"]
    print(f"examples asked {args.examples}, steps per example up to {args.steps}")
    print(
        f"machines run {STATS['examples']} (Hypothesis's short tries and any shrinking included), rule steps run {steps}, drains {STATS['drains']}"
    )
    if seconds:
        print(f"time {seconds:.1f} s ({steps / seconds:.0f} steps/s)")
    for name, count in sorted(STATS.items()):
        if name not in ("steps", "examples"):
            print(f"  {name}: {count}")
    if failure is not None:
        print(f"FAILED: {type(failure).__name__}: {failure}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
