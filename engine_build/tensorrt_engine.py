"""Bundle ONNX -> TensorRT engine for this node's GPU (TensorRT 11: strongly typed networks).

Precision comes from the ONNX chosen (model.onnx, model.fp16.onnx or model.int8.onnx with Q/DQ),
not from builder flags, which TensorRT 11 removed. The build sets an optimization profile for the
dynamic batch (min/opt/max), a workspace limit and the builder optimization level, and reuses a
timing cache persisted in the bundle. Each engine is written as engines/<stem>.engine with a JSON
record beside it; the stem and the record carry the GPU name, compute capability, TensorRT version,
precision and the ONNX checksum, so a worker can tell whether an engine was made for its node.

Not run against a real TensorRT in this project's CI: tests drive it through a recording fake.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine_build.errors import BuildError
from worker.runners.gpu_info import GpuInfo, gpu_slug, visible_gpu
from worker.sidecar import ModelSpec, sha256_file

ENGINE_DIR = "engines"


@dataclass(frozen=True)
class EngineSettings:
    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 128
    max_batch: int = 256
    workspace_mib: int = 4096
    optimization_level: int = 3  # TensorRT's default; 4-5 search longer for faster kernels
    # One identical profile per concurrent execution context: with dynamic shapes a profile is safe
    # to use from one context at a time, and the runner keeps two batches in flight.
    profiles: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"need 1 <= min <= opt <= max batch, got {self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )
        if not 0 <= self.optimization_level <= 5:
            raise ValueError("optimization level is 0..5")
        if self.profiles < 1:
            raise ValueError("need at least one optimization profile")


def onnx_for_precision(spec: ModelSpec, bundle_dir: Path, precision: str) -> tuple[Path, str]:
    """The bundle's ONNX file for this precision and its recorded checksum."""
    try:
        name, sha256 = spec.model_for(precision)
    except KeyError:
        raise BuildError(
            f"bundle has no {precision} model; add it first: labeler build {bundle_dir} --precision {precision}"
        ) from None
    return Path(bundle_dir) / name, sha256


def engine_stem(precision: str, gpu: GpuInfo, trt_version: str, max_batch: int) -> str:
    """e.g. model.fp16.nvidia-h100-80gb-hbm3.sm90.trt11.4.0.b256"""
    capability = gpu.compute_capability.replace(".", "")
    return f"model.{precision}.{gpu_slug(gpu.name)}.sm{capability}.trt{trt_version}.b{max_batch}"


def timing_cache_path(bundle_dir: Path, gpu: GpuInfo, trt_version: str) -> Path:
    """Timing caches are valid for one GPU model and TensorRT version: one file per pair."""
    capability = gpu.compute_capability.replace(".", "")
    return (
        Path(bundle_dir) / ENGINE_DIR / f"timing.{gpu_slug(gpu.name)}.sm{capability}.trt{trt_version}.cache"
    )


def build_engine(
    bundle_dir: Path,
    settings: EngineSettings,
    gpu: GpuInfo | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build, write and describe one engine; returns its JSON record."""
    import tensorrt as trt

    bundle_dir = Path(bundle_dir)
    spec = ModelSpec.load(bundle_dir)
    gpu = gpu or visible_gpu()
    if gpu is None:
        raise BuildError(
            "no NVIDIA GPU visible (nvidia-smi lists none): TensorRT engines are built on the GPU node"
        )
    onnx_path, onnx_sha = onnx_for_precision(spec, bundle_dir, settings.precision)
    if sha256_file(onnx_path) != onnx_sha:
        raise BuildError(f"{onnx_path} does not match its sidecar checksum; rebuild the bundle")
    version = str(trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network()  # strongly typed: TensorRT 11 takes no creation flags
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT cannot parse {onnx_path.name}: " + "; ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.optimization_level
    height, width = spec.input.height, spec.input.width
    shapes = {
        "min": (settings.min_batch, height, width, 3),
        "opt": (settings.opt_batch, height, width, 3),
        "max": (settings.max_batch, height, width, 3),
    }
    for _ in range(settings.profiles):
        profile = builder.create_optimization_profile()
        profile.set_shape(spec.input.name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    cache_path = timing_cache_path(bundle_dir, gpu, version)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, False)  # ignore_mismatch=False: never use a foreign cache
    started = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(
            f"TensorRT failed to build an engine from {onnx_path.name} (see its log above); "
            "try a larger --workspace-mib or a smaller --max-batch"
        )
    seconds = time.monotonic() - started
    engine_bytes = bytes(serialized)
    engines = bundle_dir / ENGINE_DIR
    engines.mkdir(exist_ok=True)
    _write_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    stem = engine_stem(settings.precision, gpu, version, settings.max_batch)
    engine_path = engines / f"{stem}.engine"
    _write_atomic(engine_path, engine_bytes)
    record = {
        "engine_file": engine_path.name,
        "engine_sha256": hashlib.sha256(engine_bytes).hexdigest(),
        "precision": settings.precision,
        "onnx_file": onnx_path.name,
        "onnx_sha256": onnx_sha,
        "gpu_name": gpu.name,
        "compute_capability": gpu.compute_capability,
        "tensorrt_version": version,
        "input": spec.input.name,
        "profile": {key: list(value) for key, value in shapes.items()},
        "profiles": settings.profiles,
        "settings": asdict(settings),
        "timing_cache": cache_path.name,
        "build_seconds": round(seconds, 1),
    }
    _write_atomic(engines / f"{stem}.json", (json.dumps(record, indent=2) + "\n").encode())
    echo(
        f"engine      {engine_path.name}: {settings.precision}, batch {settings.min_batch}/"
        f"{settings.opt_batch}/{settings.max_batch}, built in {seconds:.0f} s on {gpu.name}"
    )
    return record


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
