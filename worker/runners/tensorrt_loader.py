"""What the TensorRT runner loads, apart from how it runs: the CUDA context, the engine, its tensors.

As Polygraphy's backend/trt keeps `BytesFromPath` and `EngineFromBytes` apart from `TrtRunner`, each
step of loading is a small callable made with its inputs and called when wanted (on the inference
thread, once the CUDA context is current), so each is tested alone against the fake tensorrt and
pycuda, and a runner can be handed another engine loader. tensorrt and pycuda are imported inside
the calls: importing this module needs neither.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from worker.runners.base import RunnerError
from worker.runners.engine_records import EngineChoice, choose_engine, read_verified
from worker.runners.gpu_info import GpuInfo
from worker.sidecar import ModelSpec


@dataclass
class CudaContext:
    """A pycuda context made current on this thread, and the GPU it is on (engines are chosen by
    it). pop() it on the same thread when done with everything allocated under it."""

    cuda_context: Any  # pycuda's Context
    gpu: GpuInfo

    def pop(self) -> None:
        self.cuda_context.pop()


def push_cuda_context(device_index: int = 0) -> CudaContext:
    """Make a context on CUDA device `device_index` current on this thread."""
    import pycuda.driver as cuda

    cuda.init()
    device = cuda.Device(device_index)
    cuda_context = device.make_context()
    try:
        major, minor = device.compute_capability()
        return CudaContext(cuda_context, GpuInfo(device.name(), f"{major}.{minor}"))
    except BaseException:
        cuda_context.pop()  # not left current on the thread when the caller never gets it to pop
        raise


class EngineBytesLoader(Protocol):
    """A loader of serialized engine bytes; `source` names them in messages once called."""

    source: str

    def __call__(self) -> bytes: ...


class BundleEngineBytes:
    """The bundle's engine for this GPU, TensorRT version, precision and model, read only from
    bundle/engines/ and checked against its record's checksum (engine_records): deserializing an
    engine from anywhere else is unsafe, and a stale one would serve an old model."""

    def __init__(
        self,
        bundle_dir: Path,
        spec: ModelSpec,
        precision: str,
        gpu: GpuInfo,
        trt_version: str | None = None,  # None: the version of the tensorrt module installed
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.spec = spec
        self.precision = precision
        self.gpu = gpu
        self.trt_version = trt_version
        self.choice: EngineChoice | None = None

    @property
    def source(self) -> str:
        return self.choice.path.name if self.choice is not None else f"the engine in {self.bundle_dir}"

    def __call__(self) -> bytes:
        version = self.trt_version
        if version is None:
            import tensorrt as trt

            version = str(trt.__version__)
        self.choice = choose_engine(self.bundle_dir, self.spec, self.precision, self.gpu, version)
        return read_verified(self.choice)


class EngineFromBytes:
    """Deserializes an engine from bytes, or from a loader of them (called first). The TensorRT
    runtime that made it is kept here (`runtime`), as long as whoever keeps this loader."""

    def __init__(self, serialized: bytes | EngineBytesLoader) -> None:
        self.serialized = serialized
        self.runtime: Any = None

    def __call__(self) -> Any:
        import tensorrt as trt

        loader = self.serialized
        data = loader if isinstance(loader, bytes | bytearray) else loader()
        source = getattr(loader, "source", "the serialized engine")
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = self.runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise RunnerError(f"TensorRT could not deserialize {source}; rebuild it on this node")
        return engine


EngineLoader = Callable[[], Any]  # () -> a deserialized ICudaEngine


@dataclass(frozen=True)
class EngineIO:
    """An engine's tensors as the runner allocates them: shapes at the first profile's maximum
    batch, numpy dtypes from the engine (an FP16-I/O engine has float16 outputs)."""

    inputs: list[str]
    outputs: list[str]
    max_batch: int
    dtypes: dict[str, np.dtype]
    shapes: dict[str, tuple[int, ...]]


def engine_io(engine: Any, spec: ModelSpec) -> EngineIO:
    """Read the engine's inputs and outputs, refusing one that does not serve this bundle."""
    import tensorrt as trt

    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if inputs != [spec.input.name]:
        raise RunnerError(f"engine inputs {inputs}; the bundle expects [{spec.input.name!r}]")
    if spec.probabilities_output not in outputs:
        raise RunnerError(f"engine has no {spec.probabilities_output!r} output (has {outputs})")
    _min, _opt, max_shape = engine.get_tensor_profile_shape(spec.input.name, 0)
    max_batch = int(max_shape[0])
    return EngineIO(
        inputs,
        outputs,
        max_batch,
        {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names},
        {n: (max_batch, *tuple(engine.get_tensor_shape(n))[1:]) for n in names},
    )
