"""TensorRT engines on an NVIDIA GPU, with pycuda buffers and streams.

Life cycle (all on the inference thread, in the worker process, never before a fork):
load() makes a CUDA context current on this thread, loads the engine (by default the one built for
this GPU and TensorRT version in the bundle; the loaders are in tensorrt_loader) and allocates
`slots` sets of pinned host and device buffers sized for the profile's maximum batch, each with its
own execution context and stream. This module only runs what it is given. `infer()` splits a batch into one chunk per slot, each queued on its own stream,
so the host-to-device copy of chunk k+1 runs while chunk k computes. `submit()` (what the labeling
service uses) gives each whole batch its own slot instead, so batch n+1 is copied in while batch n
computes and batch n-1's outputs are labeled on the host: `pipeline_depth` batches in flight.

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
from worker.runners.engine_records import EngineChoice, load_records
from worker.runners.slots import SlotRing, copy_into_slot
from worker.runners.tensorrt_loader import (
    BundleEngineBytes,
    CudaContext,
    EngineFromBytes,
    EngineIO,
    EngineLoader,
    engine_io,
    push_cuda_context,
)
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
    """A chunk queued on a slot's stream; wait() returns its outputs. A slot holds one chunk at a
    time: it is busy until wait() has read the outputs out of its pinned buffers."""

    slot: _Slot
    count: int
    outputs: list[str] = field(default_factory=list)

    def wait(self) -> dict[str, np.ndarray]:
        try:
            self.slot.stream.synchronize()
            return {name: self.slot.host[name][: self.count].astype(np.float32) for name in self.outputs}
        finally:
            self.slot.busy = False


@dataclass
class PendingTensorRT:
    """One batch queued as one or more chunks; result() waits for them in order and joins them."""

    chunks: list[PendingBatch]
    probabilities: str
    features: str | None

    def result(self) -> InferenceOutput:
        waited = [chunk.wait() for chunk in self.chunks]
        probabilities = np.concatenate([r[self.probabilities] for r in waited])
        features = np.concatenate([r[self.features] for r in waited]) if self.features else None
        return InferenceOutput(probabilities, features)


class TensorRTRunner(Runner):
    name = "tensorrt"
    default_batch_size = 128  # capped by the engine profile's maximum

    def __init__(
        self,
        bundle_dir: Path,
        spec: ModelSpec | None = None,
        precision: str = "fp16",
        device_index: int = 0,
        slots: int = 2,
        min_chunk: int = 16,
        load_engine: EngineLoader | None = None,
    ) -> None:
        """`load_engine` () -> a deserialized engine, called at load() with the CUDA context
        current; None: this GPU's engine from the bundle (BundleEngineBytes, EngineFromBytes)."""
        super().__init__(bundle_dir, spec)
        self.precision = precision
        self.device_index = device_index
        self.slot_count = max(1, slots)
        self.min_chunk = min_chunk
        self._load_engine = load_engine
        self._engine_loader: EngineLoader | None = None
        self._bundle_bytes: BundleEngineBytes | None = None
        self._cuda: CudaContext | None = None
        self._engine = None
        self._io: EngineIO | None = None
        self._slots: SlotRing[_Slot] = SlotRing(self.name, [])

    @property
    def choice(self) -> EngineChoice | None:
        """The bundle's engine record and file this runner loaded (None: not loaded from the bundle)."""
        return self._bundle_bytes.choice if self._bundle_bytes is not None else None

    @property
    def max_batch_size(self) -> int | None:
        if self._io is not None:
            return self._io.max_batch
        sizes = [
            r["profile"]["max"][0]
            for r in load_records(self.bundle_dir)
            if r.get("precision") == self.precision
        ]
        return min(sizes) if sizes else None

    def _load(self) -> None:
        import pycuda.driver as cuda

        self._cuda = push_cuda_context(self.device_index)  # current on this thread until close()
        try:
            self._engine_loader = self._load_engine or self._bundle_engine(self._cuda)
            self._engine = self._engine_loader()  # kept with its loader, which keeps its runtime
            self._io = engine_io(self._engine, self.spec)
            slots = min(self.slot_count, max(1, int(self._engine.num_optimization_profiles)))
            self._slots = SlotRing(self.name, [self._make_slot(cuda, index) for index in range(slots)])
        except BaseException:
            self._release()
            raise

    def _bundle_engine(self, cuda_context: CudaContext) -> EngineLoader:
        """The default loader: the bundle's engine for the GPU the context is on, deserialized."""
        self._bundle_bytes = BundleEngineBytes(self.bundle_dir, self.spec, self.precision, cuda_context.gpu)
        return EngineFromBytes(self._bundle_bytes)

    def _make_slot(self, cuda: Any, profile: int) -> _Slot:
        """Buffers, a stream and an execution context on its own optimization profile (a profile
        with dynamic shapes serves one context at a time; the builder makes one per slot)."""
        io = self._io
        host, device = {}, {}
        for name in (*io.inputs, *io.outputs):
            host[name] = cuda.pagelocked_empty(io.shapes[name], io.dtypes[name])
            device[name] = cuda.mem_alloc(host[name].nbytes)
        stream = cuda.Stream()
        context = self._engine.create_execution_context()
        context.set_optimization_profile_async(profile, stream.handle)
        stream.synchronize()
        for name in device:
            context.set_tensor_address(name, int(device[name]))
        return _Slot(context, stream, host, device)

    @property
    def pipeline_depth(self) -> int:
        return max(1, len(self._slots))

    def staging(self, count: int) -> np.ndarray | None:
        slot = self._slots.peek()
        host_in = slot.host[self.spec.input.name] if slot is not None else None
        if host_in is None or host_in.dtype != np.uint8 or count > len(host_in):
            return None
        return host_in[:count]

    def _queue_chunk(self, slot: _Slot, crops: np.ndarray, outputs: list[str]) -> PendingBatch:
        """Queue copy-in, execute and copy-out on the slot's stream; returns at once."""
        import pycuda.driver as cuda

        count = len(crops)
        name = self.spec.input.name
        host_in = slot.host[name]
        copy_into_slot(crops, host_in)
        cuda.memcpy_htod_async(slot.device[name], host_in[:count], slot.stream)
        slot.context.set_input_shape(name, (count, *self._io.shapes[name][1:]))
        if not slot.context.execute_async_v3(slot.stream.handle):
            raise RunnerError(f"TensorRT execute_async_v3 failed for a batch of {count}")
        for out in outputs:
            cuda.memcpy_dtoh_async(slot.host[out][:count], slot.device[out], slot.stream)
        slot.busy = True
        return PendingBatch(slot, count, outputs)

    def chunks(self, count: int) -> list[tuple[int, int]]:
        """Split a batch over the slots so copies overlap compute; small batches stay whole."""
        parts = min(len(self._slots), max(1, count // self.min_chunk))
        size = math.ceil(count / parts)
        return [(start, min(count, start + size)) for start in range(0, count, size)]

    def _queue_batch(self, crops: np.ndarray, want_features: bool, split: bool) -> PendingTensorRT:
        features = self.spec.features_output if want_features else None
        outputs = [self.spec.probabilities_output, *([features] if features else [])]
        bounds = self.chunks(len(crops)) if split else [(0, len(crops))]
        queued: list[PendingBatch] = []
        try:
            for start, stop in bounds:
                queued.append(self._queue_chunk(self._slots.take(), crops[start:stop], outputs))
        except BaseException:
            for chunk in queued:  # a half-queued batch must not leave its slots busy
                chunk.wait()
            raise
        return PendingTensorRT(queued, self.spec.probabilities_output, features)

    def _submit(self, crops: np.ndarray, want_features: bool) -> PendingTensorRT:
        return self._queue_batch(crops, want_features, split=False)

    def _infer(self, crops: np.ndarray, want_features: bool) -> InferenceOutput:
        return self._queue_batch(crops, want_features, split=True).result()

    def _close(self) -> None:
        self._release()

    def _release(self) -> None:
        for slot in self._slots:
            slot.stream.synchronize()
            for buffer in slot.device.values():
                buffer.free()
        self._slots = SlotRing(self.name, [])
        self._engine = self._engine_loader = None
        if self._cuda is not None:
            self._cuda.pop()
            self._cuda = None
