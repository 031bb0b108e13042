"""What earlier datasets already hold, as sorted 128-bit digests: the delta's one data structure.

A digest is BLAKE2b-128 of (kind, name, version): a loose file's or object's path and the version
its row recorded, or a container file's URL and version (every sample of an unchanged tar or
Parquet file is skipped at once). Two uint64 arrays sorted together hold them: 16 bytes per row,
so a 10 M-row dataset is ~160 MB, built one Arrow batch at a time. A false match would skip an
image, so digests are 128-bit (a collision among 10 M x 10 M is ~1e-25 likely), never 64.

Which rows count as done:
- labeled by the run's model checksum and precision (a rebuilt model relabels everything);
- with a recorded version (schema 1.2 on; older rows are relabeled);
- loose files and objects: only label rows, unless `skip_failed` (an error row is tried again);
  an error row without a version (the file could not even be read) is always tried again;
- containers: a file with any row of that version is done whole, error rows included: its bytes
  are the same, so a bad sample in an unchanged tar stays bad (a store that failed mid-read leaves
  the shard unwritten, so a finished dataset never holds a half-read container).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FILE = b"f"  # a loose file or object, by its path
CONTAINER = b"c"  # a tar or Parquet shard file, by its URL
BATCH_ROWS = 65536


def digests(kind: bytes, names: Sequence[str], versions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The (high, low) uint64 halves of each (kind, name, version) digest, in order. One text per
    pair (versions never hold a NUL, so the last one splits it unambiguously)."""
    tag = kind.decode()
    blake2b = hashlib.blake2b
    block = b"".join([
        blake2b(f"{tag}\0{name}\0{version}".encode("utf-8", "surrogateescape"), digest_size=16).digest()
        for name, version in zip(names, versions, strict=True)
    ])  # fmt: skip
    halves = np.frombuffer(block, dtype=">u8").reshape(-1, 2)
    return halves[:, 0].astype(np.uint64), halves[:, 1].astype(np.uint64)


@dataclass
class DoneIndex:
    """Sorted digests of what is done; `contains` answers a batch of digests at once."""

    high: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    low: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))

    @classmethod
    def of(cls, parts: Iterable[tuple[np.ndarray, np.ndarray]]) -> DoneIndex:
        parts = list(parts)
        if not parts:
            return cls()
        high = np.concatenate([p[0] for p in parts])
        low = np.concatenate([p[1] for p in parts])
        order = np.lexsort((low, high))
        return cls(high[order], low[order])

    def __len__(self) -> int:
        return len(self.high)

    def contains(self, high: np.ndarray, low: np.ndarray) -> np.ndarray:
        """A bool per (high, low) digest: is it in the index. Queries are looked up in sorted
        order (3.5x faster on a 10 M index: the binary searches walk the array's cache lines in
        step) and answered in the order given."""
        found = np.zeros(len(high), dtype=bool)
        size = len(self.high)
        if not size or not len(high):
            return found
        order = np.argsort(high, kind="stable")
        asked_high, asked_low = high[order], low[order]
        left = np.searchsorted(self.high, asked_high, side="left")
        at = np.minimum(left, size - 1)
        hit = self.high[at] == asked_high
        after = np.minimum(at + 1, size - 1)
        run = hit & (after != at) & (self.high[after] == asked_high)  # equal high halves: rare
        single = hit & ~run
        sorted_found = np.zeros(len(high), dtype=bool)
        sorted_found[single] = self.low[at[single]] == asked_low[single]
        for i in np.nonzero(run)[0]:
            stop = np.searchsorted(self.high, asked_high[i], side="right")
            sorted_found[i] = bool(np.any(self.low[left[i] : stop] == asked_low[i]))
        found[order] = sorted_found
        return found


def done_digests(batch: pa.RecordBatch, skip_failed: bool) -> tuple[np.ndarray, np.ndarray]:
    """The digests of what one batch of an earlier dataset's rows (path, source_url,
    source_version, error_code) holds done: loose rows one by one, containers once per file."""
    if "source_version" not in batch.schema.names:
        return np.empty(0, np.uint64), np.empty(0, np.uint64)
    versioned = pc.is_valid(batch.column("source_version"))
    loose = pc.and_(versioned, pc.is_null(batch.column("source_url")))
    if not skip_failed:
        loose = pc.and_(loose, pc.is_null(batch.column("error_code")))
    rows = batch.filter(loose)
    high, low = digests(FILE, rows.column("path").to_pylist(), rows.column("source_version").to_pylist())
    in_containers = batch.filter(pc.and_(versioned, pc.is_valid(batch.column("source_url"))))
    if in_containers.num_rows:
        pairs = pa.table({"url": in_containers.column("source_url"), "version": in_containers.column("source_version")})
        pairs = pairs.group_by(["url", "version"]).aggregate([])
        c_high, c_low = digests(CONTAINER, pairs.column("url").to_pylist(), pairs.column("version").to_pylist())
        high, low = np.concatenate([high, c_high]), np.concatenate([low, c_low])
    return high, low
