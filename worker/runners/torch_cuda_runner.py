"""PyTorch on an NVIDIA GPU in FP16 with channels_last: the GPU path for nodes without TensorRT.

It runs the bundle's own weights (read back from its ONNX, see torch_weights; the loaders are in
torch_loader, and another module can be handed in as `build_model`) and does the preprocessing on
the GPU like the graph does: uint8 NHWC crops are copied from a pinned buffer
(a quarter of the bytes of float input), reordered, normalized and viewed as NCHW, which is already
channels_last in memory. Each of `slots` batches in flight has its own pinned input and output
buffers, CUDA stream and completion event: submit() queues copy-in, compute and copy-out and
returns, so the next batch's copy overlaps this one's compute (PyTorch's caching allocator keeps
each stream's temporaries apart). A batch the GPU decode stage already made in device memory
comes in through submit_device() and skips the pinned buffer and the copy. The device and precision are parameters so the same code is checked
against ONNX Runtime on the CPU in FP32 in the tests (where a slot computes at once); FP16 and the
streams on CUDA are only exercised on a GPU machine.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.runners.base import InferenceOutput, Runner, RunnerError
from worker.runners.slots import SlotRing, copy_into_slot
from worker.runners.torch_loader import BundleResNet, ModelBuilder, ModuleOnDevice, torch_device
from worker.sidecar import ModelSpec

TORCH_DTYPES = {"fp16": "float16", "fp32": "float32"}  # bundle precision -> torch dtype


@dataclass
class _Slot:
    """Pinned host buffers, a stream and an event for one batch in flight."""

    crops: Any  # uint8 (max_batch, H, W, 3)
    probabilities: Any  # float32 (max_batch, classes)
    features: Any  # float32 (max_batch, feature_size) or None
    stream: Any = None  # None on the CPU: work is done when submit returns
    done: Any = None
    busy: bool = False


@dataclass
class PendingTorch:
    """One batch queued on a slot's stream; result() waits for its event and copies the rows out."""

    slot: _Slot
    count: int
    want_features: bool

    def result(self) -> InferenceOutput:
        try:
            if self.slot.done is not None:
                self.slot.done.synchronize()
            probabilities = self.slot.probabilities[: self.count].numpy().copy()
            features = self.slot.features[: self.count].numpy().copy() if self.want_features else None
            return InferenceOutput(probabilities, features)
        finally:
            self.slot.busy = False


