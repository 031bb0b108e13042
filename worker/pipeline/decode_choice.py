"""Choosing the decode stage (`--decode cpu|gpu|auto`), as worker/runners chooses a runner: the GPU
stage is imported only when chosen, and asking whether it can work imports nothing heavy and
touches no CUDA, so a Celery parent can ask before it forks."""

from __future__ import annotations

import importlib.util
import logging

from worker.pipeline.decode_stage import DECODE_CHOICES, CpuDecodeStage, DecodeStage
from worker.runners.base import Runner, RunnerError

log = logging.getLogger(__name__)


def gpu_stage_problem(runner: Runner) -> str | None:
    """Why the GPU stage cannot serve `runner` here (None: it can). Imports nothing heavy and
    touches no CUDA, so a Celery parent can ask before it forks."""
    if runner.batch_device is None:
        return f"the {runner.name} runner cannot take batches in device memory (use --backend torch-cuda)"
    try:
        found = importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except ImportError:  # no `nvidia` namespace package at all
        found = False
    if not found:
        return "nvImageCodec is not installed (pip install 'resnet-labeler[gpu-decode]')"
    return None


def create_stage(kind: str, runner: Runner) -> DecodeStage:
    """The stage `--decode kind` asks for, not loaded; RunnerError when `gpu` cannot work here."""
    if kind not in DECODE_CHOICES:
        raise RunnerError(f"unknown decode stage {kind!r}; choose one of {', '.join(DECODE_CHOICES)}")
    if kind == "cpu":
        return CpuDecodeStage()
    problem = gpu_stage_problem(runner)
    if problem is not None:
        if kind == "gpu":
            raise RunnerError(f"--decode gpu: {problem}")
        log.info("decode auto: cpu (%s)", problem)
        return CpuDecodeStage()
    from worker.pipeline.gpu_decode import GpuDecodeStage

    if kind == "auto":
        log.info("decode auto: gpu (nvImageCodec on %s)", runner.batch_device)
    return GpuDecodeStage(runner.spec, device=runner.batch_device, optional=kind == "auto")
