"""Prepending the preprocessing to a classifier graph, so the bundle takes uint8 crops.

uint8 (N, H, W, 3) in the decoder's channel order -> [channel reorder] -> float -> x*scale + bias
(mean/std folded into one multiply-add per channel) -> [NHWC->NCHW]. TensorRT fuses these into the
first convolution's input, and the host copies a quarter of the bytes a float tensor would need.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from worker.sidecar import ModelInput, Preprocessing

PREPROCESSED = "preprocessed"


def preprocessing_graph(
    prep: Preprocessing, model_input: ModelInput, opset: int, ir_version: int
) -> onnx.ModelProto:
    """A small model: uint8 crops in, the float tensor the classifier expects out."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = model_input.name
    if model_input.channel_order != prep.model_channel_order:
        inits.append(numpy_helper.from_array(np.array([2, 1, 0], dtype=np.int64), "pre_channel_order"))
        nodes.append(helper.make_node("Gather", [current, "pre_channel_order"], ["pre_reordered"], axis=3))
        current = "pre_reordered"
    nodes.append(helper.make_node("Cast", [current], ["pre_float"], to=TensorProto.FLOAT))
    mean = np.asarray(prep.mean, dtype=np.float64)
    std = np.asarray(prep.std, dtype=np.float64)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    bias = (-mean / std).astype(np.float32)
    inits += [numpy_helper.from_array(scale, "pre_scale"), numpy_helper.from_array(bias, "pre_bias")]
    nodes.append(helper.make_node("Mul", ["pre_float", "pre_scale"], ["pre_scaled"]))
    last = PREPROCESSED if prep.model_layout == "NHWC" else "pre_normalized"
    nodes.append(helper.make_node("Add", ["pre_scaled", "pre_bias"], [last]))
    if prep.model_layout == "NCHW":
        nodes.append(helper.make_node("Transpose", [last], [PREPROCESSED], perm=[0, 3, 1, 2]))
    height, width = model_input.height, model_input.width
    out_shape = ["batch", 3, height, width] if prep.model_layout == "NCHW" else ["batch", height, width, 3]
    graph = helper.make_graph(
        nodes,
        "preprocessing",
        [helper.make_tensor_value_info(model_input.name, TensorProto.UINT8, ["batch", height, width, 3])],
        [helper.make_tensor_value_info(PREPROCESSED, TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ValueError("model imports no default-domain opset")


def prepend_preprocessing(
    model: onnx.ModelProto, prep: Preprocessing, model_input: ModelInput
) -> onnx.ModelProto:
    """Join preprocessing and classifier; the classifier's single float input is fed by it."""
    graph_inputs = _real_inputs(model)
    if len(graph_inputs) != 1:
        raise ValueError(f"expected a classifier with one input, found {[i.name for i in graph_inputs]}")
    pre = preprocessing_graph(prep, model_input, default_opset(model), model.ir_version)
    if model_input.name in {node_output for node in model.graph.node for node_output in node.output}:
        model = compose.add_prefix(model, "model_")
        graph_inputs = _real_inputs(model)
    merged = compose.merge_models(pre, model, io_map=[(PREPROCESSED, graph_inputs[0].name)])
    return dedupe_opsets(merged)


def dedupe_opsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """One opset entry per domain: compose.merge_models repeats them, which the quantizer rejects."""
    versions: dict[str, int] = {}
    for entry in model.opset_import:
        domain = "" if entry.domain == "ai.onnx" else entry.domain
        versions[domain] = max(versions.get(domain, 0), entry.version)
    del model.opset_import[:]
    for domain, version in versions.items():
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))
    return model


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def append_softmax(model: onnx.ModelProto, logits: str, probabilities: str) -> onnx.ModelProto:
    """Turn a logits output into a probabilities output (for imported models that end in logits)."""
    graph = model.graph
    for index, output in enumerate(graph.output):
        if output.name == logits:
            graph.node.append(helper.make_node("Softmax", [logits], [probabilities], axis=-1))
            shape = [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim]
            del graph.output[index]
            graph.output.insert(index, helper.make_tensor_value_info(probabilities, TensorProto.FLOAT, shape))
            return model
    raise ValueError(f"model has no output named {logits!r}")
