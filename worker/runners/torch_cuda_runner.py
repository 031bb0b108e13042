"""PyTorch on an NVIDIA GPU in FP16 with channels_last: the GPU path for nodes without TensorRT.

It runs the bundle's own weights (read back from its ONNX, see torch_weights) and does the
preprocessing on the GPU like the graph does: uint8 NHWC crops are copied from a pinned buffer
(a quarter of the bytes of float input), reordered, normalized and viewed as NCHW, which is already
channels_last in memory. The device and dtype are parameters so the same code is checked against
ONNX Runtime on the CPU in FP32 in the tests; FP16 on CUDA is only exercised on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from worker.runners.base import InferenceOutput, Runner, RunnerError
from worker.sidecar import ModelSpec


class TorchCudaRunner(Runner):
    name = "torch-cuda"

    def __init__(
        self,
        bundle_dir: Path,
        spec: ModelSpec | None = None,
        device: str = "cuda",
        dtype: str = "float16",
        channels_last: bool = True,
        max_batch: int = 512,
    ) -> None:
        super().__init__(bundle_dir, spec)
        self.device_name = device
        self.dtype_name = dtype
        self.channels_last = channels_last
        self.max_batch = max_batch
        self._model = None

    @property
    def max_batch_size(self) -> int | None:
        return self.max_batch

    def _load(self) -> None:
        import torch

        if self.device_name.startswith("cuda") and not torch.cuda.is_available():
            raise RunnerError("backend torch-cuda: PyTorch sees no CUDA device (CPU-only build or no driver)")
        self._device = torch.device(self.device_name)
        self._dtype = getattr(torch, self.dtype_name)
        model = self._build_model().to(self._device, self._dtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self._model = model
        prep = self.spec.preprocessing
        reorder = self.spec.input.channel_order != prep.model_channel_order
        self._order = torch.tensor([2, 1, 0] if reorder else [0, 1, 2], device=self._device)
        std = np.asarray(prep.std, np.float64)
        scale = torch.tensor(1.0 / (255.0 * std), dtype=torch.float32, device=self._device)
        bias = torch.tensor(
            -np.asarray(prep.mean, np.float64) / std, dtype=torch.float32, device=self._device
        )
        self._scale, self._bias = scale.view(1, 3, 1, 1), bias.view(1, 3, 1, 1)
        height, width = self.spec.input.height, self.spec.input.width
        pinned = self._device.type == "cuda"
        self._host = torch.empty((self.max_batch, height, width, 3), dtype=torch.uint8, pin_memory=pinned)

    def _build_model(self):
        """The FP32 torch module on the CPU; the bench overrides this when it has no ONNX tools."""
        from worker.runners.torch_weights import resnet_from_bundle

        return resnet_from_bundle(self.bundle_dir, self.spec)

    def _infer(self, crops: np.ndarray, want_features: bool) -> InferenceOutput:
        import torch

        count = len(crops)
        host = self._host[:count]
        host.numpy()[...] = crops
        with torch.inference_mode():
            x = host.to(self._device, non_blocking=True)
            x = x.index_select(3, self._order).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
            if not self.channels_last:
                x = x.contiguous()
            x = (x.float() * self._scale + self._bias).to(self._dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits, features = self._model(x)
            probabilities = torch.softmax(logits.float(), dim=1).cpu().numpy()
            feats = features.float().cpu().numpy() if want_features else None
        return InferenceOutput(probabilities, feats)

    def _close(self) -> None:
        self._model = None
        self._host = None
