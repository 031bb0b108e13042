"""The delta itself: inputs streamed through the done index, those unchanged since their earlier
row left out, the rest passed on in order.

Inputs go a chunk at a time: each chunk's current versions are read (a stat per local file, a HEAD
per object on a pool of threads: the listing and HEAD cost of knowing that an object did not
change), digested and looked up in one vectorized call, so memory holds one chunk of paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import chain as chain_iter
from itertools import islice
from typing import Any

import numpy as np

from worker.dataset.files import iter_batches
from worker.dataset.object_path import as_location
from worker.dataset.shard_list import Entry, size_of
from worker.dataset.storage import is_url
from worker.delta.counts import DeltaCounts
from worker.delta.done_index import BATCH_ROWS, CONTAINER, FILE, DoneIndex, digests, done_digests
from worker.delta.lineage import EarlierDataset, settle_lineage
from worker.sources.container import Container
from worker.sources.version import current_version

CHUNK = 16384  # inputs per lookup (and per round of HEADs): one vectorized call each
HEAD_CONCURRENCY = 32  # objects asked for their ETag at once
READ_COLUMNS = ["path", "source_url", "source_version", "error_code"]

VersionOf = Callable[[Sequence[str]], list[str | None]]


def build_index(
    chain: Sequence[EarlierDataset], model_sha256: str, precision: str, skip_failed: bool, counts: DeltaCounts
) -> DoneIndex:
    """The done index of the chain's datasets labeled by this model at this precision."""
    parts = []
    for earlier in chain:
        if not earlier.same_model(model_sha256, precision):
            counts.other_models.append(
                f"{earlier.location}: labeled by model {earlier.model_sha256[:12]} at {earlier.precision}, "
                f"this run's is {model_sha256[:12]} at {precision}: none of its rows count as done"
            )
            continue
        for batch in iter_batches(as_location(earlier.location), batch_rows=BATCH_ROWS, columns=READ_COLUMNS):
            parts.append(done_digests(batch, skip_failed))
    index = DoneIndex.of(parts)
    counts.done_rows = len(index)
    return index


def current_versions(names: Sequence[str]) -> list[str | None]:
    """Each name's version now: local files stat'ed here, objects HEADed on a pool of threads."""
    urls = [i for i, name in enumerate(names) if is_url(name)]
    versions: list[str | None] = [None if is_url(name) else current_version(name) for name in names]
    if urls:
        with ThreadPoolExecutor(max_workers=min(HEAD_CONCURRENCY, len(urls))) as pool:
            for i, version in zip(urls, pool.map(current_version, [names[i] for i in urls]), strict=True):
                versions[i] = version
    return versions


def delta_entries(
    out_dir: Any, entries: Iterable[Entry], chain: list[EarlierDataset] | None, skip_failed: bool,
    model: Callable[[], tuple[str, str]], counts: DeltaCounts,
) -> tuple[Iterator[Entry] | Iterable[Entry], list[EarlierDataset]]:  # fmt: skip
    """`entries` less what the run's chain holds done, and the chain (fixed at the run's start:
    worker/delta/lineage.py). The index is built when the first entry is asked for, so a resume
    whose shard list is complete (and reads no entries) reads no earlier dataset either.
    `model()`: the (checksum, precision) whose rows count as done."""
    chain, skip_failed = settle_lineage(out_dir, chain, skip_failed)
    if not chain:
        return entries, chain

    def index() -> DoneIndex:
        return build_index(chain, *model(), skip_failed, counts)

    return skip_done(entries, index, counts), chain


def skip_done(
    entries: Iterable[Entry], index: Callable[[], DoneIndex], counts: DeltaCounts,
    version_of: VersionOf = current_versions,
) -> Iterator[Entry]:  # fmt: skip
    """`entries` in order, less those the index (built on the first entry) holds done at their
    current version."""
    iterator = iter(entries)
    first = list(islice(iterator, 1))
    if not first:
        return
    done_index = index()
    iterator = chain_iter(first, iterator)
    while chunk := list(islice(iterator, CHUNK)):
        if not len(done_index):
            yield from chunk
            continue
        names = [entry.url if isinstance(entry, Container) else entry for entry in chunk]
        versions = version_of(names)
        known = [i for i, version in enumerate(versions) if version is not None]
        done = np.zeros(len(chunk), dtype=bool)
        for kind, wanted in ((FILE, False), (CONTAINER, True)):
            picked = [i for i in known if isinstance(chunk[i], Container) == wanted]
            if picked:
                high, low = digests(kind, [names[i] for i in picked], [versions[i] for i in picked])  # type: ignore[misc]
                done[picked] = done_index.contains(high, low)
        for entry, skip in zip(chunk, done, strict=True):
            if not skip:
                yield entry
            elif isinstance(entry, Container):
                counts.containers += 1
                counts.container_images += size_of(entry)
            else:
                counts.images += 1
