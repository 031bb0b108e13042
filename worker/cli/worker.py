"""`labeler worker`: a Celery worker that labels jobs from the queue, one per GPU (or per CPU host)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import click

from worker.cli.bundle import resolve_bundle
from worker.cli.common import load_settings, setting_option
from worker.dataset.storage import is_url

log = logging.getLogger(__name__)


def default_node_name(gpu: int | None, pid: int | None = None) -> str:
    """One name per worker on a host: per GPU it is stable across restarts (dashboards keep their
    series); CPU workers take their process id, so two on one host never merge in Celery or in the
    run's per-worker activity."""
    if gpu is not None:
        return f"labeler-gpu{gpu}@%h"
    return f"labeler-{pid or os.getpid()}@%h"


@click.command("worker")
@setting_option("model", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--gpu", type=int, help="Pin this worker to GPU N (CUDA_VISIBLE_DEVICES); default backend tensorrt."
)
@setting_option("allowed_roots", type=click.Path())
@setting_option("broker_url")
@setting_option("queue")
@setting_option("backend")
@setting_option("precision")
@setting_option("decode")
@setting_option("concurrency")
@setting_option("batch_size")
@setting_option("max_wait_ms")
@setting_option("fetch_concurrency")
@click.option("--hostname", "-n", help="Celery node name (default labeler-gpuN@HOST with --gpu, else labeler-PID@HOST).")
@click.option("--loglevel", "-l", default="INFO", show_default=True)
@setting_option("pool")
@click.option("--include", "includes", multiple=True, help="Extra task modules to import (repeatable).")
def worker_command(
    model: str | None,
    gpu: int | None,
    allowed_roots: tuple[str, ...],
    broker_url: str | None,
    queue: str | None,
    backend: str | None,
    precision: str | None,
    decode: str | None,
    concurrency: int | None,
    batch_size: int | None,
    max_wait_ms: float | None,
    fetch_concurrency: int | None,
    hostname: str | None,
    loglevel: str,
    pool: str | None,
    includes: tuple[str, ...],
) -> None:
    """Run a Celery worker that labels jobs from the queue (the engine loads inside this process)."""
    from worker.pipeline.build import ServiceConfig, create_service_runner
    from worker.pipeline.decode_choice import create_stage
    from worker.runners import RunnerError
    from worker.runners.onnxruntime_runner import OnnxRuntimeRunner

    if backend is None and gpu is not None:
        backend = "tensorrt"
    settings = load_settings(
        model=os.path.abspath(model) if model else None,
        allowed_roots=tuple(r if is_url(r) else os.path.abspath(r) for r in allowed_roots),
        broker_url=broker_url,
        queue=queue,
        backend=backend,
        precision=precision,
        decode=decode,
        concurrency=concurrency,
        batch_size=batch_size,
        max_wait_ms=max_wait_ms,
        fetch_concurrency=fetch_concurrency,
        pool=pool,
    )
    bundle = resolve_bundle(Path(settings.model) if settings.model else None, echo=log.warning)
    settings = dataclasses.replace(settings, model=os.path.abspath(bundle))
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    try:  # fail now, not on every job: the backend and the precision's model must be there
        runner = create_service_runner(bundle, ServiceConfig.pick(settings))
        if isinstance(runner, OnnxRuntimeRunner):
            runner.check_files()
        create_stage(settings.decode, runner)  # --decode gpu that cannot work here fails now
    except (RunnerError, OSError, ValueError) as exc:
        raise click.ClickException(f"cannot serve {bundle}: {exc}") from None
    os.environ.update(settings.env())  # pool children and the tasks module read the same values

    from worker.celery_worker.app import app, configure

    configure(app, settings)
    name = hostname or default_node_name(gpu)
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
        from worker.celery_worker.health import EXIT_ENGINE_BROKEN
        from worker.celery_worker.tasks import LabelerTask

        failure = LabelerTask.process.health.failure
        if failure is not None:  # overrides Celery's exit 0 after the warm shutdown it asked for
            click.echo(f"labeler worker stopped: its engine is broken ({failure})", err=True)
            raise SystemExit(EXIT_ENGINE_BROKEN)


COMMANDS = [worker_command]
