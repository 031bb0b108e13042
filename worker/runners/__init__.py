"""Runners: one life cycle (load -> infer -> close) for every backend, and choosing one.

Backends are imported by name only when chosen, so a CPU worker never imports tensorrt, pycuda
or torch. Choosing never touches CUDA either (the GPU is identified through nvidia-smi): a CUDA
context made before Celery forks its pool would be unusable in the children.
"""

from __future__ import annotations

import importlib.util
import logging
from importlib import metadata
from pathlib import Path

from worker.runners.base import InferenceOutput, Runner, RunnerError
from worker.setting_table import SETTINGS, default

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = SETTINGS["backend"].choices or ()
_TENSORRT_DISTRIBUTIONS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12")


def create_runner(
    bundle_dir: Path,
    backend: str = default("backend"),
    *,
    precision: str = default("precision"),
    intra_op_threads: int | None = None,
) -> Runner:
    """Build (not load) the runner for `backend`; `load()` happens in the process that infers.

    `precision` names the bundle's model (fp32, fp16, int8) for every backend; `intra_op_threads`
    is ONNX Runtime's thread count (None: one per core), which the GPU backends do not need. A
    forced backend that cannot run here fails now, with what to install or build.
    """
    from worker.sidecar import ModelSpec

    bundle_dir = Path(bundle_dir)
    spec = ModelSpec.load(bundle_dir)
    if backend == "auto":
        backend, reason = choose_backend(bundle_dir, spec, precision)
        log.info("backend auto: %s (%s)", backend, reason)
    if backend == "onnxruntime":
        from worker.runners.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(bundle_dir, spec, precision=precision, intra_op_threads=intra_op_threads)
    if backend == "tensorrt":
        missing = [m for m in ("tensorrt", "pycuda") if importlib.util.find_spec(m) is None]
        if missing:
            raise RunnerError(
                f"backend tensorrt needs {' and '.join(missing)}: pip install 'resnet-labeler[tensorrt]' "
                "on a node with an NVIDIA driver"
            )
        from worker.runners.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(bundle_dir, spec, precision=precision)
    if backend == "torch-cuda":
        problem = torch_cuda_problem(spec, precision)
        if problem:
            raise RunnerError(f"backend torch-cuda: {problem}")
        from worker.runners.torch_cuda_runner import TorchCudaRunner

        return TorchCudaRunner(bundle_dir, spec, precision=precision)
    raise RunnerError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def choose_backend(bundle_dir: Path, spec, precision: str) -> tuple[str, str]:
    """TensorRT where an engine for this GPU exists, then PyTorch CUDA, then ONNX Runtime (CPU)."""
    from worker.runners.engine_records import load_records, mismatches
    from worker.runners.gpu_info import visible_gpu

    gpu = visible_gpu()
    if gpu is None:
        return "onnxruntime", "no NVIDIA GPU visible"
    trt_version = installed_tensorrt_version()
    if trt_version is not None and importlib.util.find_spec("pycuda") is not None:
        for record in load_records(bundle_dir):
            if not mismatches(record, spec, precision, gpu, trt_version):
                return "tensorrt", f"engine {record['engine_file']} fits {gpu.name}"
    problem = torch_cuda_problem(spec, precision, gpu_checked=True)
    if problem is None:
        return "torch-cuda", f"no TensorRT engine for {gpu.name} and {precision}; PyTorch is installed"
    return "onnxruntime", f"no TensorRT engine for {gpu.name}; torch-cuda unusable ({problem})"


def installed_tensorrt_version() -> str | None:
    """TensorRT's version from package metadata, without importing it."""
    for name in _TENSORRT_DISTRIBUTIONS:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def torch_cuda_problem(spec, precision: str, gpu_checked: bool = False) -> str | None:
    """Why the PyTorch CUDA runner cannot serve this bundle here (None: it can)."""
    from worker.runners.gpu_info import visible_gpu

    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed (pip install 'resnet-labeler[torch-cuda]')"
    if not gpu_checked and visible_gpu() is None:
        return "no NVIDIA GPU visible (nvidia-smi lists none)"
    if precision not in ("fp32", "fp16"):
        return f"it computes in FP16 from the FP32 weights; there is no {precision} mode (use tensorrt)"
    if spec.source.get("kind") != "pytorch":
        return (
            "it rebuilds the ResNet-50 from the bundle's weights, so it needs a bundle built with --weights"
        )
    import torch  # importing creates no CUDA context; torch.version.cuda is None in CPU-only builds

    if torch.version.cuda is None:
        return f"this PyTorch ({torch.__version__}) is a CPU-only build"
    return None


__all__ = ["BACKENDS", "InferenceOutput", "Runner", "RunnerError", "choose_backend", "create_runner"]
