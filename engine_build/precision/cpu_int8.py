"""FP32 ONNX -> INT8 Q/DQ ONNX in the form ONNX Runtime's CPU provider fuses into integer kernels.

The TensorRT variant (int8.py) puts symmetric Q/DQ on layer inputs only and leaves residual adds
in float: ONNX Runtime's CPU provider cannot fuse that, and it runs slower than FP32. The provider
turns DequantizeLinear -> op -> QuantizeLinear into QLinearConv / QLinearAdd / QGemm only where a
node's inputs *and* output are quantized, and its x86 kernels take uint8 activations (with a zero
point) times int8 weights. So here: QUInt8 activations, per-channel QInt8 weights, Q/DQ on Conv,
Add, MaxPool and Gemm inputs and outputs (the classifier's logits stay float), int32 biases.

Same calibration crops and the same `method` thresholds as the TensorRT variant (ranges.py), made
asymmetric: each tensor's range is that threshold tightened to the signed values seen. ONNX
Runtime's quantizer writes the Q/DQ nodes with those ranges (its own one-batch minmax is only run
because it must be; every range is overridden, and checked).

`reduce_range` (7-bit weights): x86 CPUs without VNNI multiply u8 x s8 with an instruction whose
16-bit pair sums saturate (255 * 127 * 2 > 32767); 7-bit weights never do, so the model computes
the same numbers with and without VNNI, and a gate passed on one CPU holds on the other.
Depthwise convolutions keep 8-bit weights either way: ONNX Runtime runs them in its own kernel
(MLAS qdwconv), whose x86 versions (scalar, SSE2, AVX2) widen both operands to 16 bits and
multiply into 32 (no pair sums, no saturation). On EfficientNet-Lite2 that 8th bit cut the mean
score difference from FP32 by a fifth (bench/RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from engine_build.precision.bias_correction import correct_biases
from engine_build.precision.graph_parts import output_nodes, prepared_copy, preprocessing_nodes
from engine_build.precision.ort_quantize import quantize_with_ranges
from engine_build.precision.ranges import activation_intervals

# Relu and Clip (ReLU6, as in MobileNet and EfficientNet-Lite) are folded into the quantized range
# of the tensor before them; left out, each Clip reads a dequantized tensor, its convolution cannot
# fuse, and the conv output is rounded over its wide pre-clip range before being clipped.
FOLDED_ACTIVATIONS = ("Relu", "Clip")
CPU_QUANTIZED_OPS = ("Conv", "Gemm", "MaxPool", "Add", *FOLDED_ACTIVATIONS)
LOGIT_OPS = ("Gemm",)  # their outputs stay float: 256 levels over the logits would move the scores
QOPERATOR_OPS = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "ConvInteger", "MatMulInteger"}


def quantize_cpu_int8(
    src: Path,
    dst: Path,
    crops: np.ndarray,
    input_name: str,
    method: str = "minmax",
    reduce_range: bool = True,
) -> dict[str, object]:
    """Calibrate on `crops` (uint8, the bundle's input) and write the CPU-form Q/DQ model to `dst`."""
    if len(crops) == 0:
        raise ValueError("no calibration crops")
    model = prepared_copy(str(src))
    keep = [*preprocessing_nodes(model), *output_nodes(model)]
    depthwise = depthwise_weights(model)
    full_width = set(depthwise) if reduce_range else None
    source, corrected = correct_biases(
        model,
        crops,
        input_name,
        lambda weight: 64 if full_width is not None and weight not in full_width else 127,
    )
    named = dst.with_name(dst.name + ".named.onnx")
    onnx.save(source, str(named))
    try:
        # Which tensors the quantizer puts Q/DQ on (after it folds each ReLU into the quantized
        # range of the tensor before it) is its own business: ask it with a probe, then calibrate
        # exactly those tensors.
        _quantize(named, dst, crops, input_name, keep, reduce_range, overrides={})
        tensors = list(activation_scales(onnx.load(str(dst))))
        intervals = activation_intervals(named, tensors, input_name, crops, method)
        overrides: dict[str, list[dict[str, object]]] = {
            name: [{"rmin": np.array(low, np.float32), "rmax": np.array(high, np.float32)}]
            for name, (low, high) in intervals.items()
        }
        overrides.update({name: [{"reduce_range": False, "axis": 0}] for name in depthwise})
        _quantize(named, dst, crops, input_name, keep, reduce_range, overrides)
    finally:
        named.unlink(missing_ok=True)
    quantized = restore_activations(onnx.load(str(dst)), model)
    float_readers = float_consumers(quantized)
    if float_readers:
        from engine_build.precision.fallback import fall_back

        quantized = fall_back(quantized, model, float_readers)
    check_cpu_form(quantized, reduce_range)
    check_activation_intervals(quantized, intervals)
    onnx.save(quantized, str(dst))
    return {
        "quantizer": "onnxruntime.quantization.quantize_static (QDQ), activation ranges from engine_build.precision.ranges",
        "form": "onnxruntime-cpu: Q/DQ on inputs and outputs, fused to QLinearConv/QLinearAdd/QGemm",
        "activations": "uint8 asymmetric per-tensor",
        "weights": "int8 symmetric per-channel"
        + (", 7-bit (reduce_range) except depthwise convolutions (8-bit)" if reduce_range else ""),
        "depthwise_layers": len(depthwise),
        "bias_correction": f"{len(corrected)} convolutions (engine_build.precision.bias_correction)",
        "reduce_range": reduce_range,
        "calibration_method": method,
        "calibration_images": int(len(crops)),
        "quantized_ops": [op for op in CPU_QUANTIZED_OPS if op not in FOLDED_ACTIVATIONS],
        "fp32_nodes": [*keep, *float_readers],
    }


def depthwise_weights(model: onnx.ModelProto) -> list[str]:
    """Weight initializers of depthwise convolutions (one input channel per group)."""
    inits = {init.name: init for init in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        weight = inits[node.input[1]]
        if group > 1 and len(weight.dims) == 4 and weight.dims[1] == 1:
            found.append(node.input[1])
    return found


def _quantize(
    src: Path,
    dst: Path,
    crops: np.ndarray,
    input_name: str,
    keep: list[str],
    reduce_range: bool,
    overrides: dict[str, list[dict[str, object]]],
) -> None:
    from onnxruntime.quantization import QuantType

    quantize_with_ranges(
        src,
        dst,
        crops,
        input_name,
        keep,
        op_types_to_quantize=list(CPU_QUANTIZED_OPS),
        reduce_range=reduce_range,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        extra_options={
            "TensorQuantOverrides": overrides,
            "OpTypesToExcludeOutputQuantization": list(LOGIT_OPS),
        },
    )


def restore_activations(quantized: onnx.ModelProto, fp32: onnx.ModelProto) -> onnx.ModelProto:
    """Put back each Relu or Clip the quantizer folded into a quantized range.

    The quantizer removes `x -> Relu -> y` (or Clip) and renames x to y, leaving the activation to
    the saturation of y's QuantizeLinear; the float y in the graph then holds the *unclipped*
    values, wrong for any reader that falls back to float (the global pool under `features`, a
    layer the gate keeps in FP32). With the activation restored before the QuantizeLinear, the
    graph means what it says, and ONNX Runtime still removes it when it fuses (a Relu or
    Clip(0, 6) in front of a QuantizeLinear whose range is inside the clip is a no-op)."""
    folded = {node.output[0]: node for node in fp32.graph.node if node.op_type in FOLDED_ACTIVATIONS}
    present = {node.output[0] for node in quantized.graph.node if node.op_type in FOLDED_ACTIVATIONS}
    inits = {init.name for init in quantized.graph.initializer}
    fp32_inits = {init.name: init for init in fp32.graph.initializer}
    restored = []
    for node in quantized.graph.node:
        for position, name in enumerate(node.output):
            if name in folded and name not in present and node.op_type != "DequantizeLinear":
                original = folded[name]
                node.output[position] = f"{name}_before_{original.op_type.lower()}"
                bounds = list(original.input[1:])  # Clip's min and max, shared initializers
                for bound in bounds:
                    if bound and bound not in inits and bound in fp32_inits:
                        quantized.graph.initializer.append(fp32_inits[bound])
                        inits.add(bound)
                restored.append(
                    onnx.helper.make_node(
                        original.op_type,
                        [node.output[position], *bounds],
                        [name],
                        name=f"labeler_{original.op_type.lower()}_{name}",
                    )
                )
    quantized.graph.node.extend(restored)
    _topological_order(quantized)
    return quantized


def _topological_order(model: onnx.ModelProto) -> None:
    """Nodes sorted so every input is produced before it is read (insertions shifted indexes)."""
    available = {value.name for value in model.graph.input}
    available |= {init.name for init in model.graph.initializer}
    available.add("")
    pending = list(model.graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            raise ValueError("graph has a cycle or reads a tensor nothing produces")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [node for node in pending if node not in ready]
    copies = [onnx.NodeProto() for _ in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del model.graph.node[:]
    model.graph.node.extend(copies)


def float_consumers(model: onnx.ModelProto) -> list[str]:
    """Nodes that read a dequantized tensor without being quantized ops themselves (the global
    average pool under the `features` output, graph outputs): they get the float tensor back, so
    embeddings are not rounded to 256 levels and no requantization sits outside a fused kernel."""
    dequantized = {
        out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output
    }
    return [
        node.name
        for node in model.graph.node
        if node.op_type not in (*CPU_QUANTIZED_OPS, "QuantizeLinear", "DequantizeLinear")
        and set(node.input) & dequantized
    ]


def activation_scales(model: onnx.ModelProto) -> dict[str, tuple[float, int]]:
    """(scale, zero point) of each activation QuantizeLinear, by the tensor it quantizes."""
    inits = {init.name: init for init in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[1] in inits:
            scale = float(onnx.numpy_helper.to_array(inits[node.input[1]]))
            zero = int(onnx.numpy_helper.to_array(inits[node.input[2]])) if len(node.input) > 2 else 0
            found[node.input[0]] = (scale, zero)
    return found


def check_activation_intervals(model: onnx.ModelProto, intervals: dict[str, tuple[float, float]]) -> None:
    """Every activation Q/DQ carries our calibrated range, none ONNX Runtime's one-batch minmax.
    A MaxPool's output keeps its input's scale (the quantizer ties them: max commutes with it)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    scales = activation_scales(model)
    for tensor, (scale, _zero) in scales.items():
        if tensor not in intervals:
            raise ValueError(f"{tensor} was quantized without a calibrated range")
        low, high = intervals[tensor]
        expected = (max(high, 0.0) - min(low, 0.0)) / 255.0
        producer = producers.get(tensor)
        if producer is not None and producer.op_type == "MaxPool":
            source = producers.get(producer.input[0])  # its DequantizeLinear, reading a quantized tensor
            feeding = producers.get(source.input[0]) if source is not None else None
            if feeding is not None and feeding.op_type == "QuantizeLinear":
                expected = scales[feeding.input[0]][0]
        if expected > 0 and not np.isclose(scale, expected, rtol=1e-3):
            raise ValueError(f"{tensor}: scale {scale} is not the calibrated {expected}")


def check_cpu_form(model: onnx.ModelProto, reduce_range: bool) -> None:
    """Fail early on a model the CPU provider would not fuse: QOperator nodes, int8 activations,
    per-tensor or out-of-range weights (7-bit under reduce_range, but for depthwise convolutions)."""
    ops = {node.op_type for node in model.graph.node}
    if ops & QOPERATOR_OPS:
        raise ValueError(f"quantized model has QOperator nodes {sorted(ops & QOPERATOR_OPS)}; expected Q/DQ")
    if "QuantizeLinear" not in ops:
        raise ValueError("quantized model has no QuantizeLinear nodes: nothing was quantized")
    inits = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        zero = inits.get(node.input[2]) if node.op_type == "QuantizeLinear" and len(node.input) > 2 else None
        if zero is not None and zero.data_type != onnx.TensorProto.UINT8:
            raise ValueError(f"{node.name}: activations must be uint8 for the CPU kernels")
    top = 64 if reduce_range else 127
    readers = {name: node for node in model.graph.node for name in node.input}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        weight = inits[node.input[0]]
        if weight.data_type != onnx.TensorProto.INT8:
            continue  # int32 biases
        values = onnx.numpy_helper.to_array(weight)
        reader = readers.get(node.output[0])
        limit = 127 if reader is not None and _is_depthwise(reader, values) else top
        if np.abs(values.astype(np.int32)).max(initial=0) > limit:
            raise ValueError(f"{node.name}: weights exceed +-{limit} ({'7' if limit == 64 else '8'}-bit)")
        scale = onnx.numpy_helper.to_array(inits[node.input[1]])
        if reader is not None and reader.op_type == "Conv" and scale.size <= 1 < values.shape[0]:
            raise ValueError(f"{reader.name}: weights quantized per tensor; expected per channel")


def _is_depthwise(node: onnx.NodeProto, weight: np.ndarray) -> bool:
    """A convolution with one input channel per group (MLAS runs it in its depthwise kernel)."""
    group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
    return node.op_type == "Conv" and group > 1 and weight.ndim == 4 and weight.shape[1] == 1