class TorchCudaRunner(Runner):
    name = "torch-cuda"
    default_batch_size = 128

    def __init__(
        self,
        bundle_dir: Path,
        spec: ModelSpec | None = None,
        device: str = "cuda",
        precision: str = "fp16",
        channels_last: bool = True,
        max_batch: int = 512,
        slots: int = 2,
        build_model: ModelBuilder | None = None,
    ) -> None:
        """`build_model` () -> the FP32 ResNet on the CPU, called at load(); None: the bundle's own
        (BundleResNet). The runner moves it to the device and precision."""
        super().__init__(bundle_dir, spec)
        self.device_name = device
        if precision not in TORCH_DTYPES:
            raise RunnerError(f"torch-cuda computes in {' or '.join(TORCH_DTYPES)}, not {precision}")
        self.precision = precision
        self.channels_last = channels_last
        self.max_batch = max_batch
        self.slot_count = max(1, slots)
        self._build_model = build_model or BundleResNet(self.bundle_dir, self.spec)
        self._model = None
        self._slots: SlotRing[_Slot] = SlotRing(self.name, [])

    @property
    def max_batch_size(self) -> int | None:
        return self.max_batch

    @property
    def pipeline_depth(self) -> int:
        return self.slot_count

    def _load(self) -> None:
        import torch

        self._device = torch_device(self.device_name)
        self._dtype = getattr(torch, TORCH_DTYPES[self.precision])
        if self._device.type == "cuda":
            # Few distinct shapes (the batch size, a short last batch): let cuDNN time its kernels
            # once per shape. The worker process serves this one model, so the global is ours.
            torch.backends.cudnn.benchmark = True
        self._model = ModuleOnDevice(self._build_model, self._device, self._dtype, self.channels_last)()
        prep = self.spec.preprocessing
        reorder = self.spec.input.channel_order != prep.model_channel_order
        self._order = torch.tensor([2, 1, 0] if reorder else [0, 1, 2], device=self._device)
        std = np.asarray(prep.std, np.float64)
        scale = torch.tensor(1.0 / (255.0 * std), dtype=torch.float32, device=self._device)
        bias = torch.tensor(
            -np.asarray(prep.mean, np.float64) / std, dtype=torch.float32, device=self._device
        )
        self._scale, self._bias = scale.view(1, 3, 1, 1), bias.view(1, 3, 1, 1)
        self._slots = SlotRing(self.name, [self._make_slot(torch) for _ in range(self.slot_count)])
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)  # weights and constants ready before side streams use them

    def _make_slot(self, torch: Any) -> _Slot:
        cuda = self._device.type == "cuda"
        height, width = self.spec.input.height, self.spec.input.width

        def pinned(*shape: int, dtype: Any = torch.float32) -> Any:
            return torch.empty(shape, dtype=dtype, pin_memory=cuda)

        features = pinned(self.max_batch, self.spec.feature_size) if self.spec.features_output else None
        return _Slot(
            crops=pinned(self.max_batch, height, width, 3, dtype=torch.uint8),
            probabilities=pinned(self.max_batch, self.spec.num_classes),
            features=features,
            stream=torch.cuda.Stream(self._device) if cuda else None,
            done=torch.cuda.Event() if cuda else None,
        )

    def staging(self, count: int) -> np.ndarray | None:
        slot = self._slots.peek()
        return slot.crops[:count].numpy() if slot is not None and count <= len(slot.crops) else None

    @property
    def batch_device(self) -> str | None:
        return self.device_name

    def _submit(self, crops: np.ndarray, want_features: bool) -> PendingTorch:
        slot = self._slots.take()
        count = len(crops)
        copy_into_slot(crops, slot.crops.numpy())
        with self._on_stream(slot):
            self._compute(slot, slot.crops[:count].to(self._device, non_blocking=True), want_features)
        return self._started(slot, count, want_features)

    def _submit_device(self, batch: Any, want_features: bool) -> PendingTorch:
        """A batch the GPU decode stage made in device memory: no host buffer, no copy in."""
        import torch

        if batch.device != self._device:
            raise RunnerError(f"torch-cuda runner on {self._device} got a batch on {batch.device}")
        slot = self._slots.take()
        if slot.stream is not None:  # the stage's decode and resize come first; keep its memory for us
            slot.stream.wait_stream(torch.cuda.current_stream(self._device))
            batch.record_stream(slot.stream)
        with self._on_stream(slot):
            self._compute(slot, batch, want_features)
        return self._started(slot, len(batch), want_features)

    def _on_stream(self, slot: _Slot) -> contextlib.ExitStack:
        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if slot.stream is not None:
            stack.enter_context(torch.cuda.stream(slot.stream))
        return stack

    def _compute(self, slot: _Slot, x: Any, want_features: bool) -> None:
        """uint8 NHWC on the device -> probabilities (and features) into the slot's host buffers."""
        import torch

        from worker.resnet import logits_and_features

        count = len(x)
        x = x.index_select(3, self._order).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
        if not self.channels_last:
            x = x.contiguous()
        x = (x.float() * self._scale + self._bias).to(self._dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits, features = logits_and_features(self._model, x)
        slot.probabilities[:count].copy_(torch.softmax(logits.float(), dim=1), non_blocking=True)
        if want_features:
            slot.features[:count].copy_(features.float(), non_blocking=True)
        if slot.done is not None:
            slot.done.record(slot.stream)

    def _started(self, slot: _Slot, count: int, want_features: bool) -> PendingTorch:
        slot.busy = True
        return PendingTorch(slot, count, want_features)

    def _infer(self, crops: np.ndarray, want_features: bool) -> InferenceOutput:
        return self._submit(crops, want_features).result()

    def _close(self) -> None:
        for slot in self._slots:
            if slot.done is not None:
                slot.done.synchronize()
        self._slots = SlotRing(self.name, [])
        self._model = None
