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

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from engine_build.precision.graph_parts import output_nodes, prepared_copy, preprocessing_nodes

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANTIZED_OPS = ("Conv", "Gemm", "MaxPool")
CALIBRATION_BATCH = 16


def calibration_batches(crops: np.ndarray, batch: int = CALIBRATION_BATCH) -> Iterator[np.ndarray]:
    for start in range(0, len(crops), batch):
        yield crops[start : start + batch]


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
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    if len(crops) == 0:
        raise ValueError("no calibration crops")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            # ONNX Runtime's histogram calibrators stack per-batch arrays: equal batches only.
            self._batches = calibration_batches(crops, CALIBRATION_BATCH if method == "minmax" else 1)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    model = prepared_copy(str(src))
    keep = [*preprocessing_nodes(model), *output_nodes(model), *extra_fp32_nodes]
    ops = [*QUANTIZED_OPS, "Add"] if quantize_adds else list(QUANTIZED_OPS)
    named = dst.with_name(dst.name + ".named.onnx")
    onnx.save(model, str(named))
    root = logging.getLogger()
    level = root.level
    # The quantizer warns on the root logger to run its pre-processing (shape inference, constant
    # folding); the exporter already folded BatchNorm and constants, so the advice is noise here.
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_static(
            str(named),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=ops,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=keep,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[method],
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,  # TensorRT adds biases in float; an INT32 bias DQ it rejects
                # Q/DQ on layer inputs only, as TensorRT places them: it fuses conv + bias + ReLU
                # and requantizes at the next layer's input. Quantizing conv outputs too would
                # round twice and cut the pre-ReLU range in half for nothing.
                "OpTypesToExcludeOutputQuantization": ops,
            },
        )
    finally:
        root.setLevel(level)
        named.unlink(missing_ok=True)
    check_tensorrt_form(onnx.load(str(dst)))
    return {
        "quantizer": "onnxruntime.quantization.quantize_static (QDQ)",
        "activations": "int8 symmetric per-tensor",
        "weights": "int8 symmetric per-channel",
        "calibration_method": method,
        "calibration_images": int(len(crops)),
        "quantized_ops": ops,
        "fp32_nodes": keep,
    }


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
