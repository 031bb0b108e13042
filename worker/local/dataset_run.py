"""`labeler run INPUTS --out DIR/`: the one-process run writing the distributed run's layout.

The inputs are cut into the same fixed shard list (`DIR/shards/`), each shard's rows become
`DIR/labels/part-<shard>.parquet` once all of them are labeled (a writer thread, so the engine never
waits on a file), and `DIR/manifest.json` is written at the end. `--resume` skips shards that have
a file; `--retry-errors` relabels the error rows of shards that have some and rewrites those files.
An engine failure leaves its shard unwritten (it is not the images' fault): resume labels it.
A path named twice (a folder and a list that overlap) is labeled once, as `labeler enqueue` does:
a shard file refuses a path twice, and two shards holding it would give the dataset two rows.
A shard file that cannot be written stops the run with DatasetWriteFailed and no manifest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from worker.dataset.files import DatasetError, DatasetSpec, iter_records, shard_files, write_shard
from worker.dataset.manifest import check_columns, write_manifest
from worker.dataset.object_path import ObjectPath, as_location
from worker.dataset.shard_list import cut_shards, stored_root_shards
from worker.local.run import RunSummary
from worker.local.shard_writer import ShardWriter
from worker.pipeline.inputs import unique_by_digest
from worker.pipeline.service import LabelingService, ServiceFailed
from worker.records import Record, error_code, is_engine_failure, is_error

DEFAULT_SHARD_SIZE = 5000


class DatasetExists(RuntimeError):
    """DIR already holds a dataset and the run was not asked to resume it."""


@dataclass
class _Shard:
    shard_id: str
    paths: list[str]
    records: dict[str, Record] = field(default_factory=dict)
    waiting: int = 0
    broken: bool = False  # an engine failure: the shard stays unwritten


def run_local_dataset(
    paths: Iterable[str],
    service: LabelingService,
    out_dir: Path | ObjectPath,
    *,
    resume: bool = False,
    retry_errors: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    embedding_dtype: str = "float32",
    on_record: Callable[[Record], None] | None = None,
    worker: str = "labeler-run",
    deduplicate: bool = True,
) -> RunSummary:
    """Label every path once into the dataset `out_dir`; returns the run's summary. A path named
    twice is labeled once (`deduplicate=False` only where the inputs cannot repeat one, a single
    directory walk, to save the ~75 B per path that remembering them costs). Raises
    DatasetWriteFailed, with no manifest written, when a shard's file could not be written."""
    out_dir = as_location(out_dir)
    if (stored_root_shards(out_dir) or shard_files(out_dir)) and not (resume or retry_errors):
        raise DatasetExists(f"{out_dir} holds a dataset: add --resume to continue it, or choose a new folder")
    summary = RunSummary()
    if deduplicate:
        paths = unique_by_digest(paths, on_repeat=lambda _path: _count_repeat(summary))
    written = shard_files(out_dir)
    skipped_shards: list[str] = []
    load_started = time.monotonic()
    with service:
        spec = _spec(service, embedding_dtype)
        for path in list(written.values())[:1]:
            try:
                check_columns(path, spec)
            except DatasetError as exc:
                raise DatasetExists(f"{exc}: resume with the first run's --embeddings/--embedding-dtype and model") from None
        writer = ShardWriter(out_dir)
        started = time.monotonic()
        summary.load_seconds = started - load_started
        lock = threading.Lock()

        def write(shard: _Shard) -> None:
            write_shard(out_dir, shard.shard_id, [shard.records[p] for p in shard.paths], spec, worker=worker)

        def answer(shard: _Shard, record: Record) -> None:
            with lock:
                if is_engine_failure(record):
                    shard.broken = True
                    summary.not_labeled += 1
                else:
                    shard.records[record["path"]] = record
                    if is_error(record):
                        summary.errors[error_code(record)] += 1
                    else:
                        summary.labeled += 1
                shard.waiting -= 1
                complete = shard.waiting == 0
            if on_record is not None and not is_engine_failure(record):
                on_record(record)
            if complete and not shard.broken:
                writer.put(shard.shard_id, lambda: write(shard))

        try:
            for cut in cut_shards(out_dir, paths, shard_size):
                if writer.failed:
                    break
                # each path once even in a list stored before repeats were left out (a resumed old run)
                shard = _Shard(cut.shard_id, list(dict.fromkeys(cut.paths)))
                todo = _todo(out_dir, shard, written, retry_errors, summary)
                if not todo:
                    skipped_shards.append(shard.shard_id)
                    continue
                shard.waiting = len(todo)
                for path in todo:
                    if writer.failed:
                        break
                    service.submit(path, lambda record, shard=shard: answer(shard, record))
                    summary.submitted += 1
        except ServiceFailed:
            pass
        finally:
            service.drain()  # every record answered before the writer is told there are no more
            writer.close()
        summary.batches = service.batches_run
        summary.engine_failure = service.failure
    summary.seconds = time.monotonic() - started
    if writer.failed:
        raise writer.error() from writer.failure
    if summary.complete:
        write_manifest(out_dir, run_id=out_dir.name, shard_ids=[*skipped_shards, *writer.written], spec=spec,
                       settings={"shard_size": shard_size, "top_k": service.options.top_k}, remove_strays=True)  # fmt: skip
    return summary


def _count_repeat(summary: RunSummary) -> None:
    summary.repeats += 1


def _todo(out_dir: Path | ObjectPath, shard: _Shard, written: dict, retry_errors: bool, summary: RunSummary) -> list[str]:
    """The paths of `shard` to label now; the rest keep the rows its file has."""
    if shard.shard_id not in written:
        return list(shard.paths)
    if not retry_errors:
        summary.skipped += len(shard.paths)
        return []
    shard.records = {r["path"]: r for r in iter_records(out_dir, shard_ids=[shard.shard_id])}
    todo = [p for p in shard.paths if p not in shard.records or is_error(shard.records[p])]
    summary.skipped += len(shard.paths) - len(todo)
    return todo


def _spec(service: LabelingService, embedding_dtype: str) -> DatasetSpec:
    runner = service.runner
    return DatasetSpec.for_model(runner.spec, runner.precision, service.options.embeddings, embedding_dtype)


__all__ = ["DEFAULT_SHARD_SIZE", "DatasetExists", "run_local_dataset"]
