"""FP32 ONNX -> INT8 Q/DQ ONNX in the form TensorRT accepts, calibrated on the CPU.

ONNX Runtime's static quantization in QDQ format with symmetric INT8 activations and per-channel
symmetric INT8 weights: TensorRT rejects non-zero zero points and the QOperator (QLinearConv) form.
Q/DQ go on the inputs of convolutions, the classifier's Gemm and the max pool (the layers TensorRT
runs in INT8). Residual Adds stay in higher precision by default: on the trained test model,
quantizing them too cost 2.5 points of top-1 agreement with FP32 (docs/gpu.md); `quantize_adds`
turns them on (faster in TensorRT, which can then fuse the add into the convolution). The
preprocessing head and the softmax stay FP32, as do graph inputs and outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from engine_build.precision.graph_parts import output_nodes, prepared_copy, preprocessing_nodes
from engine_build.precision.ort_quantize import quantize_with_ranges
from engine_build.precision.ranges import METHODS, activation_ranges

CALIBRATION_METHODS = METHODS
QUANTIZED_OPS = ("Conv", "Gemm", "MaxPool")


def quantized_inputs(model: onnx.ModelProto, ops: list[str], exclude: list[str]) -> list[str]:
    """The activation tensors the quantizer will put Q/DQ on: the non-constant inputs of each
    quantized node (a Conv's or Gemm's first input, both inputs of a quantized Add)."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    skip = set(exclude)
    tensors: list[str] = []
    for node in model.graph.node:
        if node.op_type not in ops or node.name in skip:
            continue
        candidates = node.input[:1] if node.op_type in ("Conv", "Gemm") else node.input
        tensors.extend(name for name in candidates if name and name not in constants)
    return list(dict.fromkeys(tensors))


def quantize_int8(
    src: Path,
    dst: Path,
    crops: np.ndarray,
    input_name: str,
    method: str = "minmax",
    extra_fp32_nodes: tuple[str, ...] = (),
    quantize_adds: bool = False,
) -> dict[str, object]:
    """Calibrate on `crops` (uint8, the bundle's input) and write the Q/DQ model to `dst`."""
    from onnxruntime.quantization import QuantType

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    if len(crops) == 0:
        raise ValueError("no calibration crops")

    model = prepared_copy(str(src))
    keep = [*preprocessing_nodes(model), *output_nodes(model), *extra_fp32_nodes]
    ops = [*QUANTIZED_OPS, "Add"] if quantize_adds else list(QUANTIZED_OPS)
    named = dst.with_name(dst.name + ".named.onnx")
    onnx.save(model, str(named))
    ranges = activation_ranges(named, quantized_inputs(model, ops, keep), input_name, crops, method)

    overrides = {
        name: [{"rmin": np.array(-amax, np.float32), "rmax": np.array(amax, np.float32)}]
        for name, amax in ranges.items()
    }
    try:
        quantize_with_ranges(
            named,
            dst,
            crops,
            input_name,
            keep,
            op_types_to_quantize=ops,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "TensorQuantOverrides": overrides,
                "QuantizeBias": False,  # TensorRT adds biases in float; an INT32 bias DQ it rejects
                # Q/DQ on layer inputs only, as TensorRT places them: it fuses conv + bias + ReLU
                # and requantizes at the next layer's input. Quantizing conv outputs too would
                # round twice and cut the pre-ReLU range in half for nothing.
                "OpTypesToExcludeOutputQuantization": ops,
            },
        )
    finally:
        named.unlink(missing_ok=True)
    quantized = onnx.load(str(dst))
    float_outputs = output_readers_of_int8(quantized)
    if float_outputs:
        from engine_build.precision.fallback import fall_back

        quantized = fall_back(quantized, model, float_outputs)
        onnx.save(quantized, str(dst))
    check_tensorrt_form(quantized)
    check_activation_scales(quantized, ranges)
    return {
        "quantizer": "onnxruntime.quantization.quantize_static (QDQ), activation ranges from engine_build.precision.ranges",
        "activations": "int8 symmetric per-tensor",
        "weights": "int8 symmetric per-channel",
        "calibration_method": method,
        "calibration_images": int(len(crops)),
        "quantized_ops": ops,
        "fp32_nodes": [*keep, *float_outputs],
    }


def output_readers_of_int8(model: onnx.ModelProto) -> list[str]:
    """Nodes that write a graph output from a dequantized tensor. The quantizer shares a tensor's
    DequantizeLinear among all its readers, so the pooled `features` output (an Identity of the
    classifier's input) came out INT8-rounded; such nodes are given the float tensor back."""
    outputs = {value.name for value in model.graph.output}
    dequantized = {
        out for node in model.graph.node if node.op_type == "DequantizeLinear" for out in node.output
    }
    return [
        node.name
        for node in model.graph.node
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear")
        and set(node.output) & outputs
        and set(node.input) & dequantized
    ]


def activation_scales(model: onnx.ModelProto) -> dict[str, float]:
    """Scale of each activation QuantizeLinear, by the tensor it quantizes (weights are stored
    already quantized, so every QuantizeLinear left in the graph is an activation's)."""
    initializers = {init.name: init for init in model.graph.initializer}
    return {
        node.input[0]: float(onnx.numpy_helper.to_array(initializers[node.input[1]]))
        for node in model.graph.node
        if node.op_type == "QuantizeLinear" and node.input[1] in initializers
    }


def check_activation_scales(model: onnx.ModelProto, ranges: dict[str, float]) -> None:
    """Every activation Q/DQ must carry our calibrated range (scale = amax / 127), none ONNX
    Runtime's one-batch minmax: a tensor we did not calibrate would be quantized blind."""
    for tensor, scale in activation_scales(model).items():
        if tensor not in ranges:
            raise ValueError(f"{tensor} was quantized without a calibrated range")
        expected = max(ranges[tensor], 1e-12) / 127.0
        if not np.isclose(scale, expected, rtol=1e-4):
            raise ValueError(f"{tensor}: scale {scale} is not the calibrated {expected}")


def check_tensorrt_form(model: onnx.ModelProto) -> None:
    """Fail early on what TensorRT would reject later: QOperator nodes, non-zero zero points."""
    ops = {node.op_type for node in model.graph.node}
    bad_ops = ops & {"QLinearConv", "QLinearMatMul", "QLinearAdd", "ConvInteger", "MatMulInteger"}
    if bad_ops:
        raise ValueError(f"quantized model has QOperator nodes {sorted(bad_ops)}; TensorRT needs Q/DQ form")
    if "QuantizeLinear" not in ops:
        raise ValueError("quantized model has no QuantizeLinear nodes: nothing was quantized")
    initializers = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = initializers.get(node.input[2])
            if zero is None:
                continue
            if zero.data_type != onnx.TensorProto.INT8:
                raise ValueError(
                    f"{node.name} quantizes to {onnx.TensorProto.DataType.Name(zero.data_type)}; TensorRT needs INT8"
                )
            if np.any(onnx.numpy_helper.to_array(zero) != 0):
                raise ValueError(f"{node.name} has a non-zero zero point; TensorRT needs symmetric INT8")
