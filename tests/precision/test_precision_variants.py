"""FP16 and INT8 variants of a trained bundle: converted, gated against FP32, recorded, reproducible."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from shapes_task import CALIB_COUNT, HELDOUT_COUNT

from engine_build.errors import BuildError
from engine_build.precision.calibration import CALIBRATION_FILE, CropSet, image_paths, split_images
from engine_build.precision.fallback import FallbackSettings
from engine_build.precision.gate import REPORT_FILE
from engine_build.precision.variants import PrecisionRequest, add_precision_variants
from worker.pipeline.preprocess import decode_and_crop
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner
from worker.sidecar import ModelSpec, sha256_file


@pytest.fixture(scope="module")
def gated_bundle(trained_bundle, calib_dir, tmp_path_factory) -> tuple[Path, list, list[str]]:
    bundle = tmp_path_factory.mktemp("gated") / "bundle"
    shutil.copytree(trained_bundle, bundle)
    printed: list[str] = []
    request = PrecisionRequest(("fp16", "int8"), calib_dir, CALIB_COUNT, heldout_count=HELDOUT_COUNT)
    _spec, results = add_precision_variants(bundle, request, echo=printed.append)
    return bundle, results, printed


def test_trained_model_is_confident_enough_for_agreement_to_mean_something(gated_bundle):
    bundle, _results, _ = gated_bundle
    held = CropSet.load(bundle / "heldout.npz")
    with OnnxRuntimeRunner(bundle) as runner:
        probabilities = runner.infer(held.crops).probabilities
    labels = np.array([["horizontal", "vertical", "disc", "checker"].index(_kind(n)) for n in held.names])
    assert np.mean(probabilities.argmax(1) == labels) > 0.5  # four classes: chance is 0.25
    assert np.mean(probabilities.max(1)) > 0.5
    assert len(set(probabilities.argmax(1))) >= 3  # input-dependent, not one constant answer


def _kind(name: str) -> str:
    for kind in ("horizontal", "vertical", "disc", "checker"):
        if kind in name:
            return kind
    raise AssertionError(name)


def test_fp16_and_int8_pass_the_gate_and_are_recorded(gated_bundle):
    bundle, results, printed = gated_bundle
    assert [r.precision for r in results] == ["fp16", "int8"]
    assert all(r.passed for r in results), [r.failures for r in results]
    assert all(r.images == HELDOUT_COUNT for r in results)
    fp16, int8 = results
    assert fp16.top1_agreement >= 0.99 and fp16.mean_score_diff < 0.005
    assert int8.top1_agreement >= 0.97
    table = printed[0]
    assert "fp16" in table and "int8" in table and table.count("PASS") == 2
    spec = ModelSpec.load(bundle)
    for precision in ("fp16", "int8"):
        info = spec.variants[precision]
        assert info["file"] == f"model.{precision}.onnx"
        assert sha256_file(bundle / info["file"]) == info["sha256"]
        assert info["from_sha256"] == spec.checksum_sha256
        assert info["gate"]["passed"] is True
    report = json.loads((bundle / REPORT_FILE).read_text())
    assert set(report["variants"]) == {"fp16", "int8"}
    assert report["variants"]["int8"]["top1_agreement"] == int8.top1_agreement


def test_variants_run_through_the_onnxruntime_runner(gated_bundle, photo_dir):
    bundle, _results, _ = gated_bundle
    spec = ModelSpec.load(bundle)
    crops = np.stack(
        [decode_and_crop(p.read_bytes(), spec.preprocessing) for p in sorted(photo_dir.glob("*.jpg"))]
    )
    outputs = {}
    for variant in ("fp32", "fp16", "int8"):
        with OnnxRuntimeRunner(bundle, precision=variant) as runner:
            out = runner.infer(crops, want_features=True)
        assert out.probabilities.dtype == np.float32 and out.features.dtype == np.float32
        np.testing.assert_allclose(out.probabilities.sum(1), 1.0, atol=1e-3)
        outputs[variant] = out.probabilities
    assert np.abs(outputs["fp16"] - outputs["fp32"]).max() < 0.01


def test_int8_graph_is_in_the_form_tensorrt_accepts(gated_bundle):
    bundle, _results, _ = gated_bundle
    model = onnx.load(str(bundle / "model.int8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "QLinearConv" not in ops and "QuantizeLinear" in ops
    producers = {o: n for n in model.graph.node for o in n.output}
    # All-INT8 passes the default gate here by 2 images of 200 (top-1 agreement 0.98, gate 0.97), so
    # on another CPU the fallback may keep a few layers in FP32: those are recorded, every other
    # convolution has INT8 input and weights. (test_int8_fallback.py checks the FP32 ones.)
    fp32_layers = set(ModelSpec.load(bundle).variants["int8"].get("fp32_layers", []))
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name not in fp32_layers]
    assert convs
    for conv in convs:
        assert [producers[i].op_type for i in conv.input[:2]] == ["DequantizeLinear"] * 2, conv.name
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = inits[node.input[2]]
            assert zero.dtype == np.int8 and not zero.any(), node.name
    # weights per channel: each INT8 convolution's weight scale has one entry per output channel
    for conv in convs:
        weight, scale = producers[conv.input[1]].input[:2]
        assert inits[scale].shape == (inits[weight].shape[0],), conv.name
    assert any(inits[producers[c.input[1]].input[1]].shape == (8,) for c in convs)  # 1/8 width: 8 at the stem
    # the preprocessing head is untouched: uint8 in, cast and scale in FP32 before any Q/DQ
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert producers["preprocessed"].op_type == "Transpose"
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    # no output is written from a dequantized tensor: the features are the float pooled values
    writers = {o: n for n in model.graph.node for o in n.output}
    features = writers[ModelSpec.load(bundle).features_output]
    assert all(producers[i].op_type != "DequantizeLinear" for i in features.input if i in producers)


def test_fp16_graph_keeps_fp32_io_head_and_softmax(gated_bundle):
    bundle, _results, _ = gated_bundle
    model = onnx.load(str(bundle / "model.fp16.onnx"))
    conv_weights = [i for i in model.graph.initializer if i.name.endswith("conv2.weight")]
    assert conv_weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in conv_weights)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    scale = next(i for i in model.graph.initializer if i.name == "pre_scale")
    assert scale.data_type == onnx.TensorProto.FLOAT


def test_calibration_uses_the_workers_decode_and_crop_and_is_stored(gated_bundle, calib_dir):
    bundle, _results, _ = gated_bundle
    stored = CropSet.load(bundle / CALIBRATION_FILE)
    assert len(stored) == CALIB_COUNT
    calib_paths, held_paths = split_images(image_paths(calib_dir), CALIB_COUNT, HELDOUT_COUNT)
    assert [Path(p).name for p in calib_paths] == stored.names
    assert not set(stored.names) & {Path(p).name for p in held_paths}  # held out means unseen
    prep = ModelSpec.load(bundle).preprocessing
    first = Path(calib_paths[0]).read_bytes()
    np.testing.assert_array_equal(stored.crops[0], decode_and_crop(first, prep))


def test_rebuild_from_the_stored_calibration_is_identical(gated_bundle, tmp_path):
    bundle, _results, _ = gated_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "model.int8.onnx").unlink()
    add_precision_variants(copy, PrecisionRequest(("int8",)), echo=lambda _m: None)  # no --calib
    assert sha256_file(copy / "model.int8.onnx") == sha256_file(bundle / "model.int8.onnx")


@pytest.fixture(scope="module")
def grey_dir(tmp_path_factory) -> Path:
    """Flat grey images: calibrated on them, INT8 gets activation ranges far too narrow for real inputs."""
    folder = tmp_path_factory.mktemp("grey")
    for index in range(20):
        cv2.imwrite(str(folder / f"g{index}.png"), np.full((48, 48, 3), 100 + index, np.uint8))
    return folder


def _grey_calibrated(
    trained_bundle, calib_dir, grey_dir, tmp_path, fallback: FallbackSettings
) -> tuple[Path, str]:
    """Build INT8 calibrated on the grey images, gated on real held-out crops; expect the refusal.
    Returns the bundle and what the build printed."""
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_bundle, bundle)
    request = PrecisionRequest(
        ("int8",), grey_dir, 20, heldout_dir=calib_dir, heldout_count=HELDOUT_COUNT, fallback=fallback
    )
    printed: list[str] = []
    with pytest.raises(BuildError, match="below the accuracy gate"):
        add_precision_variants(bundle, request, echo=printed.append)
    assert not (bundle / "model.int8.onnx").exists()
    assert "int8" not in ModelSpec.load(bundle).variants
    return bundle, "\n".join(printed)


def test_gate_alone_rejects_int8_calibrated_on_the_wrong_images(
    trained_bundle, calib_dir, grey_dir, tmp_path
):
    """The gate by itself (fallback off): the clipped Q/DQ model changes labels and is refused.

    Vendor-independent because the miss is huge, not marginal: top-1 agreement 0.465 on AMD EPYC
    and 0.585 in docs/gpu.md's table (gate 0.97), mean score difference 0.56 and 0.40 (gate 0.03).
    Float kernels that differ in the last bits move a few near-tied images, not half of them.
    """
    bundle, printed = _grey_calibrated(
        trained_bundle, calib_dir, grey_dir, tmp_path, FallbackSettings("none")
    )
    report = json.loads((bundle / REPORT_FILE).read_text())["variants"]["int8"]
    assert report["passed"] is False and "fallback" not in report
    assert report["top1_agreement"] < 0.9 and report["mean_score_diff"] > 0.1  # far from the gate
    assert "sensitivity" not in printed


def test_fallback_refuses_when_its_budget_cannot_rescue_the_model(
    trained_bundle, calib_dir, grey_dir, tmp_path
):
    """The fallback's limit: with a budget of one layer it keeps one layer in FP32, then refuses.

    Vendor-independent by exhaustion, not by ranking: which layer ranks first depends on float
    kernels (the sensitivities are measured on the grey crops, where INT8 barely differs), but
    each of the 66 INT8 layers alone in FP32 was measured (AMD EPYC) and the best leaves top-1
    agreement at 0.60, far below 0.97, so no CPU's ranking can meet this budget. (With the default
    budget of 32 it depends: 21 layers rescue the model here; Intel runs never got there.)
    """
    bundle, printed = _grey_calibrated(
        trained_bundle, calib_dir, grey_dir, tmp_path, FallbackSettings("auto", max_layers=1)
    )
    assert "measuring each layer's sensitivity" in printed
    assert "1 layer(s) in FP32" in printed and "2 layer(s)" not in printed
    report = json.loads((bundle / REPORT_FILE).read_text())["variants"]["int8"]
    fallback = report["fallback"]
    assert report["passed"] is False and fallback["passed"] is False
    assert fallback["budget_layers"] == 1 and len(fallback["fp32_layers"]) == 1
    assert [t["fp32_layers"] for t in fallback["tried"]] == [1]
    assert fallback["all_int8_gate"]["passed"] is False
    assert report["top1_agreement"] < 0.9  # the budget's best is far from the gate, not near it


def test_int8_without_calibration_images_says_what_to_pass(trained_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_bundle, bundle)
    with pytest.raises(BuildError, match="--calib DIR"):
        add_precision_variants(bundle, PrecisionRequest(("int8",)), echo=lambda _m: None)
