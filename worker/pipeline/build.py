"""One way to build the labeling service, for `labeler run` and for every worker process.

Both describe what they want as a `ServiceConfig` (a worker fills it from its Settings by field
name) and call `build_service`, so the same settings give the same runner and options (max_pixels,
embeddings, thread counts under `--backend auto`) wherever the service runs: two builders would
drift apart. Its defaults are the settings table's (worker/setting_table.py), as are the worker's
and the `labeler run` flags', so both pick the same backend and caps for the same bundle. The
bundle is always a path: resolving the embedded default is the command line's job, so the runtime
never imports engine_build.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from worker.pipeline.decode_choice import create_stage
from worker.pipeline.reading import ReadPolicy
from worker.pipeline.service import LabelingService, ServiceObserver, ServiceOptions
from worker.runners.base import Runner, RunnerError
from worker.setting_table import default


@dataclass(frozen=True)
class ServiceConfig:
    """What to run and how: the settings `labeler run` flags and LABELER_* variables share (their
    meanings are in worker/setting_table.py)."""

    backend: str = default("backend")
    precision: str = default("precision")
    batch_size: int = default("batch_size")
    max_wait_ms: float = default("max_wait_ms")
    decode_threads: int = default("decode_threads")
    fetch_concurrency: int = default("fetch_concurrency")
    intra_op_threads: int = default("intra_op_threads")  # GPU backends ignore it
    top_k: int = default("top_k")
    embeddings: bool = default("embeddings")
    allowed_roots: tuple[str, ...] = default("allowed_roots")
    max_bytes: int = default("max_bytes")
    max_pixels: int = default("max_pixels")
    decode: str = default("decode")

    @classmethod
    def pick(cls, source: object) -> ServiceConfig:
        """The fields of the same names from `source` (a worker's Settings)."""
        return cls(**{item.name: getattr(source, item.name) for item in fields(cls)})


def create_service_runner(bundle: Path, config: ServiceConfig) -> Runner:
    """The runner `config` asks for, not loaded yet; a RunnerError names what is missing."""
    from worker.runners import create_runner  # looked up at call time: tests inject faulty runners

    runner = create_runner(
        Path(bundle),
        config.backend,
        precision=config.precision,
        intra_op_threads=config.intra_op_threads or None,
    )
    if config.embeddings and not runner.spec.features_output:
        raise RunnerError(
            f"{bundle} has no features output, so it cannot give embeddings (build it from PyTorch weights)"
        )
    return runner


def service_options(runner: Runner, config: ServiceConfig, observer: ServiceObserver | None) -> ServiceOptions:
    return ServiceOptions(
        max_batch_size=config.batch_size or runner.default_batch_size,
        max_wait_s=config.max_wait_ms / 1000.0,
        decode_threads=config.decode_threads,
        fetch_concurrency=config.fetch_concurrency,
        top_k=config.top_k,
        embeddings=config.embeddings,
        read_policy=ReadPolicy.create(list(config.allowed_roots), config.max_bytes),
        max_pixels=config.max_pixels,
        observer=observer,
    )


def build_service(
    bundle: Path, config: ServiceConfig, observer: ServiceObserver | None = None
) -> LabelingService:
    """The labeling service for `bundle`, not started (start() loads the engine on its thread)."""
    runner = create_service_runner(bundle, config)
    stage = create_stage(config.decode, runner)  # RunnerError: why `gpu` cannot be here
    return LabelingService(runner, service_options(runner, config, observer), stage)
