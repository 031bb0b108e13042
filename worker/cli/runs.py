"""`labeler enqueue | status | results | retry`: a distributed run from the client's side.

Every command that talks to Redis takes `--broker URL` and otherwise reads LABELER_BROKER_URL
(see worker/settings.py for every setting).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import click

from worker.cli.common import (
    container_options,
    earlier_datasets,
    embedding_dtype_option,
    input_entries,
    interval_option,
    load_settings,
    open_run,
    open_store,
    setting_option,
)
from worker.dataset.storage import is_url
from worker.records import ErrorCode
from worker.setting_table import default


@click.command("enqueue")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--run", "run_name", help="Run name (default: a new one, printed). Reuse it to resume.")
@click.option(
    "--output",
    type=click.Path(file_okay=False),
    help="The run's dataset: a folder on storage the workers share, or s3://bucket/prefix/ (default: FIRST_OUTPUT_ROOT/RUN).",
)
@setting_option("broker_url")
@setting_option("queue")
@setting_option("shard_size")
@setting_option("max_queued_jobs")
@click.option("--embeddings", is_flag=True, help="Rows carry the model's pooled features (a fixed-size list).")
@embedding_dtype_option()
@click.option("--wait", is_flag=True, help="Follow the run until every image has a row.")
@interval_option("--wait")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a TTY).")
@click.option("--skip-done-in", "skip_done_in", multiple=True, metavar="DIR_URL_OR_RUN",
              help="An earlier dataset, or the run that wrote it (and those it built on): inputs it holds labeled by the run's model, "
              "unchanged since (size and mtime, ETag), are not enqueued. Repeatable.")  # fmt: skip
@click.option("--skip-failed", is_flag=True,
              help="With --skip-done-in: also leave out inputs whose earlier row is an error (default: retry them).")  # fmt: skip
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False),
              help="With --skip-done-in: the bundle the workers serve (default: the model of the first dataset "
              "named); workers serving another refuse the run.")  # fmt: skip
@click.option("--precision", help="With --model: which of the bundle's models the workers run (default fp32).")
@container_options
def enqueue_command(
    inputs: tuple[str, ...],
    run_name: str | None,
    output: str | None,
    broker_url: str | None,
    queue: str | None,
    shard_size: int | None,
    max_queued_jobs: int | None,
    embeddings: bool,
    embedding_dtype: str,
    wait: bool,
    interval: float,
    progress: bool | None,
    skip_done_in: tuple[str, ...],
    skip_failed: bool,
    model_dir: str | None,
    precision: str | None,
    image_ext: str | None,
    image_column: str | None,
    key_column: str | None,
    samples_per_shard: int | None,
) -> None:
    """Cut INPUTS (files, directories, @list files, - for stdin, .parquet/.csv manifests with a
    `path` column, WebDataset .tar shards, Parquet files of image bytes) into the shards of a run and publish them; print the run id. The shard list is
    fixed by the first enqueue of a run: enqueue it again to resume."""
    import redis
    from tqdm import tqdm

    from worker.client.enqueue import EnqueueError, enqueue_run
    from worker.dataset.schema import DatasetError
    from worker.dataset.shard_list import ShardListError, entry_text
    from worker.dataset.storage import StorageUnavailable
    from worker.delta.lineage import LineageError
    from worker.ledger.keys import RunNameError
    from worker.pipeline.inputs import InputError, can_repeat, unique_by_digest
    from worker.settings import output_roots

    if not skip_done_in and (skip_failed or model_dir or precision):
        raise click.UsageError("--skip-failed, --model and --precision go with --skip-done-in")
    settings = load_settings(broker_url=broker_url, queue=queue, shard_size=shard_size,
                             max_queued_jobs=max_queued_jobs)  # fmt: skip
    run = run_name or time.strftime("run-%Y%m%d-%H%M%S-") + os.urandom(3).hex()
    click.echo(run)
    ledger = open_store(settings)
    try:
        known = ledger.run_settings(run)
    except redis.exceptions.RedisError as exc:
        raise click.ClickException(f"Redis: {exc}") from None
    folder = output or (known["output"] if known else os.path.join(output_roots(settings)[0], run))
    options: dict = {"embeddings": embeddings, "embedding_dtype": embedding_dtype}
    named = tuple(_dataset_of(ledger, name) for name in skip_done_in)
    chain = _earlier_for_enqueue(named, skip_failed, model_dir, precision, folder, options)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=None, unit="img", desc="enqueue", disable=not show, dynamic_ncols=True)

    def on_progress(summary) -> None:
        bar.update(summary.seen - bar.n)

    paths = input_entries(inputs, image_ext, image_column, key_column, samples_per_shard)
    try:
        summary = enqueue_run(
            ledger.client,
            run,
            unique_by_digest(paths, text=entry_text) if can_repeat(inputs) else paths,
            folder,
            settings.queue,
            settings.shard_size,
            settings.max_queued_jobs,
            settings.key_prefix,
            options=options,
            on_progress=on_progress,
            skip_done_in=chain,
            skip_failed=skip_failed,
        )
    except (RunNameError, EnqueueError, ShardListError, InputError, OSError, StorageUnavailable, LineageError,
            DatasetError) as exc:  # fmt: skip
        raise click.ClickException(str(exc)) from None
    except redis.exceptions.RedisError as exc:
        raise click.ClickException(f"Redis: {exc} (enqueue again with --run {run} to resume)") from None
    finally:
        bar.close()
    click.echo(
        f"run {run}: {summary.seen} images"
        + (f" and {summary.containers} tar/Parquet shard files (their samples are counted as they are read)"
           if summary.containers else "")
        + f" in {summary.shards} shards"
        + (" (the run's stored shard list)" if summary.reused_list else "")
        + f", {summary.queued} queued in {summary.jobs} shards, {summary.skipped} done or running; "
        f"{summary.seconds:.1f} s" + (f" ({summary.waited_s:.0f} s waiting for the queue)" if summary.waited_s else "")
        + (f"\n{summary.from_storage} images in shards already written on storage (the ledger did not know them): not labeled again"
           if summary.from_storage else "")
        + "".join(f"\n{line}" for line in summary.delta.lines())
        + f"\ndataset: {summary.output}/labels/*.parquet",
        err=True,
    )
    if wait and summary.shards == 0:
        click.echo("nothing to wait for: the inputs named no paths", err=True)
    elif wait:
        _follow(settings, run, interval, show)


def _dataset_of(ledger, name: str) -> str:
    """A dataset named by its folder or URL, or by the run that wrote it (its output, as the
    ledger keeps it)."""
    if is_url(name) or os.path.exists(name) or os.sep in name:
        return name
    import redis

    try:
        known = ledger.run_settings(name)
    except redis.exceptions.RedisError as exc:
        raise click.ClickException(f"Redis: {exc}") from None
    if known is None:
        raise click.ClickException(f"--skip-done-in {name}: neither a dataset folder or URL nor a run the ledger knows")
    return known["output"]


def _earlier_for_enqueue(named: tuple[str, ...], skip_failed: bool, model_dir: str | None, precision: str | None,
                         folder: str, options: dict):  # fmt: skip
    """The chain --skip-done-in names (None: none), with the run's model put in `options`: the
    bundle's where --model names one, else the first named dataset's (said on stderr)."""
    chain = earlier_datasets(named, folder)
    if chain is None:
        return None
    from worker.sidecar import ModelSpec

    if model_dir:
        wanted = precision or default("precision")
        try:
            checksum = ModelSpec.load(Path(model_dir)).model_for(wanted)[1]
        except (ValueError, KeyError, OSError) as exc:
            raise click.ClickException(f"--model {model_dir} --precision {wanted}: {exc}") from None
        options.update(model_sha256=checksum or "0" * 64, precision=wanted)
    else:
        if precision:
            raise click.UsageError("--precision goes with --model (without it, the dataset's model and precision)")
        first = chain[0]
        options.update(model_sha256=first.model_sha256, precision=first.precision)
        click.echo(f"building on model {first.model_sha256[:12]} at {first.precision} (that of {first.location}); "
                   "workers serving another model refuse this run", err=True)  # fmt: skip
    return chain


def _follow(settings, run: str, interval: float, bar_wanted: bool) -> None:
    from tqdm import tqdm

    from worker.client.status import follow, format_status

    bar = tqdm(total=0, unit="img", desc=run, disable=not bar_wanted, dynamic_ncols=True)

    def show(status, rate) -> None:
        if bar_wanted:
            bar.total = status.total
            bar.update(status.done - bar.n)
        else:
            click.echo(format_status(status, rate), err=True)

    try:
        final = follow(open_store(settings), run, settings.queue, interval, show)
    finally:
        bar.close()
    click.echo(format_status(final), err=True)
    _exit_if_failed(final)


def _exit_if_failed(status) -> None:
    """A failed run ends the waiting client with status 1 and the reason."""
    if status.failed_run:
        raise click.ClickException(f"run {status.run} failed: {status.failed_reason}")


@click.command("status")
@click.argument("run")
@setting_option("broker_url")
@click.option("--watch", is_flag=True, help="Keep a live view until the run finishes (Ctrl-C to leave).")
@interval_option("--watch")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as one JSON object.")
def status_command(run: str, broker_url: str | None, watch: bool, interval: float, as_json: bool) -> None:
    """Show a run's total, done, failed, pending, images/s and ETA, and each worker's throughput."""
    from worker.client.status import follow, format_status
    from worker.ledger.activity import worker_activity

    settings = load_settings(broker_url=broker_url)
    store = open_run(settings, run)
    if as_json:
        status = store.status(run, settings.queue)
        fields = dataclasses.asdict(status) | {
            "pending": status.pending,
            "images_per_s": status.average_rate(),
            "workers": [
                dataclasses.asdict(w) | {"images_per_s": w.rate}
                for w in worker_activity(store.client, store.prefix, run)
            ],
        }
        click.echo(json.dumps(fields))
        if status.failed_run:
            sys.exit(1)
        return
    if not watch:
        workers = worker_activity(store.client, store.prefix, run)
        status = store.status(run, settings.queue)
        click.echo(format_status(status, workers=workers))
        if status.failed_run:
            sys.exit(1)
        return

    def show(status, rate) -> None:
        click.clear()
        click.echo(format_status(status, rate, worker_activity(store.client, store.prefix, run)))

    with contextlib.suppress(KeyboardInterrupt):
        final = follow(store, run, settings.queue, interval, show)
        _exit_if_failed(final)


@click.command("results")
@click.argument("run")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="FILE.jsonl, FILE.csv or FILE.parquet (.parquet: the dataset's own columns, docs/dataset.md).",
)
@setting_option("broker_url")
@click.option("--errors-only", is_flag=True, help="Only the error records: which images failed, and why.")
@click.option("--with-lineage", is_flag=True,
              help="Also the datasets it built on (--skip-done-in): one row per image, the newest winning.")  # fmt: skip
def results_command(run: str, out_path: Path, broker_url: str | None, errors_only: bool, with_lineage: bool) -> None:
    """Stream every row of RUN's dataset (a run name, or a finished dataset's folder or URL) to one
    file (format by extension), in constant memory. The dataset itself (OUTPUT/labels/*.parquet)
    reads as one table in DuckDB, pandas or pyarrow."""
    from worker.client.export import ExportError, export_run, format_for
    from worker.dataset.schema import DatasetError
    from worker.delta.lineage import LineageError

    try:
        format_for(out_path)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    pending = ""
    if is_url(run) or os.path.isdir(run):
        output = run
        _check_dataset(run)
    else:
        settings = load_settings(broker_url=broker_url)
        ledger = open_run(settings, run)
        status = ledger.status(run, settings.queue)
        output, pending = status.output, f" ({status.pending} images still pending)"
    try:
        count = export_run(output, out_path, errors_only=errors_only, with_lineage=with_lineage)
    except (ExportError, LineageError, DatasetError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{count} records written to {out_path}{pending}", err=True)


def _check_dataset(location: str) -> None:
    """A folder or URL named as a dataset must hold one (a manifest, shard files or a shard list):
    an image folder named by mistake would export nothing and say so with status 0."""
    from worker.dataset.files import shard_files
    from worker.dataset.manifest import manifest_path
    from worker.dataset.object_path import as_location
    from worker.dataset.shard_list import read_index

    where = as_location(location)
    try:
        found = manifest_path(where).is_file() or bool(shard_files(where)) or read_index(where) is not None
    except OSError as exc:
        raise click.ClickException(f"{location}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not found:
        raise click.ClickException(f"{location}: not a labeler dataset (no manifest.json, labels/*.parquet or "
                                   "shards/index.json): name a run, or the folder or URL a run wrote")  # fmt: skip


@click.command("retry")
@click.argument("run")
@click.option(
    "--code",
    "codes",
    multiple=True,
    type=click.Choice(sorted(str(code) for code in ErrorCode if code != ErrorCode.INFERENCE_FAILED)),
    help="Retry only images with this error code (repeatable; default: every failed image).",
)
@setting_option("broker_url")
@setting_option("queue")
@click.option("--wait", is_flag=True, help="Follow the run until every image has a row.")
@interval_option("--wait")
def retry_command(
    run: str, codes: tuple[str, ...], broker_url: str | None, queue: str | None, wait: bool, interval: float
) -> None:
    """Label RUN's failed images again (after fixing a mount, restoring files): each still ends
    with exactly one row, and the run's counts stay exact."""
    import redis

    from worker.client.retry import retry_failed

    settings = load_settings(broker_url=broker_url, queue=queue)
    ledger = open_run(settings, run)
    try:
        summary = retry_failed(ledger.client, run, settings.queue, codes, settings.key_prefix)
    except redis.exceptions.RedisError as exc:
        raise click.ClickException(
            f"Redis: {exc}. Shards reopened before it are queued in the ledger: enqueue the run again "
            f"(labeler enqueue --run {run} ...) to publish them"
        ) from None
    which = ", ".join(codes) if codes else "any error"
    click.echo(
        f"run {run}: {summary.shards} shards with failed images ({which} relabeled) queued again", err=True
    )
    if wait and summary.shards:
        _follow(settings, run, interval, sys.stderr.isatty())


COMMANDS = [enqueue_command, status_command, results_command, retry_command]
