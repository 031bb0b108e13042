"""PyTorch ResNet -> ONNX with probabilities and pooled features as outputs, dynamic batch."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from engine_build.errors import BuildError
from engine_build.weights import LoadedWeights, infer_base_width
from worker.resnet import ResNet, ResNetSpec, logits_and_features, resnet50_spec

OPSET = 18


class ProbabilitiesAndFeatures(torch.nn.Module):
    """What the bundle's graph computes: (softmax of the logits, pooled features) from one pass.

    The ResNet itself returns logits only, as timm's do; this wrapper is for the export. Its
    attribute is `inner` and its argument `x` because the graph's initializer names
    (`inner.conv1.weight`, read back by worker/runners/torch_weights.py) and the exporter's dynamic
    shapes are keyed on them."""

    def __init__(self, inner: ResNet) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = logits_and_features(self.inner, x)
        return torch.softmax(logits, dim=1), features


def model_from_weights(weights: LoadedWeights) -> tuple[ResNet, ResNetSpec]:
    """The torch module for these weights, in eval mode; strict loading catches wrong files."""
    spec = resnet50_spec(weights.num_classes, infer_base_width(weights.state_dict))
    model = ResNet(spec)
    missing, unexpected = model.load_state_dict(weights.state_dict, strict=False)
    if missing or unexpected:
        raise BuildError(
            "weights do not fit ResNet-50: "
            f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return model.eval(), spec


def export_onnx(model: ResNet, input_size: tuple[int, int], work_dir: Path) -> onnx.ModelProto:
    """Export with the dynamo exporter (torch >= 2.9 default): dynamic batch, opset 18."""
    example = torch.zeros(2, 3, *input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    path = Path(work_dir) / "classifier.onnx"
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            ProbabilitiesAndFeatures(model).eval(),
            (example,),
            dynamo=True,
            input_names=["input"],
            output_names=["probabilities", "features"],
            dynamic_shapes={"x": {0: batch}},
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )
    program.save(str(path))
    return onnx.load(str(path))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs every torchvision op it cannot register and deprecation notices; none of
    it concerns a ResNet, and it buries the build summary. Real errors still raise."""
    logger = logging.getLogger("torch.onnx")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(previous)
