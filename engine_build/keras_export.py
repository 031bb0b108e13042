"""Keras 3 model -> bundle: ONNX export, preprocessing from Keras' conventions, checked against Keras.

Keras models differ from torchvision ones in two ways the sidecar records: they are channels-last
(NHWC), and `keras.applications.resnet50.preprocess_input` is caffe-style (BGR order, the ImageNet
mean subtracted in 0..255, no scaling), which in the sidecar's 0..1 units is mean/255 with std
1/255. Keras' own image loading resizes straight to the input size, so the resize policy is
"exact". The worker's preprocessing follows the sidecar, so `labeler run` sees what Keras saw.

Keras runs on its PyTorch backend here (no TensorFlow). `model.export(format="onnx")` on that
backend uses torch's TorchScript exporter when the batch axis is left open, which gives the dynamic
batch the bundle needs; the export is checked for it rather than trusted.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from engine_build.errors import BuildError
from worker.sidecar import Layout, ModelSpec, Preprocessing

# keras.applications.resnet50.preprocess_input ("caffe" mode): BGR means in 0..255.
CAFFE_MEAN_BGR_255 = (103.939, 116.779, 123.68)
OPSET = 18


def import_keras():
    """Import Keras on the PyTorch backend; the backend is fixed when keras is first imported."""
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError:
        raise BuildError(
            "Keras is not installed: pip install 'resnet-labeler[keras]' (Keras 3 on PyTorch, no TensorFlow)"
        ) from None
    if keras.backend.backend() != "torch":
        raise BuildError(
            f"Keras was already loaded with the {keras.backend.backend()!r} backend; the labeler needs "
            "the torch backend (unset KERAS_BACKEND or set it to 'torch')"
        )
    return keras


def caffe_preprocessing(input_size: tuple[int, int], layout: Layout = "NHWC") -> Preprocessing:
    """The sidecar form of keras.applications.resnet50.preprocess_input after an exact resize."""
    return Preprocessing(
        crop_size=input_size,
        resize_size=min(input_size),
        resize="exact",
        mean=tuple(m / 255.0 for m in CAFFE_MEAN_BGR_255),  # type: ignore[arg-type]
        std=(1.0 / 255.0,) * 3,
        model_channel_order="BGR",
        model_layout=layout,
    )


def caffe_normalize(crops_bgr: np.ndarray) -> np.ndarray:
    """uint8 BGR crops (N,H,W,3) -> what preprocess_input gives for the same pixels in RGB."""
    return crops_bgr.astype(np.float32) - np.asarray(CAFFE_MEAN_BGR_255, np.float32)


def labels_path_for(model_path: Path) -> Path:
    """Where `labeler finetune` writes the class names, and where the build looks for them."""
    return Path(model_path).with_suffix(".labels.txt")


def training_report_path_for(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".training.json")


@dataclass(frozen=True)
class KerasClassifier:
    """A loaded Keras image classifier and what the export needs to know about it."""

    model: Any
    layout: Layout
    input_size: tuple[int, int] | None  # None: the model accepts any size
    num_classes: int
    outputs_logits: bool
    features: Any | None  # symbolic tensor of the pooled features feeding the head, if found
    feature_size: int | None


def load_keras_model(path: Path) -> Any:
    """Load a .keras file without compiling it; safe mode refuses code embedded in the file."""
    keras = import_keras()
    try:
        return keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except Exception as exc:
        raise BuildError(f"cannot load {path} as a Keras 3 model: {exc}") from None


def describe_classifier(model: Any) -> KerasClassifier:
    """Check the model is a one-input image classifier and find its layout, size and head."""
    keras = import_keras()
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise BuildError(
            f"expected one input and one output, found {len(model.inputs)} and {len(model.outputs)}"
        )
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or 3 not in (shape[1], shape[3]):
        raise BuildError(f"expected an image input (batch, H, W, 3) or (batch, 3, H, W), found {shape}")
    layout: Layout = "NHWC" if shape[3] == 3 else "NCHW"
    height, width = (shape[1], shape[2]) if layout == "NHWC" else (shape[2], shape[3])
    input_size = (int(height), int(width)) if height and width else None
    out_shape = tuple(model.outputs[0].shape)
    if len(out_shape) != 2 or not out_shape[1]:
        raise BuildError(f"expected an output of shape (batch, classes), found {out_shape}")
    head = model.layers[-1]
    features, feature_size = None, None
    if isinstance(head, keras.layers.Dense):
        head_input = head.input
        if len(head_input.shape) == 2 and head_input.shape[1]:
            features, feature_size = head_input, int(head_input.shape[1])
    return KerasClassifier(
        model=model,
        layout=layout,
        input_size=input_size,
        num_classes=int(out_shape[1]),
        outputs_logits=_ends_in_logits(head),
        features=features,
        feature_size=feature_size,
    )


def _ends_in_logits(head: Any) -> bool:
    """True for a linear last layer, False for softmax; anything else cannot be labels."""
    keras = import_keras()
    if isinstance(head, keras.layers.Softmax):
        return False
    activation = getattr(head, "activation", None)
    name = getattr(activation, "__name__", str(activation))
    if name == "softmax":
        return False
    if name == "linear":
        return True
    raise BuildError(
        f"the model's last layer {head.name!r} ends in {name!r}; the labeler needs softmax "
        "probabilities or linear logits (one class per image)"
    )


def keras_preprocessing(
    classifier: KerasClassifier,
    input_size: int | None = None,
    resize: str | None = None,
    resize_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    channel_order: str | None = None,
) -> Preprocessing:
    """Caffe-style preprocessing at the model's own input size; each given value overrides it.

    Overrides are for Keras models that do their own scaling inside (e.g. a Rescaling layer) or
    were trained with another resize; a size that contradicts a fixed model input is an error.
    """
    if classifier.input_size and input_size and (input_size, input_size) != classifier.input_size:
        raise BuildError(
            f"--input-size {input_size} contradicts the model's fixed input {classifier.input_size}"
        )
    size = classifier.input_size or (input_size or 224, input_size or 224)
    base = caffe_preprocessing(size, classifier.layout)
    policy = resize or base.resize
    return Preprocessing(
        crop_size=size,
        # shorter_side without a size: the usual 256/224 ratio (resize 256, crop 224)
        resize_size=(resize_size or round(min(size) * 256 / 224)) if policy == "shorter_side" else min(size),
        resize=policy,  # type: ignore[arg-type]
        mean=mean or base.mean,
        std=std or base.std,
        model_channel_order=channel_order or base.model_channel_order,  # type: ignore[arg-type]
        model_layout=classifier.layout,
    )


def export_classifier_onnx(
    classifier: KerasClassifier, prep: Preprocessing, work_dir: Path
) -> onnx.ModelProto:
    """ONNX with outputs `probabilities` (softmax appended to logits) and `features` when found."""
    keras = import_keras()
    outputs = [classifier.model.outputs[0]]
    if classifier.features is not None:
        outputs.append(classifier.features)
    exported = keras.Model(classifier.model.inputs, outputs, name="labeler_export")
    height, width = prep.crop_size
    shape = (None, height, width, 3) if classifier.layout == "NHWC" else (None, 3, height, width)
    path = Path(work_dir) / "keras.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript tracer chatter about Keras' shape checks
        try:
            exported.export(
                str(path),
                format="onnx",
                input_signature=[keras.InputSpec(shape=shape, dtype="float32")],
                opset_version=OPSET,
                verbose=False,
            )
        except Exception as exc:
            raise BuildError(f"Keras could not export the model to ONNX: {exc}") from None
    model = onnx.load(str(path))
    _require_dynamic_batch(model)
    names = ["logits" if classifier.outputs_logits else "probabilities"]
    if classifier.features is not None:
        names.append("features")
    _rename_outputs(model, names)
    if classifier.outputs_logits:
        from engine_build.preprocess_graph import append_softmax

        model = append_softmax(model, "logits", "probabilities")
    return model


def _require_dynamic_batch(model: onnx.ModelProto) -> None:
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    if not dim.dim_param:
        raise BuildError(
            f"the ONNX export has a fixed batch of {dim.dim_value}; this Keras/torch combination does "
            "not export a dynamic batch axis, which bundles need"
        )


def _rename_outputs(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Give the exporter's numbered outputs the names the sidecar uses; the batch axis is 'batch'."""
    graph = model.graph
    if len(graph.output) != len(names):
        raise BuildError(f"export produced {len(graph.output)} outputs, expected {len(names)}")
    mapping = {output.name: name for output, name in zip(graph.output, names, strict=True)}
    for node in graph.node:
        for i, value in enumerate(node.output):
            node.output[i] = mapping.get(value, value)
        for i, value in enumerate(node.input):
            node.input[i] = mapping.get(value, value)
    for output in graph.output:
        output.name = mapping[output.name]
        dims = output.type.tensor_type.shape.dim
        if dims:
            dims[0].dim_param = "batch"


