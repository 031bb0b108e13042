"""TensorRT engines on an NVIDIA GPU, with pycuda buffers and streams.

Life cycle (all on the inference thread, in the worker process, never before a fork):
load() makes a CUDA context current on this thread, picks the engine built for this GPU and
TensorRT version from the bundle (engine_records), deserializes it and allocates `slots` sets of
pinned host and device buffers sized for the profile's maximum batch, each with its own execution
context and stream. A batch is split into one chunk per slot and the chunks are queued on their own
streams: the host-to-device copy of chunk k+1 runs while chunk k computes. `submit()` /
`PendingBatch.wait()` expose the same pipelining across batches.

FP16 engine I/O is handled from the engine's own tensor dtypes (a HALF output is read into a float16
pinned buffer and widened on return). Tested against a recording fake of tensorrt and pycuda only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from worker.runners.base import InferenceOutput, Runner, RunnerError
from worker.runners.engine_records import choose_engine, load_records, read_verified
from worker.runners.gpu_info import GpuInfo
from worker.sidecar import ModelSpec


@dataclass
class _Slot:
    """One execution context with its stream and buffers; used by one chunk at a time."""

    context: Any
    stream: Any
    host: dict[str, np.ndarray]
    device: dict[str, Any]
    busy: bool = False


@dataclass
class PendingBatch:
    """A chunk queued on a slot's stream; wait() returns its outputs. At most `slots` chunks may be
    in flight: the next submit on the same slot waits for (and overwrites) its buffers."""

    slot: _Slot
    count: int
    outputs: list[str] = field(default_factory=list)

    def wait(self) -> dict[str, np.ndarray]:
        self.slot.stream.synchronize()
        self.slot.busy = False
        return {name: self.slot.host[name][: self.count].astype(np.float32) for name in self.outputs}


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(
        self,
        bundle_dir: Path,
        spec: ModelSpec | None = None,
        precision: str = "fp16",
        device_index: int = 0,
        slots: int = 2,
        min_chunk: int = 16,
    ) -> None:
        super().__init__(bundle_dir, spec)
        self.precision = precision
        self.device_index = device_index
        self.slot_count = max(1, slots)
        self.min_chunk = min_chunk
        self._cuda_context = None
        self._engine = None
        self._slots: list[_Slot] = []
        self._next_slot = 0
        self._max_batch: int | None = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self.choice = None

    @property
    def max_batch_size(self) -> int | None:
        if self._max_batch is not None:
            return self._max_batch
        sizes = [
            r["profile"]["max"][0]
            for r in load_records(self.bundle_dir)
            if r.get("precision") == self.precision
        ]
        return min(sizes) if sizes else None

    def _load(self) -> None:
        import pycuda.driver as cuda
        import tensorrt as trt

        cuda.init()
        device = cuda.Device(self.device_index)
        self._cuda_context = device.make_context()  # current on this thread until close()
        try:
            major, minor = device.compute_capability()
            gpu = GpuInfo(device.name(), f"{major}.{minor}")
            self.choice = choose_engine(self.bundle_dir, self.spec, self.precision, gpu, str(trt.__version__))
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(read_verified(self.choice))
            if self._engine is None:
                raise RunnerError(
                    f"TensorRT could not deserialize {self.choice.path.name}; rebuild it on this node"
                )
            self._describe_io(trt)
            slots = min(self.slot_count, max(1, int(self._engine.num_optimization_profiles)))
            self._slots = [self._make_slot(cuda, index) for index in range(slots)]
        except BaseException:
            self._release()
            raise

    def _describe_io(self, trt: Any) -> None:
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if self._inputs != [self.spec.input.name]:
            raise RunnerError(f"engine inputs {self._inputs}; the bundle expects [{self.spec.input.name!r}]")
        if self.spec.probabilities_output not in self._outputs:
            raise RunnerError(
                f"engine has no {self.spec.probabilities_output!r} output (has {self._outputs})"
            )
        _min, _opt, max_shape = engine.get_tensor_profile_shape(self.spec.input.name, 0)
        self._max_batch = int(max_shape[0])
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self._shapes = {n: (self._max_batch, *tuple(engine.get_tensor_shape(n))[1:]) for n in names}

    def _make_slot(self, cuda: Any, profile: int) -> _Slot:
        """Buffers, a stream and an execution context on its own optimization profile (a profile
        with dynamic shapes serves one context at a time; the builder makes one per slot)."""
        host, device = {}, {}
        for name in (*self._inputs, *self._outputs):
            host[name] = cuda.pagelocked_empty(self._shapes[name], self._dtypes[name])
            device[name] = cuda.mem_alloc(host[name].nbytes)
        stream = cuda.Stream()
        context = self._engine.create_execution_context()
        context.set_optimization_profile_async(profile, stream.handle)
        stream.synchronize()
        for name in device:
            context.set_tensor_address(name, int(device[name]))
        return _Slot(context, stream, host, device)

    def submit(self, crops: np.ndarray, want_features: bool = False) -> PendingBatch:
        """Queue copy-in, execute and copy-out on the next free slot's stream; returns at once."""
        import pycuda.driver as cuda

        slot = self._slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        if slot.busy:
            slot.stream.synchronize()  # its previous chunk's outputs are still being read
        count = len(crops)
        name = self.spec.input.name
        host_in = slot.host[name]
        host_in[:count] = crops if host_in.dtype == crops.dtype else crops.astype(host_in.dtype)
        cuda.memcpy_htod_async(slot.device[name], host_in[:count], slot.stream)
        slot.context.set_input_shape(name, (count, *self._shapes[name][1:]))
        if not slot.context.execute_async_v3(slot.stream.handle):
            raise RunnerError(f"TensorRT execute_async_v3 failed for a batch of {count}")
        wanted = [self.spec.probabilities_output]
        if want_features and self.spec.features_output:
            wanted.append(self.spec.features_output)
        for out in wanted:
            cuda.memcpy_dtoh_async(slot.host[out][:count], slot.device[out], slot.stream)
        slot.busy = True
        return PendingBatch(slot, count, wanted)

    def chunks(self, count: int) -> list[tuple[int, int]]:
        """Split a batch over the slots so copies overlap compute; small batches stay whole."""
        parts = min(len(self._slots), max(1, count // self.min_chunk))
        size = math.ceil(count / parts)
        return [(start, min(count, start + size)) for start in range(0, count, size)]

    def _infer(self, crops: np.ndarray, want_features: bool) -> InferenceOutput:
        pending = [self.submit(crops[a:b], want_features) for a, b in self.chunks(len(crops))]
        results = [p.wait() for p in pending]
        probabilities = np.concatenate([r[self.spec.probabilities_output] for r in results])
        features = None
        if want_features:
            features = np.concatenate([r[self.spec.features_output] for r in results])
        return InferenceOutput(probabilities, features)

    def _close(self) -> None:
        self._release()

    def _release(self) -> None:
        for slot in self._slots:
            slot.stream.synchronize()
            for buffer in slot.device.values():
                buffer.free()
        self._slots = []
        self._engine = None
        if self._cuda_context is not None:
            self._cuda_context.pop()
            self._cuda_context = None
