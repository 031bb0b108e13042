"""cpu-int8 on a MobileNet-shaped graph (ReLU6 as Clip, depthwise convolutions), the shape of the
EfficientNet-Lite models the real-model bench uses: each Clip folds into the quantized range (so
every convolution fuses), the float graph still clips where a reader falls back to float, and
depthwise weights keep 8 bits under reduce_range (ONNX Runtime's depthwise kernel cannot saturate).

A small random-weight network, exported by torch and bundled by the real build path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from engine_build.precision.bias_correction import CORRECTED_SUFFIX, correct_biases, rounded_weights
from engine_build.precision.calibration import image_paths, load_crops
from engine_build.precision.cpu_int8 import check_cpu_form, depthwise_weights, quantize_cpu_int8
from engine_build.precision.evaluate import run_onnx
from engine_build.precision.fallback import fall_back
from engine_build.precision.graph_parts import prepared_copy
from worker.sidecar import ModelSpec, Preprocessing


@pytest.fixture(scope="module")
def mobile_bundle(tmp_path_factory) -> Path:
    import torch
    from torch import nn

    from engine_build.build import build_from_onnx

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(),  # depthwise
        nn.Conv2d(16, 32, 1), nn.ReLU6(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU6(),  # depthwise, read by the pool
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()  # fmt: skip
    with torch.no_grad():
        model[-1].weight.mul_(20.0)  # logits far enough apart that top-1 means something
    root = tmp_path_factory.mktemp("mobile")
    with torch.no_grad():
        program = torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), dynamo=True, input_names=["input"],
                                    output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    opset_version=18, verbose=False)  # fmt: skip
    program.save(str(root / "mobile.onnx"))
    prep = Preprocessing(crop_size=(32, 32), resize_size=36, mean=(0.5,) * 3, std=(0.25,) * 3)
    build_from_onnx(root / "mobile.onnx", root / "bundle", prep)
    return root / "bundle"


@pytest.fixture(scope="module")
def quantized(mobile_bundle, calib_dir, tmp_path_factory):
    spec = ModelSpec.load(mobile_bundle)
    crops = load_crops(image_paths(calib_dir), spec.preprocessing).crops
    out = tmp_path_factory.mktemp("mobile_q") / "model.cpu-int8.onnx"
    recipe = quantize_cpu_int8(mobile_bundle / spec.model_file, out, crops[:100], "images")
    return spec, crops[100:], out, recipe


def test_clips_fold_and_every_convolution_fuses(quantized, tmp_path):
    import onnxruntime as ort

    spec, _crops, path, _recipe = quantized
    model = onnx.load(str(path))
    convs = sum(node.op_type == "Conv" for node in model.graph.node)
    assert convs == 4
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    # every convolution but the last, whose output the global pool reads in float (a float Clip
    # between two convolutions would leave both unfused)
    assert fused.count("QLinearConv") == convs - 1, fused


def test_the_float_graph_still_clips_where_a_reader_falls_back(quantized, mobile_bundle):
    """The global pool reads the last convolution in float: it must see the clipped values, as in
    FP32. Without the Clips put back, the same file gives another model (checked)."""
    spec, crops, path, _recipe = quantized
    want = _pooled(onnx.load(str(mobile_bundle / spec.model_file)), crops)
    model = onnx.load(str(path))
    restored = [node for node in model.graph.node if node.name.startswith("labeler_clip_")]
    assert len(restored) == 4
    got = _pooled(model, crops)
    assert got.min() >= 0.0 and got.max() <= 6.0
    assert _relative_error(want, got) < 0.05
    pool = next(node for node in model.graph.node if node.op_type == "ReduceMean")
    unclipped = next(node for node in restored if node.output[0] == pool.input[0])
    pool.input[0] = unclipped.input[0]  # what the pool read before the Clips were put back
    assert _relative_error(want, _pooled(model, crops)) > 0.2


def _pooled(model: onnx.ModelProto, crops: np.ndarray) -> np.ndarray:
    """The global pool's output (the embedding the `features` output would carry)."""
    pool = next(node for node in model.graph.node if node.op_type == "ReduceMean")
    del model.graph.output[:]
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(pool.output[0], onnx.TensorProto.FLOAT, None)
    )
    return run_onnx(model, "images", crops)


def _relative_error(want: np.ndarray, got: np.ndarray) -> float:
    return float(np.abs(want - got).mean() / np.abs(want).mean())


def test_depthwise_weights_keep_eight_bits_under_reduce_range(quantized, mobile_bundle):
    spec, _crops, path, recipe = quantized
    depthwise = set(depthwise_weights(onnx.load(str(mobile_bundle / spec.model_file))))
    assert len(depthwise) == 2 and recipe["depthwise_layers"] == 2
    model = onnx.load(str(path))
    widths = {}
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.INT8 and init.name.endswith("_quantized"):
            widths[init.name.removesuffix("_quantized")] = int(np.abs(onnx.numpy_helper.to_array(init)).max())
    assert {name: widths[name] for name in depthwise} == dict.fromkeys(depthwise, 127)
    assert all(width <= 64 for name, width in widths.items() if name not in depthwise)
    # the check a build runs on every cpu-int8 model (after the fallback search too): depthwise
    # weights may use 8 bits, the others 7; it still refuses an 8-bit weight elsewhere
    check_cpu_form(model, reduce_range=True)
    pointwise = next(init for init in model.graph.initializer if init.name.endswith("_quantized")
                     and init.name.removesuffix("_quantized") not in depthwise and init.data_type == onnx.TensorProto.INT8)  # fmt: skip
    values = onnx.numpy_helper.to_array(pointwise).copy()
    values.flat[0] = 100
    pointwise.CopyFrom(onnx.numpy_helper.from_array(values, pointwise.name))
    with pytest.raises(ValueError, match="exceed"):
        check_cpu_form(model, reduce_range=True)


