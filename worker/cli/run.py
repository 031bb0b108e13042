"""`labeler run` and `labeler inspect`: the one-process labeler and a look inside a bundle."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from worker.cli.bundle import resolve_bundle
from worker.cli.common import (
    container_options,
    earlier_datasets,
    embedding_dtype_option,
    input_entries,
    setting_option,
)
from worker.dataset.object_path import Location, ObjectPath
from worker.dataset.storage import is_url
from worker.sidecar import ModelSpec, summarize


def run_option(name: str, **overrides: Any) -> Callable:
    """A setting's flag as `labeler run` has it: it reads no LABELER_* variable, so the table's
    default (worker/setting_table.py), a worker's default too, is the flag's own."""
    return setting_option(name, from_env=False, **overrides)


@click.command("inspect")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
def inspect(bundle: Path) -> None:
    """Print a bundle's sidecar in a readable form."""
    click.echo(summarize(ModelSpec.load(bundle), bundle))


@click.command("run")
@click.argument("inputs", nargs=-1, required=True)
@run_option("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_text",
    default="results.jsonl",
    show_default=True,
    help="A JSON-lines results file, or DIR/ (a trailing slash, or an existing folder): a Parquet "
    "dataset of one file per shard, the layout of a distributed run.",
)
@run_option("shard_size")
@embedding_dtype_option("With --embeddings and --out DIR/: the embedding column's type.")
@run_option("allowed_roots")
@click.option("--resume", is_flag=True, help="Skip inputs that already have a record in --out.")
@click.option(
    "--retry-errors",
    is_flag=True,
    help="With --resume: drop the error records from --out first, so those images are tried again.",
)
@click.option(
    "--skip-done-in",
    "skip_done_in",
    multiple=True,
    metavar="DIR_OR_URL",
    help="With --out DIR/: an earlier dataset (and those it built on); inputs it holds labeled by this "
    "model and precision, unchanged since (size and mtime, ETag), are left out. Repeatable.",
)
@click.option("--skip-failed", is_flag=True,
              help="With --skip-done-in: also leave out inputs whose earlier row is an error (default: retry them).")  # fmt: skip
