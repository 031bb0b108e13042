"""`labeler worker | enqueue | status | results`: the distributed labeler from the command line.

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

from worker.errors import ErrorCode

BROKER_HELP = "Redis URL (broker and results); default: $LABELER_BROKER_URL."


def _settings(**overrides: object):
    from worker.settings import Settings, SettingsError

    try:
        base = Settings.from_env()
        given = {k: v for k, v in overrides.items() if v not in (None, ())}
        return dataclasses.replace(base, **given).validated()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _client(url: str):
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)


def _store(settings):
    from worker.run_store import RunStore

    return RunStore(_client(settings.broker_url), settings.key_prefix)


def _run_exists(store, run: str) -> bool:
    """Whether the run exists; Redis errors (auth, connection, TLS) become a one-line message."""
    import redis

    try:
        return store.exists(run)
    except redis.exceptions.RedisError as exc:
        raise click.ClickException(f"Redis: {exc}") from None


@click.command("worker")
@click.option(
    "--model", "model_dir", type=click.Path(exists=True, file_okay=False), help="Model bundle to serve."
)
@click.option(
    "--gpu", type=int, help="Pin this worker to GPU N (CUDA_VISIBLE_DEVICES); default backend tensorrt."
)
@click.option(
    "--allowed-root",
    "allowed_roots",
    multiple=True,
    type=click.Path(),
    help="Only read files under DIR (repeatable).",
)
@click.option("--broker", help=BROKER_HELP)
@click.option("--queue", help="Queue to consume (default: $LABELER_QUEUE or 'labeler').")
@click.option("--backend", help="Runner backend (default: onnxruntime, or tensorrt with --gpu).")
@click.option("--precision", help="Which model of the bundle to run (fp32, fp16, int8).")
@click.option(
    "--concurrency", type=int, help="Jobs in flight per worker; they share engine batches (default 4)."
)
@click.option(
    "--batch-size", type=int, help="Largest engine batch (default: 32 on the CPU, 128 on a GPU backend)."
)
@click.option("--max-wait-ms", type=float, help="Longest wait to fill a batch.")
@click.option("--hostname", "-n", help="Celery node name (default labeler[-gpuN]@HOST).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@click.option(
    "--pool",
    type=click.Choice(["threads", "solo", "prefork"]),
    help="threads: one engine shared by all jobs of the process (the design); prefork: one engine per child.",
)
@click.option("--include", "includes", multiple=True, help="Extra task modules to import (repeatable).")
def worker_command(
    model_dir: str | None,
    gpu: int | None,
    allowed_roots: tuple[str, ...],
    broker: str | None,
    queue: str | None,
    backend: str | None,
    precision: str | None,
    concurrency: int | None,
    batch_size: int | None,
    max_wait_ms: float | None,
    hostname: str | None,
    loglevel: str,
    pool: str | None,
    includes: tuple[str, ...],
) -> None:
    """Run a Celery worker that labels jobs from the queue (the engine loads inside this process)."""
    from worker.runners import RunnerError, create_runner
    from worker.runners.onnxruntime_runner import OnnxRuntimeRunner
    from worker.sidecar import ModelSpec

    if backend is None and gpu is not None:
        backend = "tensorrt"
    settings = _settings(
        model=os.path.abspath(model_dir) if model_dir else None,
        allowed_roots=tuple(os.path.abspath(r) for r in allowed_roots),
        broker_url=broker,
        queue=queue,
        backend=backend,
        precision=precision,
        concurrency=concurrency,
        batch_size=batch_size,
        max_wait_ms=max_wait_ms,
        pool=pool,
    )
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if settings.model:
        try:
            ModelSpec.load(Path(settings.model))
            # Fail now, not on every job: the backend and the precision's model must be there.
            runner = create_runner(Path(settings.model), settings.backend, variant=settings.precision)
            if isinstance(runner, OnnxRuntimeRunner):
                runner.check_files()
        except (RunnerError, OSError, ValueError) as exc:
            raise click.ClickException(f"cannot serve {settings.model}: {exc}") from None
    os.environ.update(settings.env())  # pool children and the tasks module read the same values

    from worker.celery_app import app, configure

    configure(app, settings)
    name = hostname or (f"labeler-gpu{gpu}@%h" if gpu is not None else "labeler@%h")
    argv = [
        "worker",
        "-l",
        loglevel,
        "-Q",
        settings.queue,
        "-c",
        str(settings.concurrency),
        "-P",
        settings.pool,
        "-n",
        name,
    ]
    for module in includes:
        argv += ["--include", module]
    try:
        app.worker_main(argv)
    finally:
        from worker.worker_health import EXIT_ENGINE_BROKEN, engine_failure

        failure = engine_failure()
        if failure is not None:  # overrides Celery's exit 0 after the warm shutdown it asked for
            click.echo(f"labeler worker stopped: its engine is broken ({failure})", err=True)
            raise SystemExit(EXIT_ENGINE_BROKEN)


@click.command("enqueue")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--run", "run_name", help="Run name (default: a new one, printed). Reuse it to resume.")
@click.option("--broker", help=BROKER_HELP)
@click.option("--queue", help="Queue to publish to (default: $LABELER_QUEUE or 'labeler').")
@click.option("--chunk-size", type=int, help="Paths per job (default 500).")
@click.option("--max-queued", type=int, help="Wait while the queue holds more jobs than this (default 2000).")
@click.option("--wait", is_flag=True, help="Follow the run until every image has a record.")
@click.option(
    "--interval", type=float, default=2.0, show_default=True, help="Seconds between --wait updates."
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a TTY).")
def enqueue_command(
    inputs: tuple[str, ...],
    run_name: str | None,
    broker: str | None,
    queue: str | None,
    chunk_size: int | None,
    max_queued: int | None,
    wait: bool,
    interval: float,
    progress: bool | None,
) -> None:
    """Publish INPUTS (files, directories, @list files, - for stdin) as jobs of a run; print the run id."""
    import redis
    from tqdm import tqdm

    from worker.client.enqueue import enqueue_paths
    from worker.inputs import iter_input_paths
    from worker.run_store import RunNameError

    settings = _settings(broker_url=broker, queue=queue, chunk_size=chunk_size, max_queued_jobs=max_queued)
    run = run_name or time.strftime("run-%Y%m%d-%H%M%S-") + os.urandom(3).hex()
    click.echo(run)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=None, unit="path", desc="enqueue", disable=not show, dynamic_ncols=True)

    def on_progress(summary) -> None:
        bar.update(summary.seen - bar.n)

    client = _client(settings.broker_url)
    try:
        summary = enqueue_paths(
            client,
            run,
            iter_input_paths(inputs),
            settings.queue,
            settings.chunk_size,
            settings.max_queued_jobs,
            settings.key_prefix,
            on_progress=on_progress,
        )
    except RunNameError as exc:
        raise click.ClickException(str(exc)) from None
    except redis.exceptions.RedisError as exc:
        raise click.ClickException(f"Redis: {exc} (enqueue again with --run {run} to resume)") from None
    finally:
        bar.close()
    click.echo(
        f"run {run}: {summary.seen} paths, {summary.queued} queued in {summary.jobs} jobs, "
        f"{summary.skipped} already done; {summary.seconds:.1f} s"
        + (f" ({summary.waited_s:.0f} s waiting for the queue)" if summary.waited_s else ""),
        err=True,
    )
    if wait and summary.seen == 0:
        click.echo("nothing to wait for: the inputs named no paths", err=True)
    elif wait:
        _follow(settings, run, interval, show)


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
        final = follow(_store(settings), run, settings.queue, interval, show)
    finally:
        bar.close()
    click.echo(format_status(final), err=True)


@click.command("status")
@click.argument("run")
@click.option("--broker", help=BROKER_HELP)
@click.option("--watch", is_flag=True, help="Keep a live view until the run finishes (Ctrl-C to leave).")
@click.option(
    "--interval", type=float, default=2.0, show_default=True, help="Seconds between --watch updates."
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as one JSON object.")
def status_command(run: str, broker: str | None, watch: bool, interval: float, as_json: bool) -> None:
    """Show a run's total, done, failed, pending, images/s and ETA, and each worker's throughput."""
    from worker.activity_store import worker_activity
    from worker.client.status import follow, format_status

    settings = _settings(broker_url=broker)
    store = _store(settings)
    if not _run_exists(store, run):
        raise click.ClickException(f"no run named {run!r} in {settings.key_prefix}:run:*")
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
        return
    if not watch:
        workers = worker_activity(store.client, store.prefix, run)
        click.echo(format_status(store.status(run, settings.queue), workers=workers))
        return

    def show(status, rate) -> None:
        click.clear()
        click.echo(format_status(status, rate, worker_activity(store.client, store.prefix, run)))

    with contextlib.suppress(KeyboardInterrupt):
        follow(store, run, settings.queue, interval, show)


@click.command("results")
@click.argument("run")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="FILE.jsonl, FILE.csv or FILE.parquet.",
)
@click.option("--broker", help=BROKER_HELP)
@click.option("--errors-only", is_flag=True, help="Only the error records: which images failed, and why.")
def results_command(run: str, out_path: Path, broker: str | None, errors_only: bool) -> None:
    """Stream every record of RUN to a file (format by extension), in constant memory."""
    from worker.client.export import ExportError, export_records, format_for

    settings = _settings(broker_url=broker)
    try:
        format_for(out_path)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    store = _store(settings)
    if not _run_exists(store, run):
        raise click.ClickException(f"no run named {run!r}")
    try:
        records = store.iter_records(run)
        if errors_only:
            records = (record for record in records if "error" in record)
        count = export_records(records, out_path)
    except ExportError as exc:
        raise click.ClickException(str(exc)) from None
    status = store.status(run, settings.queue)
    click.echo(f"{count} records written to {out_path} ({status.pending} images still pending)", err=True)


@click.command("retry")
@click.argument("run")
@click.option(
    "--code",
    "codes",
    multiple=True,
    type=click.Choice(sorted(str(code) for code in ErrorCode if code != ErrorCode.INFERENCE_FAILED)),
    help="Retry only images with this error code (repeatable; default: every failed image).",
)
@click.option("--broker", help=BROKER_HELP)
@click.option("--queue", help="Queue to publish to (default: $LABELER_QUEUE or 'labeler').")
@click.option("--wait", is_flag=True, help="Follow the run until every image has a record.")
@click.option(
    "--interval", type=float, default=2.0, show_default=True, help="Seconds between --wait updates."
)
def retry_command(
    run: str, codes: tuple[str, ...], broker: str | None, queue: str | None, wait: bool, interval: float
) -> None:
    """Label RUN's failed images again (after fixing a mount, restoring files): each still ends
    with exactly one record, and the run's counts stay exact."""
    import redis

    from worker.client.retry import retry_failed

    settings = _settings(broker_url=broker, queue=queue)
    store = _store(settings)
    if not _run_exists(store, run):
        raise click.ClickException(f"no run named {run!r} in {settings.key_prefix}:run:*")
    try:
        summary = retry_failed(
            store.client, run, settings.queue, codes, settings.chunk_size, settings.max_queued_jobs,
            settings.key_prefix,
        )  # fmt: skip
    except redis.exceptions.RedisError as exc:
        raise click.ClickException(
            f"Redis: {exc}. Images reopened before it are pending now: enqueue the run's inputs "
            f"again with --run {run} to publish them"
        ) from None
    which = ", ".join(codes) if codes else "any error"
    click.echo(
        f"run {run}: {summary.queued} failed images ({which}) queued again in {summary.jobs} jobs", err=True
    )
    if wait and summary.queued:
        _follow(settings, run, interval, sys.stderr.isatty())


COMMANDS = [worker_command, enqueue_command, status_command, results_command, retry_command]
