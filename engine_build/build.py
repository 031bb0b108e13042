"""The build recipes: PyTorch weights -> bundle, and foreign ONNX -> bundle."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from engine_build.bundle import record_verification, write_bundle
from engine_build.errors import BuildError
from engine_build.labels import imagenet_labels, placeholder_labels, read_labels_file
from engine_build.preprocess_graph import append_softmax
from engine_build.verify import verify_bundle
from engine_build.weights import LoadedWeights
from worker.sidecar import ModelSpec, Preprocessing

RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: this bundle was built from seeded random weights; its labels mean nothing. "
    "Build from real weights: labeler build --weights FILE.pth (or --weights imagenet when online)."
)


def class_names(weights_classes: int, labels_file: Path | None, imagenet: bool) -> list[str]:
    if labels_file is not None:
        return read_labels_file(labels_file, weights_classes)
    if imagenet or weights_classes == 1000:
        return imagenet_labels()
    return placeholder_labels(weights_classes)


def build_from_weights(
    weights: LoadedWeights,
    out_dir: Path,
    prep: Preprocessing | None = None,
    labels_file: Path | None = None,
    verify_images: Sequence[Path] | None = None,
) -> ModelSpec:
    """Build the torch model, export it, prepend preprocessing, verify against torch on photos."""
    import torch

    from engine_build.torch_export import export_onnx, model_from_weights

    prep = prep or Preprocessing()
    model, arch = model_from_weights(weights)
    classes = class_names(weights.num_classes, labels_file, weights.imagenet)
    with tempfile.TemporaryDirectory() as work:
        classifier = export_onnx(model, prep.crop_size, Path(work))
    source = {
        "kind": "pytorch",
        "description": weights.description,
        "architecture": "resnet50"
        if arch.stem_channels == 64
        else f"resnet50 (base width {arch.stem_channels})",
        "labels_meaningful": weights.labels_meaningful,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        **weights.extra,
    }
    warnings = () if weights.labels_meaningful else (RANDOM_WEIGHTS_WARNING,)
    spec = write_bundle(
        out_dir,
        classifier,
        prep,
        classes,
        source,
        features_output="features",
        feature_size=arch.feature_size,
        warnings=warnings,
    )

    def reference(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.from_numpy(x))
            return torch.softmax(logits, dim=1).numpy()

    return record_verification(out_dir, spec, verify_bundle(out_dir, spec, reference, verify_images))


def build_from_onnx(
    onnx_path: Path,
    out_dir: Path,
    prep: Preprocessing,
    labels_file: Path | None = None,
    output_name: str | None = None,
    output_is_logits: bool = True,
    verify_images: Sequence[Path] | None = None,
) -> ModelSpec:
    """Wrap any one-input image classifier: preprocessing in front, softmax behind if needed."""
    import onnxruntime as ort

    try:
        classifier = onnx.load(str(onnx_path))
    except Exception as exc:
        raise BuildError(f"cannot read {onnx_path} as ONNX: {exc}") from None
    outputs = [o.name for o in classifier.graph.output]
    chosen = output_name or outputs[0]
    if chosen not in outputs:
        raise BuildError(f"{onnx_path} has no output {chosen!r} (outputs: {outputs})")
    _make_batch_dynamic(classifier)
    probabilities = "probabilities"
    if output_is_logits:
        classifier = append_softmax(classifier, chosen, probabilities)
    elif chosen != probabilities:
        classifier.graph.node.append(onnx.helper.make_node("Identity", [chosen], [probabilities]))
        classifier.graph.output.append(
            onnx.helper.make_tensor_value_info(probabilities, onnx.TensorProto.FLOAT, None)
        )
    original = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    num_classes = _output_width(original, onnx_path, prep, chosen)
    classes = (
        read_labels_file(labels_file, num_classes) if labels_file else class_names(num_classes, None, False)
    )
    source = {
        "kind": "onnx",
        "description": f"ONNX file {Path(onnx_path).resolve()}",
        "output": chosen,
        "output_is_logits": output_is_logits,
        "labels_meaningful": True,
        "onnx_version": onnx.__version__,
    }
    spec = write_bundle(out_dir, classifier, prep, classes, source)
    _require_dynamic_batch(out_dir, spec, onnx_path)
    input_name = original.get_inputs()[0].name

    def reference(x: np.ndarray) -> np.ndarray:
        rows = [original.run([chosen], {input_name: x[i : i + 1]})[0] for i in range(len(x))]
        out = np.concatenate(rows).astype(np.float64)
        if output_is_logits:
            out = np.exp(out - out.max(axis=1, keepdims=True))
            out /= out.sum(axis=1, keepdims=True)
        return out.astype(np.float32)

    return record_verification(out_dir, spec, verify_bundle(out_dir, spec, reference, verify_images))


def _require_dynamic_batch(out_dir: Path, spec: ModelSpec, onnx_path: Path) -> None:
    """Renaming the batch axis is not enough when the graph hard-codes it (a Reshape to [1, -1])."""
    import shutil

    from worker.runners.onnxruntime_runner import OnnxRuntimeRunner

    crops = np.zeros((2, spec.input.height, spec.input.width, 3), np.uint8)
    try:
        with OnnxRuntimeRunner(out_dir, spec, intra_op_threads=1) as runner:
            runner.infer(crops)
    except Exception as exc:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise BuildError(
            f"{onnx_path} has a fixed batch size and cannot run a batch of 2 ({exc}). Re-export it with a "
            "dynamic batch axis (torch.onnx.export(..., dynamic_shapes=...) or dynamic_axes={'input': {0: 'batch'}})."
        ) from None


def _make_batch_dynamic(model: onnx.ModelProto) -> None:
    """Name the batch axis of the input and outputs; models exported with batch 1 keep working."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_param = "batch"


def _output_width(session, path: Path, prep: Preprocessing, output: str) -> int:
    """Classes = width of the chosen output, found by running the original model once."""
    first = session.get_inputs()[0]
    shape = [1, 3, *prep.crop_size] if prep.model_layout == "NCHW" else [1, *prep.crop_size, 3]
    try:
        result = session.run([output], {first.name: np.zeros(shape, np.float32)})[0]
    except Exception as exc:
        raise BuildError(
            f"{path} does not accept a float {prep.model_layout} input of {shape} ({exc}); "
            "check --input-size and --layout"
        ) from None
    if result.ndim != 2:
        raise BuildError(f"output {output!r} has shape {result.shape}; expected (batch, classes)")
    return int(result.shape[1])
