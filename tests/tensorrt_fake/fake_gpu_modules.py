"""A recording FAKE of the `tensorrt` and `pycuda.driver` modules (neither can run here).

No GPU and no TensorRT exist in this workplace, so these fakes stand in for them. They implement
only the calls our builder and runner make, record every call in order (with the stream it was
queued on) and run synchronously. The fake engine "computes" something checkable: row i of the
probabilities is one-hot at (mean pixel of crop i) mod classes, so tests can see that each chunk's
outputs come back in the right rows. What this proves: our code's profiles, tensor names, shapes,
buffer sizes, stream order and error paths. What it cannot prove: that real TensorRT accepts them.

The fake tensorrt offers only names the real module has: its objects refuse to set a public
attribute they do not declare (as pybind11 objects do), and tests/tensorrt_api checks every public
name here (`fake_trt_names`) against the strings of the real TensorRT 11 bindings.
"""

from __future__ import annotations

import importlib.machinery
import itertools
import types
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np


@dataclass
class FakeGpuWorld:
    """Everything the fakes share: the call log and the knobs tests turn."""

    calls: list[tuple] = field(default_factory=list)
    gpu_name: str = "NVIDIA H100 80GB HBM3"
    capability: tuple[int, int] = (9, 0)
    trt_version: str = "11.4.0"
    parse_ok: bool = True
    build_ok: bool = True
    execute_ok: bool = True
    failing_executes: set[int] = field(default_factory=set)  # which execute_async_v3 calls (0, 1, ...) fail
    # which waits on a stream with work (0, 1, ... in order) raise, as pycuda does after a fault
    failing_waits: set[int] = field(default_factory=set)
    waits_with_work: int = 0
    busy_streams: set[int] = field(default_factory=set)  # handles with work queued since their last sync
    output_dtype: str = "float32"  # "float16" for an engine with FP16 I/O
    num_classes: int = 4
    feature_size: int = 8
    input_name: str = "images"
    crop: tuple[int, int] = (32, 32)
    max_batch: int = 64
    profiles: int = 2  # optimization profiles in the deserialized engine
    memory: dict[int, np.ndarray] = field(default_factory=dict)
    _addresses: Any = field(default_factory=lambda: itertools.count(0x1000, 0x1000))

    def record(self, *call: Any) -> None:
        self.calls.append(call)

    def named(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]


class DataType(Enum):
    UINT8 = "uint8"
    FLOAT = "float32"
    HALF = "float16"


class TensorIOMode(Enum):
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(Enum):
    WORKSPACE = 0


class _Strict:
    """Setting a public attribute the class does not declare raises, as on a pybind11 object:
    `config.int8_calibrator = c` fails on TensorRT 11, so it must fail on the fake too."""

    _properties: tuple[str, ...] = ()

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_") and name not in self._properties:
            raise AttributeError(f"fake tensorrt: {type(self).__name__!r} object has no attribute {name!r}")
        object.__setattr__(self, name, value)