def test_the_quantizer_rounds_weights_as_bias_correction_assumes(quantized, mobile_bundle):
    """The correction is only right if it predicts the weights ONNX Runtime then writes."""
    spec, _crops, path, _recipe = quantized
    fp32 = {
        init.name: onnx.numpy_helper.to_array(init)
        for init in onnx.load(str(mobile_bundle / spec.model_file)).graph.initializer
    }
    model = onnx.load(str(path))
    inits = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    depthwise = set(depthwise_weights(onnx.load(str(mobile_bundle / spec.model_file))))
    checked = 0
    for node in model.graph.node:
        name = node.input[0].removesuffix("_quantized")
        if (
            node.op_type == "DequantizeLinear"
            and node.input[0].endswith("_quantized")
            and name in fp32
            and fp32[name].ndim == 4
        ):
            scale = inits[node.input[1]].reshape(-1, 1, 1, 1)
            written = inits[node.input[0]].astype(np.float64) * scale
            np.testing.assert_allclose(
                written, rounded_weights(fp32[name], 127 if name in depthwise else 64), rtol=1e-6, atol=1e-9
            )
            checked += 1
    assert checked == 4


@pytest.mark.parametrize("group", [1, 8])
def test_bias_correction_cancels_the_mean_shift_of_rounded_weights(group):
    """One convolution (no padding) on positive inputs: with the corrected bias, the rounded weights'
    output has the FP32 output's per-channel mean on the calibration inputs (but for the border,
    where a channel's full mean is not the mean a position sees); without, it does not."""
    rng = np.random.default_rng(group)
    weight = rng.normal(0, 1, (8, 8 // group, 3, 3)).astype(np.float32)
    weight[:, :, 0, 0] += 0.37  # an offset the rounding does not cancel on average
    bias = rng.normal(0, 1, 8).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group)],
        "one_conv",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 8, 12, 12])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(bias, "b")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    inputs = (
        rng.uniform(0, 6, (32, 8, 12, 12)).astype(np.float32)
        + np.arange(8, dtype=np.float32)[None, :, None, None]
    )
    corrected, names = correct_biases(model, inputs, "x", lambda _weight: 16)  # coarse: a large shift
    assert names == ["b" + CORRECTED_SUFFIX]
    new_bias = next(onnx.numpy_helper.to_array(i) for i in corrected.graph.initializer if i.name == names[0])

    def mean_output(w: np.ndarray, b: np.ndarray) -> np.ndarray:
        graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), "w"))
        graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(b.astype(np.float32), "b"))
        return run_onnx(
            onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), "x", inputs
        ).mean(axis=(0, 2, 3))

    want = mean_output(weight, bias)
    rounded = rounded_weights(weight, 16)
    before = np.abs(mean_output(rounded, bias) - want).max()
    after = np.abs(mean_output(rounded, new_bias) - want).max()
    assert before > 0.05 and after < 0.1 * before, (before, after)  # what is left: the border


def test_a_layer_kept_in_fp32_reads_its_original_bias(quantized, mobile_bundle):
    spec, crops, path, _recipe = quantized
    fp32 = prepared_copy(str(mobile_bundle / spec.model_file))
    model = onnx.load(str(path))
    conv = next(node for node in fp32.graph.node if node.op_type == "Conv")
    back = fall_back(model, fp32, [conv.name])
    node = next(node for node in back.graph.node if node.name == conv.name)
    assert list(node.input) == list(conv.input)  # float activation, original weight and bias
    assert not any(name.endswith(CORRECTED_SUFFIX) for name in node.input)
    assert run_onnx(back, "images", crops).shape[0] == len(crops)


def test_no_initializer_is_left_that_nothing_reads(quantized, mobile_bundle, calib_dir):
    """ONNX Runtime warns about each unused initializer in every session it opens (the calibration
    runs, a worker's): the biases bias correction replaced must not stay behind."""
    spec, crops, path, _recipe = quantized
    source = prepared_copy(str(mobile_bundle / spec.model_file))
    corrected, names = correct_biases(source, crops[:16], "images", lambda _weight: 64)
    assert len(names) == 4
    for model in (corrected, onnx.load(str(path))):
        read = {name for node in model.graph.node for name in node.input}
        assert [init.name for init in model.graph.initializer if init.name not in read] == []


def test_a_graph_whose_convolutions_have_no_bias_is_left_as_it_is():
    """The default bundle's random-weight ResNet-50 exports its convolutions without biases."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "no_bias",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 2, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    corrected, names = correct_biases(model, np.ones((2, 2, 4, 4), np.float32), "x", lambda _weight: 64)
    assert names == [] and corrected == model
