"""FP32 ONNX -> FP16 ONNX with FP32 inputs, outputs, preprocessing head and softmax.

onnxconverter-common's converter is what NVIDIA ModelOpt's AutoCast itself builds on, and it installs
next to the CPU onnxruntime (ModelOpt's [onnx] extra pins onnxruntime-gpu, an older onnx and cupy,
which would replace the CPU runtime this project ships). The uint8->float head stays FP32 because
pixel/255 and the mean/std folding lose digits in FP16; the softmax stays FP32 so probabilities
sum to one as precisely as the FP32 model's.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx

from engine_build.errors import BuildError
from engine_build.precision.graph_parts import output_nodes, prepared_copy, preprocessing_nodes


def convert_fp16(src: Path, dst: Path, extra_fp32_nodes: tuple[str, ...] = ()) -> dict[str, object]:
    """Write the FP16 model to `dst`; return the recipe (what stayed FP32 and why) for the sidecar."""
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise BuildError(
            "FP16 conversion needs onnxconverter-common: pip install 'resnet-labeler[export]'"
        ) from None

    model = prepared_copy(str(src))
    keep = [*preprocessing_nodes(model), *output_nodes(model), *extra_fp32_nodes]
    with warnings.catch_warnings():  # it warns once per clamped weight tensor; the gate judges the result
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(
            model,
            keep_io_types=True,
            node_block_list=keep,
            # Weights below FP16's smallest normal would flush to zero: clamp them to it instead.
            min_positive_val=2**-14,
            max_finite_val=65504.0,
        )
    restore_fp32_outputs(converted)
    onnx.checker.check_model(converted)
    onnx.save(converted, str(dst))
    return {
        "converter": "onnxconverter-common float16",
        "fp32_nodes": keep,
        "io_types": "fp32",
    }


def restore_fp32_outputs(model: onnx.ModelProto) -> None:
    """Make every graph output FP32 again.

    When a kept-FP32 node (the softmax) produces a graph output, the converter casts its result
    back to FP16 and declares the output FP16. That cast is turned into a cast to FP32 (a no-op on
    an FP32 value); any other FP16 output gets a Cast appended.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    for value in model.graph.output:
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            continue
        node = producers.get(value.name)
        if node is not None and node.op_type == "Cast":
            for attribute in node.attribute:
                if attribute.name == "to":
                    attribute.i = onnx.TensorProto.FLOAT
        else:
            inner = f"{value.name}_fp16"
            if node is not None:
                node.output[:] = [inner if o == value.name else o for o in node.output]
            model.graph.node.append(
                onnx.helper.make_node("Cast", [inner], [value.name], to=onnx.TensorProto.FLOAT)
            )
        tensor_type.elem_type = onnx.TensorProto.FLOAT
