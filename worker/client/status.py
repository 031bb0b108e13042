"""`labeler status`: a run's counts, speed and ETA, once or as a live view."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from worker.ledger.activity import WorkerActivity, format_workers
from worker.ledger.ledger import RunLedger, RunStatus


class RateMeter:
    """Images per second between successive samples, smoothed so one slow interval does not jump the ETA."""

    def __init__(self, smoothing: float = 0.3) -> None:
        self.smoothing = smoothing
        self.rate: float | None = None
        self._last: tuple[float, int] | None = None

    def sample(self, done: int, now: float | None = None) -> float | None:
        now = time.monotonic() if now is None else now
        if self._last is not None and now > self._last[0]:
            instant = (done - self._last[1]) / (now - self._last[0])
            self.rate = (
                instant if self.rate is None else self.smoothing * instant + (1 - self.smoothing) * self.rate
            )
        self._last = (now, done)
        return self.rate


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_status(
    status: RunStatus, rate: float | None = None, workers: Sequence[WorkerActivity] = ()
) -> str:
    """One block of text; `rate` (live) overrides the run-average rate; then one line per worker."""
    rate = status.average_rate() if rate is None else rate
    share = f"{100.0 * status.done / status.total:.1f}%" if status.total else "-"
    if status.failed_run:
        eta = "none: the run is failed"
    elif status.finished() and status.total:
        eta = "finished"
    elif rate > 0:
        eta = format_duration(status.pending / rate)
    else:
        eta = "unknown"
    lines = [
        f"run {status.run}",
        f"  total {status.total}  done {status.done} ({share})  labeled {status.labeled}  "
        f"failed {status.failed}  pending {status.pending}",
        f"  shards {status.shards_done}/{status.shards} done  {rate:.1f} images/s  ETA {eta}  "
        f"queue {status.queued_jobs} shards",
    ]
    if status.failed_run:
        lines.append(f"  FAILED: {status.failed_reason}")
        lines.append(f"  fix the cause, then enqueue the run again to resume it: labeler enqueue --run {status.run} ...")
    if status.enqueuing():
        lines.append("  enqueue in progress: the total is still growing")
    if status.dead_jobs:
        lines.append(f"  images given up on: {status.dead_jobs} (they kept killing workers; internal_error rows)")
    lines += format_workers(workers)
    return "\n".join(lines)


def follow(
    store: RunLedger,
    run: str,
    queue: str,
    interval_s: float,
    show: Callable[[RunStatus, float | None], None],
    until_finished: bool = True,
    sleep: Callable[[float], None] = time.sleep,
) -> RunStatus:
    """Poll the run every `interval_s`, calling `show`; return once it is settled: finished (every
    path has its record and no enqueue is still adding paths) or failed (a job was refused for a
    reason that holds for the whole run)."""
    meter = RateMeter()
    while True:
        status = store.status(run, queue)
        show(status, meter.sample(status.done))
        if until_finished and status.settled():
            return status
        sleep(interval_s)