def keras_probabilities(classifier: KerasClassifier, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Keras' own prediction for model-ready float input, as probabilities."""
    out = np.asarray(classifier.model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)
    if classifier.outputs_logits:
        out = np.exp(out - out.max(axis=1, keepdims=True))
        out /= out.sum(axis=1, keepdims=True)
    return out.astype(np.float32)


def build_from_keras(
    model_path: Path,
    out_dir: Path,
    prep: Preprocessing | None = None,
    labels_file: Path | None = None,
    verify_images: Sequence[Path] | None = None,
    classifier: KerasClassifier | None = None,
) -> ModelSpec:
    """Load, export, prepend preprocessing, and verify the bundle against Keras on photos.

    Without `labels_file`, the labels `labeler finetune` saved next to the model are used when
    present, else numbered placeholders.
    """
    import torch

    from engine_build.bundle import record_verification, write_bundle
    from engine_build.labels import placeholder_labels, read_labels_file
    from engine_build.verify import verify_bundle

    keras = import_keras()
    model_path = Path(model_path)
    classifier = classifier or describe_classifier(load_keras_model(model_path))
    prep = prep or keras_preprocessing(classifier)
    if labels_file is None and labels_path_for(model_path).is_file():
        labels_file = labels_path_for(model_path)
    classes = (
        read_labels_file(labels_file, classifier.num_classes)
        if labels_file
        else placeholder_labels(classifier.num_classes)
    )
    with tempfile.TemporaryDirectory() as work:
        graph = export_classifier_onnx(classifier, prep, Path(work))
    source: dict[str, Any] = {
        "kind": "keras",
        "description": f"Keras model {model_path.resolve()}",
        "keras_version": keras.__version__,
        "keras_backend": "torch",
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "output_is_logits": classifier.outputs_logits,
        "labels_meaningful": True,
        "labels_file": str(Path(labels_file).resolve()) if labels_file else None,
    }
    spec = write_bundle(
        out_dir,
        graph,
        prep,
        classes,
        source,
        features_output="features" if classifier.features is not None else None,
        feature_size=classifier.feature_size,
    )
    check = verify_bundle(out_dir, spec, lambda x: keras_probabilities(classifier, x), verify_images)
    return record_verification(out_dir, spec, check)


def build_from_keras_cli(
    model_path: Path,
    out_dir: Path,
    labels_file: Path | None,
    verify_images: Sequence[Path] | None,
    ctx: Any,
) -> ModelSpec:
    """`labeler build --keras`: Keras defaults, overridden only by options the user actually typed.

    The build command's defaults (224, shorter_side, ImageNet mean/std, RGB) describe torchvision
    models; for a Keras model they would be wrong, so only explicitly given values count.
    """
    from click.core import ParameterSource

    def given(name: str) -> Any:
        return None if ctx.get_parameter_source(name) == ParameterSource.DEFAULT else ctx.params[name]

    def triple(name: str) -> tuple[float, float, float] | None:
        text = given(name)
        if text is None:
            return None
        values = tuple(float(v) for v in str(text).replace(",", " ").split())
        if len(values) != 3:
            raise BuildError(f"--{name} needs three numbers")
        return values  # type: ignore[return-value]

    classifier = describe_classifier(load_keras_model(model_path))
    prep = keras_preprocessing(
        classifier,
        input_size=given("input_size"),
        resize=given("resize"),
        resize_size=given("resize_size"),
        mean=triple("mean"),
        std=triple("std"),
        channel_order=given("channel_order"),
    )
    return build_from_keras(model_path, out_dir, prep, labels_file, verify_images, classifier)