def make_fake_modules(world: FakeGpuWorld) -> dict[str, types.ModuleType]:
    """sys.modules entries for tensorrt, pycuda and pycuda.driver, bound to `world`."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = world.trt_version
    trt.DataType = DataType
    trt.TensorIOMode = TensorIOMode
    trt.MemoryPoolType = MemoryPoolType
    trt.nptype = lambda dtype: np.dtype(dtype.value).type

    class Logger(_Strict):
        WARNING = "warning"

        def __init__(self, min_severity: str = "warning") -> None:
            self._severity = min_severity

    class INetworkDefinition(_Strict):
        pass

    class OnnxParser(_Strict):
        _properties = ("num_errors",)

        def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
            self.num_errors = 0 if world.parse_ok else 1

        def parse_from_file(self, path: str) -> bool:
            world.record("parse_from_file", path)
            return world.parse_ok

        def get_error(self, index: int) -> str:
            return "fake parser error: unsupported node"

    class IOptimizationProfile(_Strict):
        def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
            world.record("set_shape", name, tuple(low), tuple(opt), tuple(high))

    class ITimingCache(_Strict):
        def __init__(self, data: bytes) -> None:
            self._data = data

        def serialize(self) -> bytes:
            return self._data + b"+timings"

    class IBuilderConfig(_Strict):
        _properties = ("builder_optimization_level",)

        def __init__(self) -> None:
            self._cache: ITimingCache | None = None

        def __setattr__(self, name: str, value: Any) -> None:
            super().__setattr__(name, value)
            if name == "builder_optimization_level":
                world.record("builder_optimization_level", value)

        def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
            world.record("set_memory_pool_limit", pool, size)

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            world.record("add_optimization_profile")
            return 0

        def create_timing_cache(self, data: bytes) -> ITimingCache:
            world.record("create_timing_cache", bytes(data))
            return ITimingCache(bytes(data))

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            world.record("set_timing_cache", ignore_mismatch)
            self._cache = cache
            return True

        def get_timing_cache(self) -> ITimingCache | None:
            return self._cache

    class Builder(_Strict):
        def __init__(self, logger: Logger) -> None:
            pass

        def create_network(self, *flags: int) -> INetworkDefinition:
            world.record("create_network", flags)
            return INetworkDefinition()

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(
            self, network: INetworkDefinition, config: IBuilderConfig
        ) -> bytes | None:
            world.record("build_serialized_network")
            return b"FAKE-ENGINE" if world.build_ok else None

    class IExecutionContext(_Strict):
        _ids = itertools.count()

        def __init__(self) -> None:
            self._id = next(IExecutionContext._ids)
            self._addresses: dict[str, int] = {}
            self._shape: tuple | None = None

        def set_optimization_profile_async(self, index: int, stream_handle: int) -> bool:
            world.record("set_optimization_profile_async", self._id, index, stream_handle)
            return 0 <= index < world.profiles

        def set_input_shape(self, name: str, shape: tuple) -> bool:
            world.record("set_input_shape", self._id, name, tuple(shape))
            self._shape = tuple(shape)
            return True

        def set_tensor_address(self, name: str, address: int) -> bool:
            world.record("set_tensor_address", self._id, name, address)
            self._addresses[name] = address
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            index = len(world.named("execute_async_v3"))
            world.record("execute_async_v3", self._id, stream_handle)
            world.busy_streams.add(stream_handle)
            if not world.execute_ok or index in world.failing_executes:
                return False
            count = self._shape[0]
            crops = world.memory[self._addresses[world.input_name]][:count]
            means = crops.reshape(count, -1).mean(axis=1)
            probs = self._device_output("probabilities", world.num_classes)
            probs[:count] = 0
            probs[np.arange(count), means.astype(int) % world.num_classes] = 1
            if "features" in self._addresses:
                self._device_output("features", world.feature_size)[:count] = means[:, None]
            return True

        def _device_output(self, name: str, width: int) -> np.ndarray:
            address = self._addresses[name]
            if world.memory.get(address) is None:
                world.memory[address] = np.zeros((world.max_batch, width), world.output_dtype)
            return world.memory[address]

    class ICudaEngine(_Strict):
        _properties = ("num_io_tensors", "num_optimization_profiles")

        def __init__(self) -> None:
            out = DataType.HALF if world.output_dtype == "float16" else DataType.FLOAT
            h, w = world.crop
            self._io = {
                world.input_name: (TensorIOMode.INPUT, DataType.UINT8, (-1, h, w, 3)),
                "probabilities": (TensorIOMode.OUTPUT, out, (-1, world.num_classes)),
                "features": (TensorIOMode.OUTPUT, out, (-1, world.feature_size)),
            }
            self.num_io_tensors = len(self._io)
            self.num_optimization_profiles = world.profiles

        def get_tensor_name(self, index: int) -> str:
            return list(self._io)[index]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return self._io[name][0]

        def get_tensor_dtype(self, name: str) -> DataType:
            return self._io[name][1]

        def get_tensor_shape(self, name: str) -> tuple:
            return self._io[name][2]

        def get_tensor_profile_shape(self, name: str, profile: int) -> tuple:
            h, w = world.crop
            return (1, h, w, 3), (world.max_batch // 2, h, w, 3), (world.max_batch, h, w, 3)

        def create_execution_context(self) -> IExecutionContext:
            world.record("create_execution_context")
            return IExecutionContext()

    class Runtime(_Strict):
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> ICudaEngine | None:
            world.record("deserialize_cuda_engine", len(data))
            return ICudaEngine() if data.startswith(b"FAKE-ENGINE") else None

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    # every class the fake hands out, for fake_trt_names(): named as TensorRT names them
    trt._fake_classes = (  # type: ignore[attr-defined]
        Logger,
        Builder,
        INetworkDefinition,
        OnnxParser,
        IBuilderConfig,
        IOptimizationProfile,
        ITimingCache,
        Runtime,
        ICudaEngine,
        IExecutionContext,
    )

    cuda = types.ModuleType("pycuda.driver")

    class Context(_Strict):
        def pop(self) -> None:
            world.record("context_pop")

    class Device(_Strict):
        def __init__(self, index: int) -> None:
            self._index = index

        def name(self) -> str:
            return world.gpu_name

        def compute_capability(self) -> tuple[int, int]:
            return world.capability

        def make_context(self) -> Context:
            world.record("make_context", self._index)
            return Context()

    class DeviceAllocation(_Strict):
        def __init__(self, nbytes: int) -> None:
            self._address = next(world._addresses)
            self._nbytes = nbytes
            world.memory[self._address] = None  # typed on first copy

        def __int__(self) -> int:
            return self._address

        def free(self) -> None:
            world.record("free", self._address)

    class Stream(_Strict):
        _properties = ("handle",)
        _handles = itertools.count(100)

        def __init__(self) -> None:
            self.handle = next(Stream._handles)

        def synchronize(self) -> None:
            world.record("stream_synchronize", self.handle)
            if self.handle not in world.busy_streams:
                return
            world.busy_streams.discard(self.handle)
            world.waits_with_work += 1
            if world.waits_with_work - 1 in world.failing_waits:
                raise RuntimeError("cuStreamSynchronize failed: an illegal memory access was encountered")

    def pagelocked_empty(shape: tuple, dtype: Any) -> np.ndarray:
        world.record("pagelocked_empty", tuple(shape), np.dtype(dtype))
        return np.zeros(shape, dtype)

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        world.record("mem_alloc", nbytes)
        return DeviceAllocation(nbytes)

    def memcpy_htod_async(dest: DeviceAllocation, src: np.ndarray, stream: Stream) -> None:
        world.record("memcpy_htod_async", stream.handle, int(dest), src.shape)
        world.memory[int(dest)] = src.copy()

    def memcpy_dtoh_async(dest: np.ndarray, src: DeviceAllocation, stream: Stream) -> None:
        world.record("memcpy_dtoh_async", stream.handle, int(src), dest.shape)
        dest[...] = world.memory[int(src)][: dest.shape[0]]

    cuda.init = lambda: world.record("cuda_init")
    cuda.Device, cuda.Stream = Device, Stream
    cuda.pagelocked_empty, cuda.mem_alloc = pagelocked_empty, mem_alloc
    cuda.memcpy_htod_async, cuda.memcpy_dtoh_async = memcpy_htod_async, memcpy_dtoh_async
    cuda._fake_classes = (Context, Device, DeviceAllocation, Stream)  # type: ignore[attr-defined]
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = cuda
    modules = {"tensorrt": trt, "pycuda": pycuda, "pycuda.driver": cuda}
    for name, module in modules.items():  # importlib.util.find_spec() reads __spec__
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return modules


def fake_trt_names(trt: types.ModuleType) -> dict[str, set[str]]:
    """Every public name the fake tensorrt offers, by owner: module attributes, each class's
    methods, properties and constants, each enum's members. Our code can only use these."""
    return fake_names(trt, "tensorrt", (*trt._fake_classes, DataType, TensorIOMode, MemoryPoolType))


def fake_pycuda_names(cuda: types.ModuleType) -> dict[str, set[str]]:
    """The same for the fake pycuda.driver (`__int__` counts: int(allocation) is how we read it)."""
    names = fake_names(cuda, "pycuda.driver", cuda._fake_classes)
    names["DeviceAllocation"].add("__int__")
    return names


def fake_names(module: types.ModuleType, label: str, classes: tuple[type, ...]) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {label: {n for n in vars(module) if not n.startswith("_")}}
    for cls in classes:
        if issubclass(cls, Enum):
            names[cls.__name__] = set(cls.__members__)
            continue
        declared = {n for n in vars(cls) if not n.startswith("_")} | set(cls._properties)
        names[cls.__name__] = declared
    return names
