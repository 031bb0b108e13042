"""`labeler worker`: a Celery worker that labels jobs from the queue, one per GPU (or per CPU host)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import click

from worker.cli.bundle import resolve_bundle
from worker.cli.common import BROKER_HELP, load_settings
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
    help="Only read files under DIR, or objects under a URL prefix (s3://bucket/prefix/); repeatable.",
)
@click.option("--broker", help=BROKER_HELP)
@click.option("--queue", help="Queue to consume (default: $LABELER_QUEUE or 'labeler').")
@click.option("--backend", help="Runner backend (default: onnxruntime, or tensorrt with --gpu).")
@click.option("--precision", help="Which model of the bundle to run (fp32, fp16, int8; int8 on ONNX Runtime runs the bundle's cpu-int8 model).")
@click.option(
    "--decode",
    type=click.Choice(["cpu", "gpu", "auto"]),
    help="Decode stage: cpu (OpenCV, default), gpu (nvImageCodec, torch-cuda backend), auto.",
)
@click.option(
    "--concurrency", type=int, help="Jobs in flight per worker; they share engine batches (default 4)."
)
@click.option(
    "--batch-size", type=int, help="Largest engine batch (default: 32 on the CPU, 128 on a GPU backend)."
)
@click.option("--max-wait-ms", type=float, help="Longest wait to fill a batch.")
@click.option("--fetch-concurrency", type=int, help="Object URLs (s3://) read at once per worker (default 32; 0: on the decode threads).")
@click.option("--hostname", "-n", help="Celery node name (default labeler-gpuN@HOST with --gpu, else labeler-PID@HOST).")
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
        model=os.path.abspath(model_dir) if model_dir else None,
        allowed_roots=tuple(r if is_url(r) else os.path.abspath(r) for r in allowed_roots),
        broker_url=broker,
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
