"""The bundle's ONNX initializers back into a PyTorch ResNet-50, for the PyTorch CUDA runner.

The bundle holds ONNX only, and that is the model the sidecar checksums, the gate compares and the
engines are built from; so the weights are taken from it rather than from a second copy that could
drift. The build's exporter folds each BatchNorm into the convolution before it (weight scaled,
bias added) and keeps torchvision's parameter names on the initializers, so the ResNet from
worker.resnet is rebuilt with BatchNorm replaced by identity and biased convolutions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from worker.runners.base import RunnerError
from worker.sidecar import ModelSpec

_PREFIX = re.compile(r"^(model_)?(inner\.)?")


def _module_name(initializer: str, suffix: str) -> str:
    return _PREFIX.sub("", initializer).removesuffix(suffix)


def folded_parameters(onnx_path: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray | None]], tuple]:
    """{conv module name: (weight, bias or None)} and the classifier's (weight (out, in), bias)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    arrays = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    ops = {node.op_type for node in model.graph.node}
    if "BatchNormalization" in ops:
        raise RunnerError("graph still has BatchNormalization nodes; rebuild the bundle with labeler build")
    convs: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    fc = None
    for node in model.graph.node:
        if node.op_type == "Conv":
            bias = arrays.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            convs[_module_name(node.input[1], ".weight")] = (arrays[node.input[1]], bias)
        elif node.op_type == "Gemm":
            attrs = {a.name: a for a in node.attribute}
            weight = arrays[node.input[1]]
            if not (attrs.get("transB") and attrs["transB"].i):
                weight = weight.T
            fc = (weight, arrays[node.input[2]])
    if fc is None or "conv1" not in convs:
        raise RunnerError(f"{onnx_path.name} is not a ResNet exported by labeler build (no conv1/fc)")
    return convs, fc


def resnet_from_bundle(bundle_dir: Path, spec: ModelSpec) -> Any:
    """A torch ResNet-50 (eval mode, on the CPU) computing what the bundle's FP32 graph computes."""
    import torch
    from torch import nn

    from worker.resnet import resnet50

    if spec.source.get("kind") != "pytorch":
        raise RunnerError("the torch-cuda backend needs a bundle built from PyTorch weights (--weights)")
    convs, (fc_weight, fc_bias) = folded_parameters(Path(bundle_dir) / spec.model_file)
    base_width = int(convs["conv1"][0].shape[0])
    net = resnet50(spec.num_classes, base_width)
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, nn.Identity())
    with torch.no_grad():
        for name, module in net.named_modules():
            if not isinstance(module, nn.Conv2d):
                continue
            if name not in convs:
                raise RunnerError(f"bundle graph has no weights for {name}: not this ResNet-50 layout")
            weight, bias = convs.pop(name)
            module.weight.copy_(torch.tensor(weight))
            module.bias = nn.Parameter(
                torch.tensor(bias) if bias is not None else torch.zeros(weight.shape[0])
            )
        net.fc.weight.copy_(torch.tensor(fc_weight))
        net.fc.bias.copy_(torch.tensor(fc_bias))
    if convs:
        raise RunnerError(f"bundle graph has convolutions this ResNet-50 lacks: {sorted(convs)[:3]}")
    return net.eval()
