"""Finding the parts of a bundle graph that conversions must leave in FP32.

The converters select nodes by name, and the preprocessing nodes prepended by the build have none;
so names are given first, then the preprocessing head is found as everything upstream of the
tensor that feeds the classifier.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import onnx

from engine_build.preprocess_graph import PREPROCESSED, dedupe_opsets


def name_unnamed_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every nameless node a unique, stable name (op type + position)."""
    taken = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            candidate = f"labeler_{node.op_type}_{index}"
            while candidate in taken:
                candidate += "_"
            node.name = candidate
            taken.add(candidate)
    return model


def split_consumed_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Graph outputs that other nodes also read (pooled `features` feeds the classifier) get an
    Identity of their own, so a converter can cast the output to FP32 without retyping the edge
    the next layer reads (onnxconverter-common otherwise leaves a float/float16 mismatch)."""
    outputs = {value.name for value in model.graph.output}
    consumed = {name for node in model.graph.node for name in node.input} & outputs
    for name in sorted(consumed):
        inner = f"{name}_value"
        for node in model.graph.node:
            node.input[:] = [inner if i == name else i for i in node.input]
            node.output[:] = [inner if o == name else o for o in node.output]
        model.graph.node.append(
            onnx.helper.make_node("Identity", [inner], [name], name=f"labeler_{name}_out")
        )
    return model


def prepared_copy(path: str) -> onnx.ModelProto:
    """The bundle graph loaded for conversion: nodes named, opsets deduplicated (bundles written
    before the build did it list the default domain twice), outputs split."""
    return split_consumed_outputs(dedupe_opsets(name_unnamed_nodes(onnx.load(path))))


def preprocessing_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that compute the classifier input from the uint8 crops."""
    producers = {out: node for node in model.graph.node for out in node.output}
    if PREPROCESSED not in producers:
        raise ValueError(f"graph has no {PREPROCESSED!r} tensor: not a labeler bundle graph")
    found: list[str] = []
    pending = [PREPROCESSED]
    seen: set[str] = set()
    while pending:
        tensor = pending.pop()
        node = producers.get(tensor)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        found.append(node.name)
        pending.extend(node.input)
    return found


def output_nodes(model: onnx.ModelProto, op_types: tuple[str, ...] = ("Softmax",)) -> list[str]:
    """Names of the nodes of these types that produce a graph output (the probabilities head)."""
    outputs = {value.name for value in model.graph.output}
    return [
        node.name
        for node in model.graph.node
        if node.op_type in op_types and any(out in outputs for out in node.output)
    ]


def probe_session(model: onnx.ModelProto, tensors: Iterable[str]) -> tuple[Any, list[str]]:
    """An ONNX Runtime session of `model` with `tensors` as extra outputs (graph optimizations off,
    so every tensor still exists), and the tensor names in the order it returns them."""
    import onnxruntime as ort

    names = list(dict.fromkeys(tensors))
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {value.name for value in augmented.graph.output}
    for name in names:
        if name not in existing:
            augmented.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        augmented.SerializeToString(), options, providers=["CPUExecutionProvider"]
    ), names
