"""The fetch stage: object URLs are read on their own threads, so a network store does not starve
the engine.

Reading an object is mostly waiting (a HEAD, then a ranged GET). Done on the decode pool (one
thread per core) a worker had only as many requests in flight as cores, and its CPU idled on
round trips. Here each URL is read on a pool of `concurrency` threads, and only its bytes go on to
the decode pool; local paths skip this stage. The threads hold no sockets of their own: s3fs runs
every call as a coroutine on fsspec's one IO loop, so the requests share one client and its
connection pool (`max_pool_connections`, set to match in worker/dataset/storage.py).

The read is `read_image`, the very function the decode threads used: the allowed-root check,
the HEAD for the size cap, the ranged GET, the retries and the error codes are unchanged. The
thread pool starts with the first URL, so a run over local files makes no threads and imports no
object-store client.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from worker.dataset.storage import is_url, reserve_connections
from worker.pipeline.errors import ImageError, unexpected_error
from worker.pipeline.reading import ReadPolicy, read_image

log = logging.getLogger(__name__)

# What a fetch hands on: the bytes and their version, or the ImageError that becomes the image's record.
Fetched = Callable[[bytes | None, str | None, ImageError | None], None]


class FetchStage:
    """Reads URLs `concurrency` at a time and calls `then(data, version, error)` on the fetch thread.

    `concurrency` 0 turns the stage off: URLs are then read on the decode threads as before."""

    def __init__(self, concurrency: int, policy: ReadPolicy) -> None:
        self.concurrency = max(0, concurrency)
        self.policy = policy
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.reading = 0  # reads in progress now
        self.high_water = 0  # the most reads ever in progress at once (for tests and benchmarks)

    def takes(self, path: str) -> bool:
        """Whether this stage reads `path` (a URL, with the stage on)."""
        return self.concurrency > 0 and is_url(path)

    def submit(self, path: str, then: Fetched) -> None:
        self._executor().submit(self._fetch, path, then)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                reserve_connections(self.concurrency)
                self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="fetch")
            return self._pool

    def _fetch(self, path: str, then: Fetched) -> None:
        with self._lock:
            self.reading += 1
            self.high_water = max(self.high_water, self.reading)
        data: bytes | None = None
        version: str | None = None
        error: ImageError | None = None
        try:
            data, version = read_image(path, self.policy)
        except ImageError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - as on the decode pool: a record, not a lost image
            log.exception("unexpected failure fetching %s", path)
            error = unexpected_error(exc)
        finally:
            with self._lock:
                self.reading -= 1
        then(data, version, error)
