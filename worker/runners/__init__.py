"""Runners: one life cycle (load -> infer -> close) for every backend.

Backends are imported by name only when chosen, so a CPU worker never imports tensorrt, pycuda
or torch.
"""

from __future__ import annotations

from pathlib import Path

from worker.runners.base import InferenceOutput, Runner, RunnerError

BACKENDS = ("onnxruntime", "tensorrt", "torch-cuda")


def create_runner(bundle_dir: Path, backend: str = "onnxruntime", **options: object) -> Runner:
    """Build (not load) the runner for `backend`; `load()` happens in the process that infers."""
    if backend == "onnxruntime":
        from worker.runners.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(bundle_dir, **options)
    raise RunnerError(f"unknown or unavailable backend {backend!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "InferenceOutput", "Runner", "RunnerError", "create_runner"]
