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

from worker.dataset.files import DatasetError, DatasetSpec, iter_records, shard_files, write_shard
from worker.dataset.manifest import check_columns, write_manifest
from worker.dataset.object_path import Location, as_location
from worker.dataset.shard_list import Entry, ShardSource, cut_shards, entry_text, size_of, stored_root_shards
from worker.delta.lineage import EarlierDataset, lineage_json
from worker.delta.skip import delta_entries
from worker.local.run import RunSummary
from worker.local.shard_writer import ShardWriter
from worker.pipeline.inputs import unique_by_digest
from worker.pipeline.reading import ReadPolicy
from worker.pipeline.service import LabelingService, ServiceFailed
from worker.records import Record, error_code, is_engine_failure, is_error
from worker.setting_table import default
from worker.sources.items import SourceUnavailable, iter_items

DEFAULT_SHARD_SIZE: int = default("shard_size")


class DatasetExists(RuntimeError):
    """DIR already holds a dataset and the run was not asked to resume it."""


@dataclass
class _Shard:
    shard_id: str
    paths: list[str] = field(default_factory=list)  # every sample's path, as its source gave them
    records: dict[str, Record] = field(default_factory=dict)
    waiting: int = 0
    listed: bool = False  # its source was read to the end: no more samples will be submitted
    broken: bool = False  # an engine failure, or a container the store failed in: the shard stays unwritten


def run_local_dataset(
    paths: Iterable[Entry],
    service: LabelingService,
    out_dir: Location,
    *,
    resume: bool = False,
    retry_errors: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    embedding_dtype: str = "float32",
    on_record: Callable[[Record], None] | None = None,
    worker: str = "labeler-run",
    deduplicate: bool = True,
    skip_done_in: list[EarlierDataset] | None = None,
    skip_failed: bool = False,
) -> RunSummary:
    """Label every path once into the dataset `out_dir`; returns the run's summary. A path named
    twice is labeled once (`deduplicate=False` only where the inputs cannot repeat one, a single
    directory walk, to save the ~75 B per path that remembering them costs). Raises
    DatasetWriteFailed, with no manifest written, when a shard's file could not be written.

    `skip_done_in`: earlier datasets (worker/delta/): inputs they hold labeled by this model from
    the same source version are left out; the chain is fixed at the run's start (a resume keeps it)."""
    out_dir = as_location(out_dir)
    if (stored_root_shards(out_dir) or shard_files(out_dir)) and not (resume or retry_errors):
        raise DatasetExists(f"{out_dir} holds a dataset: add --resume to continue it, or choose a new folder")
    summary = RunSummary()
    if deduplicate:
        paths = unique_by_digest(paths, on_repeat=lambda _path: _count_repeat(summary), text=entry_text)
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
        paths, chain = delta_entries(out_dir, paths, skip_done_in, skip_failed,
                                     lambda: (spec.model_sha256, spec.precision), summary.delta)  # fmt: skip
        writer = ShardWriter(out_dir)
        started = time.monotonic()
        summary.load_seconds = started - load_started
        lock = threading.Lock()

        def write(shard: _Shard) -> None:
            write_shard(out_dir, shard.shard_id, [shard.records[p] for p in shard.paths], spec, worker=worker)

        def finish_if_complete(shard: _Shard) -> None:
            """Called with `lock` held: the shard's file is written once all its samples answered."""
            if shard.listed and shard.waiting == 0 and not shard.broken:
                shard.listed = False  # written once
                writer.put(shard.shard_id, lambda: write(shard))

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
                finish_if_complete(shard)
            if on_record is not None and not is_engine_failure(record):
                on_record(record)

        try:
            for cut in cut_shards(out_dir, paths, shard_size):
                if writer.failed:
                    break
                shard = _Shard(cut.shard_id)
                done = _done_rows(out_dir, shard, written, retry_errors)
                if done is None:  # its file is there and nothing is retried
                    summary.skipped += size_of(cut.source)
                    skipped_shards.append(shard.shard_id)
                    continue
                if not _label_shard(shard, cut.source, done, service, lock, answer, finish_if_complete,
                                    writer, summary, service.options.read_policy):  # fmt: skip
                    skipped_shards.append(shard.shard_id)
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
                       settings={"shard_size": shard_size, "top_k": service.options.top_k}, remove_strays=True,
                       lineage=lineage_json(chain))  # fmt: skip
    return summary


def _count_repeat(summary: RunSummary) -> None:
    summary.repeats += 1


def _done_rows(out_dir: Location, shard: _Shard, written: dict, retry_errors: bool) -> dict[str, Record] | None:
    """The rows of `shard` kept from its file (empty: label it all); None: skip the shard whole."""
    if shard.shard_id not in written:
        return {}
    if not retry_errors:
        return None
    return {r["path"]: r for r in iter_records(out_dir, shard_ids=[shard.shard_id])}


def _label_shard(
    shard: _Shard, source: ShardSource, done: dict[str, Record], service: LabelingService, lock: threading.Lock,
    answer: Callable[[_Shard, Record], None], finish_if_complete: Callable[[_Shard], None], writer: ShardWriter,
    summary: RunSummary, read_policy: ReadPolicy,
) -> bool:  # fmt: skip
    """Submit the shard's samples that have no good row yet; False if all of them had one (a retry
    with nothing to retry: the file stays as it is). A store failing inside a container leaves the
    shard unwritten (summary.not_labeled counts it), so --resume reads it again."""
    shard.records = done
    known: set[str] = set()
    submitted = 0
    try:
        for item in iter_items(source, read_policy):
            if writer.failed:
                break
            if item.path in known:  # a path stored twice in a list from before repeats were left out
                continue
            known.add(item.path)
            shard.paths.append(item.path)
            old = done.get(item.path)
            if old is not None and not is_error(old):
                summary.skipped += 1
                continue
            with lock:
                shard.waiting += 1
            service.submit(item.path, lambda record, shard=shard: answer(shard, record),
                           data=item.data, error=item.error, source=item.source)  # fmt: skip
            submitted += 1
            summary.submitted += 1
        else:
            if not submitted:
                return False
            with lock:
                shard.listed = True
                finish_if_complete(shard)
    except SourceUnavailable as exc:
        with lock:
            shard.broken = True
        summary.unreadable.append(f"shard {shard.shard_id}: {exc}")
    return True


def _spec(service: LabelingService, embedding_dtype: str) -> DatasetSpec:
    runner = service.runner
    return DatasetSpec.for_model(runner.spec, runner.precision, service.options.embeddings, embedding_dtype)


__all__ = ["DEFAULT_SHARD_SIZE", "DatasetExists", "run_local_dataset"]
