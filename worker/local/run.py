"""`labeler run`: the whole pipeline in one process, no broker."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.dataset.shard_list import Entry, entry_text
from worker.delta.counts import DeltaCounts
from worker.local.results import JsonlWriter, completed_paths
from worker.pipeline.inputs import unique_by_digest
from worker.pipeline.reading import ReadPolicy
from worker.pipeline.service import LabelingService, ServiceFailed
from worker.records import error_code, is_engine_failure, is_error
from worker.sources.container import Container
from worker.sources.item import SourceItem
from worker.sources.items import SourceUnavailable, iter_items


@dataclass
class RunSummary:
    submitted: int = 0
    skipped: int = 0
    labeled: int = 0
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0  # labeling only, from a loaded model to the last record
    load_seconds: float = 0.0
    batches: int = 0
    not_labeled: int = 0  # the engine failed on them, or gave up first: no record, --resume retries
    never_submitted: int = 0  # left when the engine gave up (counted in not_labeled too)
    engine_failure: str | None = None  # why the service gave up, if it did
    repeats: int = 0  # inputs naming a path already named: left out, so each image has one record
    unreadable: list[str] = field(default_factory=list)  # containers a store failed inside: --resume reads them
    delta: DeltaCounts = field(default_factory=DeltaCounts)  # what --skip-done-in left out

    @property
    def complete(self) -> bool:
        """Every input has its record (labels or an image error)."""
        return not self.not_labeled and self.engine_failure is None and not self.unreadable

    @property
    def images_per_second(self) -> float:
        return (self.labeled + sum(self.errors.values())) / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        out = [
            f"inputs {self.submitted + self.never_submitted + self.skipped}: labeled {self.labeled}, "
            f"errors {sum(self.errors.values())}, skipped (already done) {self.skipped}"
            + (f", repeats dropped {self.repeats}" if self.repeats else ""),
            f"{self.seconds:.1f} s, {self.images_per_second:.1f} images/s, {self.batches} batches "
            f"(model load {self.load_seconds:.1f} s)",
        ]
        out += [f"  {code}: {count}" for code, count in sorted(self.errors.items())]
        out += self.delta.lines()
        if self.engine_failure:
            out.append(f"the engine gave up: {self.engine_failure}")
        out += [f"not read to the end (the store failed; --resume reads it again): {line}" for line in self.unreadable]
        if not self.complete:
            out.append(
                f"{self.not_labeled} images met an engine failure and have no record "
                "(engine failures are never an image's result); run the same command with --resume"
            )
        return out


def run_local(
    paths: Iterable[Entry],
    service: LabelingService,
    out_path: Path,
    resume: bool = False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> RunSummary:
    """Label every input once into `out_path` (loose paths, and each sample of a container); with
    resume, skip paths already in it. `service` is started here (its engine loads on its own
    thread) and closed at the end. `on_total` hears the number of loose images (containers are
    counted as they are read)."""
    summary = RunSummary()
    done = completed_paths(out_path) if resume else set()
    entries = list(unique_by_digest(paths, text=entry_text))
    loose = [entry for entry in entries if not isinstance(entry, Container)]
    if on_total:
        on_total(sum(1 for path in loose if path not in done))
    load_started = time.monotonic()
    with JsonlWriter(out_path, append=resume) as writer:

        def record(rec: dict[str, Any]) -> None:
            if is_engine_failure(rec):
                summary.not_labeled += 1
                return
            writer.write(rec)
            if is_error(rec):
                summary.errors[error_code(rec)] += 1
            else:
                summary.labeled += 1
            if on_record:
                on_record(rec)

        with service:
            started = time.monotonic()
            summary.load_seconds = started - load_started
            policy = service.options.read_policy
            try:
                for item in _items(entries, policy, summary):
                    if item.path in done:
                        summary.skipped += 1
                        continue
                    service.submit(item.path, record, data=item.data, error=item.error, source=item.source)
                    summary.submitted += 1
            except ServiceFailed:
                summary.never_submitted = max(0, len(loose) - summary.submitted)
                summary.not_labeled += summary.never_submitted
            service.drain()
            summary.batches = service.batches_run
            summary.engine_failure = service.failure
    summary.seconds = time.monotonic() - started
    return summary


def _items(entries: list[Entry], policy: ReadPolicy, summary: RunSummary) -> Iterator[SourceItem]:
    """The samples of every entry; a container the store fails inside is noted, and the run goes on."""
    for entry in entries:
        if not isinstance(entry, Container):
            yield SourceItem(entry)
            continue
        try:
            yield from iter_items(entry, policy)
        except SourceUnavailable as exc:
            summary.unreadable.append(f"{entry.url}: {exc}")
