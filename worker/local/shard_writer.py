"""The shard writer of `labeler run --out DIR/`: finished shards become Parquet files on a thread of
their own, so the engine never waits on a file, through a short queue, so a slow disk holds the
engine back instead of letting labeled shards pile up in memory.

A failed write stops the writing for good: the run must stop and say so, never report a shard as
labeled that has no file. The writer keeps taking shards after it (and drops them), so the
inference thread that hands them over never blocks on a writer that has given up.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from worker.dataset.files import labels_dir
from worker.dataset.object_path import Location

QUEUE_DEPTH = 2  # finished shards waiting for the writer: at most this many rows sets in memory
_DONE = object()


class DatasetWriteFailed(RuntimeError):
    """A shard's file could not be written: the run stopped; the files written before it stay."""


class ShardWriter:
    """`put(shard_id, write)` from any thread; `write()` runs on the writer thread, one at a time."""

    def __init__(self, out_dir: Location, depth: int = QUEUE_DEPTH) -> None:
        self.out_dir = out_dir
        self.written: list[str] = []
        self.failed_shard: str | None = None
        self.failure: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    @property
    def failed(self) -> bool:
        return self.failure is not None

    def put(self, shard_id: str, write: Callable[[], object]) -> None:
        """Hand over a finished shard; blocks while `depth` shards wait for the writer."""
        self._queue.put((shard_id, write))

    def close(self) -> None:
        """Write what was handed over (unless a write failed), then end the thread."""
        self._queue.put(_DONE)
        self._thread.join()

    def error(self) -> DatasetWriteFailed:
        """The failure, said once for a person: which shard, where, why, and what to do next."""
        return DatasetWriteFailed(
            f"shard {self.failed_shard} could not be written to {labels_dir(self.out_dir)}: {self.failure}. "
            "The run stopped; the shards written before it stay. Fix the cause and run the same command "
            "with --resume"
        )

    def _run(self) -> None:
        while (item := self._queue.get()) is not _DONE:
            shard_id, write = item
            if self.failed:
                continue  # taken and dropped: resume labels it again
            try:
                write()
            except BaseException as exc:  # noqa: BLE001 - reported by the run; the queue must keep draining
                self.failed_shard, self.failure = shard_id, exc
                continue
            self.written.append(shard_id)


__all__ = ["QUEUE_DEPTH", "DatasetWriteFailed", "ShardWriter"]
