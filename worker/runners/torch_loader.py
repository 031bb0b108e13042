"""What the torch-cuda runner loads, apart from how it runs: the device, the module, the module there.

As in tensorrt_loader, each step is a small callable made with its inputs and called at load(), so
each is tested alone on the CPU and the runner can be handed another module (the bench hands it a
seeded random ResNet-50 where it cannot export ONNX). torch is imported inside the calls: importing
this module does not need it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.runners.base import RunnerError
from worker.sidecar import ModelSpec

if TYPE_CHECKING:
    import torch

    from worker.resnet import ResNet

ModelBuilder = Callable[[], "ResNet"]  # () -> the FP32 module, on the CPU


@dataclass(frozen=True)
class BundleResNet:
    """The bundle's own FP32 ResNet-50 on the CPU, rebuilt from the initializers of its checksummed
    ONNX (torch_weights) rather than from a second copy of the weights that could drift."""

    bundle_dir: Path
    spec: ModelSpec

    def __call__(self) -> ResNet:
        from worker.runners.torch_weights import resnet_from_bundle

        return resnet_from_bundle(Path(self.bundle_dir), self.spec)


def torch_device(name: str) -> torch.device:
    """The torch device called `name`, refused now if it is a CUDA device PyTorch cannot see
    (rather than at the first batch)."""
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RunnerError("backend torch-cuda: PyTorch sees no CUDA device (CPU-only build or no driver)")
    return torch.device(name)


@dataclass(frozen=True)
class ModuleOnDevice:
    """The module `build` makes, in eval mode, moved to `device` in `dtype`; channels_last lays
    its convolution weights out as NHWC, which the tensor cores want in FP16."""

    build: ModelBuilder
    device: Any  # a torch.device or its name
    dtype: Any  # a torch dtype
    channels_last: bool = True

    def __call__(self) -> ResNet:
        import torch

        model = self.build().eval().to(self.device, self.dtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model