@run_option("top_k")
@run_option("embeddings")
@run_option("batch_size")
@run_option("max_wait_ms")
@run_option("decode_threads")
@run_option("fetch_concurrency")
@run_option("intra_op_threads")
@run_option("precision")
@run_option("backend")
@run_option("decode")
@run_option("max_bytes")
@run_option("max_pixels")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a TTY).")
@container_options
def run(
    inputs: tuple[str, ...],
    model: Path | None,
    out_text: str,
    shard_size: int,
    embedding_dtype: str,
    allowed_roots: tuple[str, ...],
    resume: bool,
    retry_errors: bool,
    skip_done_in: tuple[str, ...],
    skip_failed: bool,
    top_k: int,
    embeddings: bool,
    batch_size: int,
    max_wait_ms: float,
    decode_threads: int,
    fetch_concurrency: int,
    intra_op_threads: int,
    precision: str,
    backend: str,
    decode: str,
    max_bytes: int,
    max_pixels: int,
    progress: bool | None,
    image_ext: str | None,
    image_column: str | None,
    key_column: str | None,
    samples_per_shard: int | None,
) -> None:
    """Label INPUTS (files, directories, @list files, - for stdin, .parquet/.csv manifests, WebDataset
    .tar shards, Parquet files of image bytes) into a JSONL file or a Parquet dataset folder."""
    from tqdm import tqdm

    from worker.local.run import run_local
    from worker.pipeline.build import ServiceConfig, build_service
    from worker.pipeline.inputs import InputError
    from worker.runners import RunnerError

    entries = input_entries(inputs, image_ext, image_column, key_column, samples_per_shard)
    into_dataset = is_url(out_text) or out_text.endswith(os.sep) or Path(out_text).is_dir()
    if (skip_done_in or skip_failed) and not into_dataset:
        raise click.UsageError("--skip-done-in and --skip-failed need --out DIR/ (a dataset: its rows record "
                               "the model and each source's version; a JSON-lines file does not)")  # fmt: skip
    if skip_failed and not skip_done_in:
        raise click.UsageError("--skip-failed goes with --skip-done-in (which earlier rows to trust)")
    chain = earlier_datasets(skip_done_in, out_text)
    bundle = resolve_bundle(model)
    spec = ModelSpec.load(bundle)
    for warning in spec.warnings:
        click.secho(f"WARNING: {warning}", fg="red", bold=True, err=True)
    config = ServiceConfig(
        backend=backend,
        precision=precision,
        batch_size=batch_size,
        max_wait_ms=max_wait_ms,
        decode_threads=decode_threads,
        fetch_concurrency=fetch_concurrency,
        intra_op_threads=intra_op_threads,
        top_k=top_k,
        embeddings=embeddings,
        allowed_roots=allowed_roots,
        max_bytes=max_bytes,
        max_pixels=max_pixels,
        decode=decode,
    )
    try:
        service = build_service(bundle, config)
    except RunnerError as exc:
        raise click.ClickException(str(exc)) from None
    if is_url(out_text):  # an object store holds datasets only: one PUT per file, no appending
        if not out_text.endswith("/"):
            raise click.UsageError(f"--out {out_text}: an object URL must be a dataset prefix ending in /")
        _run_into_dataset(inputs, entries, service, ObjectPath(out_text), resume, retry_errors, shard_size,
                          embedding_dtype, progress, chain, skip_failed)  # fmt: skip
        return
    out_path = Path(out_text)
    if out_text.endswith(os.sep) or out_path.is_dir():
        _check_folder(out_text, out_path)
        _run_into_dataset(inputs, entries, service, out_path, resume, retry_errors, shard_size, embedding_dtype, progress,
                          chain, skip_failed)  # fmt: skip
        return
    if retry_errors:
        from worker.local.results import drop_error_records

        resume = True
        click.echo(f"{drop_error_records(out_path)} error records dropped from {out_path} to retry", err=True)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=0, unit="img", disable=not show, dynamic_ncols=True, smoothing=0.1)

    def on_total(total: int) -> None:
        bar.total = total
        bar.refresh()

    try:
        summary = run_local(
            entries,
            service,
            out_path,
            resume,
            on_record=lambda _rec: bar.update(1),
            on_total=on_total,
        )
    except (RunnerError, InputError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        bar.close()
        click.echo(
            f"interrupted: images in flight were finished and written to {out_path}; "
            "run the same command with --resume to go on",
            err=True,
        )
        sys.exit(130)
    finally:
        bar.close()
    _finish(summary, f"results in {os.path.abspath(out_path)}", spec.warnings)


def _finish(summary, where: str, warnings: tuple[str, ...] = ()) -> None:
    """The summary on stderr, where the labels are, the bundle's warnings again; exit 1 if not complete."""
    for line in summary.lines():
        click.echo(line, err=True)
    click.echo(where, err=True)
    for warning in warnings:
        click.secho(f"WARNING: {warning}", fg="red", bold=True, err=True)
    if not summary.complete:
        sys.exit(1)


def _check_folder(out_text: str, out_dir: Path) -> None:
    """A dataset is a folder: say so in one line when --out, or a folder above it, is a file."""
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise click.ClickException(f"--out {out_text}: {folder} is a file, not a folder")
            return


def _run_into_dataset(
    inputs: tuple[str, ...], entries, service, out_dir: Location, resume: bool, retry_errors: bool, shard_size: int,
    embedding_dtype: str, progress: bool | None, chain=None, skip_failed: bool = False,
) -> None:  # fmt: skip
    from tqdm import tqdm

    from worker.dataset.files import DatasetError
    from worker.dataset.shard_list import ShardListError
    from worker.delta.lineage import LineageError
    from worker.local.dataset_run import DatasetExists, run_local_dataset
    from worker.local.shard_writer import DatasetWriteFailed
    from worker.pipeline.inputs import InputError, can_repeat
    from worker.runners import RunnerError

    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=None, unit="img", disable=not show, dynamic_ncols=True, smoothing=0.1)
    try:
        summary = run_local_dataset(entries, service, out_dir, resume=resume,
                                    retry_errors=retry_errors, shard_size=shard_size,
                                    embedding_dtype=embedding_dtype, on_record=lambda _rec: bar.update(1),
                                    deduplicate=can_repeat(inputs), skip_done_in=chain, skip_failed=skip_failed)  # fmt: skip
    except (DatasetExists, DatasetWriteFailed, DatasetError, ShardListError, RunnerError, InputError, OSError,
            LineageError) as exc:  # fmt: skip
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        bar.close()
        click.echo(f"interrupted: finished shards are in {out_dir}; run the same command with --resume", err=True)
        sys.exit(130)
    finally:
        bar.close()
    where = out_dir.url if isinstance(out_dir, ObjectPath) else os.path.abspath(out_dir)
    _finish(summary, f"dataset in {where}/labels/*.parquet", service.runner.spec.warnings)


COMMANDS = [inspect, run]
