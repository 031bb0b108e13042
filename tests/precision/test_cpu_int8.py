"""cpu-int8: the INT8 model for ONNX Runtime on the CPU, built from the trained test model beside the
TensorRT-shaped int8 from the same calibration crops, gated, and run for `--precision int8`.

Properties only, with margins: which integer kernels a CPU picks differs between vendors and
generations, so no test compares numbers a particular CPU computes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from shapes_task import CALIB_COUNT, HELDOUT_COUNT

from engine_build.errors import BuildError
from engine_build.precision.cpu_int8 import check_cpu_form
from engine_build.precision.evaluate import run_onnx
from engine_build.precision.fallback import FallbackSettings, int8_layers
from engine_build.precision.gate import REPORT_FILE
from engine_build.precision.sensitivity import SENSITIVITY_FILE
from engine_build.precision.variants import PrecisionRequest, add_precision_variants
from worker.cli import main
from worker.runners.base import RunnerError
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner
from worker.sidecar import ModelSpec, sha256_file


def _request(calib_dir, precisions=("int8", "cpu-int8"), **kwargs) -> PrecisionRequest:
    return PrecisionRequest(precisions, calib_dir, CALIB_COUNT, heldout_count=HELDOUT_COUNT, **kwargs)


@pytest.fixture(scope="module")
def cpu_bundle(trained_bundle, calib_dir, tmp_path_factory):
    bundle = tmp_path_factory.mktemp("cpu_int8") / "bundle"
    shutil.copytree(trained_bundle, bundle)
    printed: list[str] = []
    _spec, results = add_precision_variants(bundle, _request(calib_dir), echo=printed.append)
    return bundle, results, printed


def test_cpu_int8_passes_the_default_gate_and_is_recorded(cpu_bundle):
    bundle, results, printed = cpu_bundle
    assert [r.precision for r in results] == ["int8", "cpu-int8"]
    cpu = results[1]
    assert cpu.passed, cpu.failures
    assert cpu.top1_agreement >= 0.97 and cpu.top5_overlap >= 0.95
    low, high = cpu.interval95["top1_agreement"]
    assert low <= cpu.top1_agreement <= high and high - low < 0.1  # 200 images: a few points wide
    assert any("cpu-int8: on new photos expect top-1 agreement" in line for line in printed)
    spec = ModelSpec.load(bundle)
    info, tensorrt = spec.variants["cpu-int8"], spec.variants["int8"]
    assert info["file"] == "model.cpu-int8.onnx" and sha256_file(bundle / info["file"]) == info["sha256"]
    assert info["runs_on"] == "onnxruntime (CPU)" and tensorrt["runs_on"] == "tensorrt"
    assert isinstance(info["fp32_layers"], list) and isinstance(tensorrt["fp32_layers"], list)
    recipe = info["recipe"]
    assert recipe["reduce_range"] is True and recipe["activations"].startswith("uint8")
    # the same calibration crops (and file) as the TensorRT variant
    assert recipe["calibration_sha256"] == tensorrt["recipe"]["calibration_sha256"]
    assert recipe["calibration_images"] == tensorrt["recipe"]["calibration_images"] == CALIB_COUNT
    report = json.loads((bundle / REPORT_FILE).read_text())["variants"]
    assert report["cpu-int8"]["top1_agreement"] == cpu.top1_agreement
    assert report["cpu-int8"]["interval95"]["top1_agreement"] == [low, high]


def test_cpu_int8_is_the_form_the_cpu_provider_fuses_into_integer_kernels(cpu_bundle, tmp_path):
    import onnxruntime as ort

    bundle, _results, _printed = cpu_bundle
    spec = ModelSpec.load(bundle)
    model = onnx.load(str(bundle / "model.cpu-int8.onnx"))
    check_cpu_form(model, reduce_range=True)  # uint8 activations, 7-bit per-channel int8 weights
    float_convs = set(spec.variants["cpu-int8"]["fp32_layers"])
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(bundle / "model.cpu-int8.onnx"), options, providers=["CPUExecutionProvider"])
    fused = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert fused.count("QLinearConv") >= len(convs) - len(float_convs) - 1
    assert fused.count("Conv") <= len(float_convs) + 1
    assert "QLinearAdd" in fused  # residual adds in integers too, unlike the TensorRT form
    tensorrt = [node.op_type for node in onnx.load(str(bundle / "model.int8.onnx")).graph.node]
    assert "QuantizeLinear" in tensorrt  # both forms are Q/DQ files; only the placement differs


def test_features_stay_float_and_close_to_fp32(cpu_bundle):
    bundle, _results, _printed = cpu_bundle
    crops = np.load(bundle / "heldout.npz")["crops"][:64]
    with OnnxRuntimeRunner(bundle) as fp32, OnnxRuntimeRunner(bundle, precision="cpu-int8") as cpu:
        want, got = fp32.infer(crops, True), cpu.infer(crops, True)
    assert got.features.dtype == np.float32
    cosine = np.sum(want.features * got.features, 1) / (
        np.linalg.norm(want.features, axis=1) * np.linalg.norm(got.features, axis=1)
    )
    assert np.median(cosine) > 0.95
    np.testing.assert_allclose(got.probabilities.sum(1), 1.0, atol=1e-4)


def test_int8_on_the_cpu_runs_the_cpu_model(cpu_bundle):
    bundle, _results, _printed = cpu_bundle
    crops = np.load(bundle / "heldout.npz")["crops"][:16]
    with OnnxRuntimeRunner(bundle, precision="int8", intra_op_threads=1) as runner:
        assert runner.model_path()[0].name == "model.cpu-int8.onnx"
        assert "cpu-int8 model" in runner.describe()
        got = runner.infer(crops).probabilities
    np.testing.assert_array_equal(got, run_onnx(bundle / "model.cpu-int8.onnx", "images", crops))


def test_a_bundle_without_cpu_int8_still_runs_int8_and_says_how_to_add_it(cpu_bundle, tmp_path, caplog):
    bundle, _results, _printed = cpu_bundle
    older = tmp_path / "older"
    shutil.copytree(bundle, older)
    spec = ModelSpec.load(older)
    del spec.variants["cpu-int8"]
    spec.save(older)
    with caplog.at_level(logging.WARNING), OnnxRuntimeRunner(older, precision="int8") as runner:
        assert runner.model_path()[0].name == "model.int8.onnx"
        runner.infer(np.load(older / "heldout.npz")["crops"][:2])
    assert f"labeler build {older} --precision cpu-int8" in caplog.text
    del spec.variants["int8"]
    spec.save(older)
    with pytest.raises(RunnerError, match="--precision cpu-int8 --calib DIR"):
        OnnxRuntimeRunner(older, precision="int8").check_files()


def test_bundles_list_the_default_opset_domain_once(trained_bundle):
    domains = [
        entry.domain or "ai.onnx" for entry in onnx.load(str(trained_bundle / "model.onnx")).opset_import
    ]
    assert len(domains) == len(set(domains))


@pytest.fixture(scope="module")
def strict_cpu(trained_bundle, calib_dir, tmp_path_factory):
    """A gate just beyond all-INT8's mean score difference, so the fallback search must run."""
    bundle = tmp_path_factory.mktemp("cpu_strict") / "bundle"
    shutil.copytree(trained_bundle, bundle)
    none = _request(calib_dir, ("cpu-int8",), fallback=FallbackSettings("none"))
    spec, (all_int8,) = add_precision_variants(bundle, none, echo=lambda _m: None)
    before = spec.variants["cpu-int8"]["sha256"]  # all-INT8 passes the default gate
    strict = {"max_mean_score_diff": 0.95 * all_int8.mean_score_diff}
    printed: list[str] = []
    failure = None
    try:
        add_precision_variants(
            bundle, _request(calib_dir, ("cpu-int8",), threshold_overrides=strict), echo=printed.append
        )
    except BuildError as exc:  # the verdict on unseen images may say no: that is its job
        failure = exc
    return bundle, strict, printed, failure, before


def test_fallback_chooses_on_one_half_and_is_judged_on_the_other(strict_cpu):
    bundle, _strict, printed, failure, before = strict_cpu
    report = json.loads((bundle / REPORT_FILE).read_text())["variants"]["cpu-int8"]
    record = report["fallback"]
    search, verdict = set(record["search_images"]), set(record["verdict_images"])
    assert not search & verdict and len(search) == len(verdict) == HELDOUT_COUNT // 2
    assert record["all_int8_gate"]["passed"] is False
    assert any("judged on the other" in line for line in printed)
    if record["passed"]:  # the search found a count; the verdict is on the other half
        assert report["images"] == len(verdict)
        assert record["search_gate"]["images"] == len(search)
        assert any("did not see" in line for line in printed)
    spec = ModelSpec.load(bundle)
    if failure is None:
        info = spec.variants["cpu-int8"]
        assert info["fp32_layers"] == [entry["layer"] for entry in record["fp32_layers"]]
        model = onnx.load(str(bundle / info["file"]))
        assert not set(info["fp32_layers"]) & set(int8_layers(model))
    else:  # a variant below the gate is not written: the bundle keeps the one it had
        assert spec.variants["cpu-int8"]["sha256"] == before


def test_a_rebuild_reads_the_ranking_back_from_the_bundle(strict_cpu, calib_dir):
    bundle, strict, _printed, _failure, _before = strict_cpu
    assert "cpu-int8" in json.loads((bundle / SENSITIVITY_FILE).read_text())
    printed: list[str] = []
    request = _request(
        calib_dir, ("cpu-int8",), threshold_overrides=strict, fallback=FallbackSettings("auto", 2)
    )
    with contextlib.suppress(BuildError):  # the count may pass or not: the ranking is what is checked
        add_precision_variants(bundle, request, echo=printed.append)
    assert any("layer sensitivity read from the bundle" in line for line in printed), printed
    record = json.loads((bundle / REPORT_FILE).read_text())["variants"]["cpu-int8"]["fallback"]
    assert record["ranking_cached"] is True and record["budget_layers"] == 2


def test_cli_builds_cpu_int8_and_refuses_it_for_tensorrt(cpu_bundle, calib_dir, photo_dir, tmp_path):
    bundle, _results, _printed = cpu_bundle
    runner = CliRunner()
    refused = runner.invoke(main, ["build", str(bundle), "--precision", "cpu-int8", "--tensorrt"])
    assert refused.exit_code == 2 and "TensorRT engines are built from --precision int8" in refused.output
    out = tmp_path / "out.jsonl"
    args = ["run", str(photo_dir), "--model", str(bundle), "--out", str(out), "--no-progress"]
    result = runner.invoke(main, [*args, "--backend", "onnxruntime", "--precision", "int8"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(list(photo_dir.glob("*.jpg"))) and all("labels" in r for r in records)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_cpu_int8_builds_with_every_calibration_method(trained_bundle, calib_dir, tmp_path, method):
    """Clipping thresholds narrower than minmax's: a MaxPool output then keeps its input's scale,
    which the quantizer ties, and the scale check must accept that."""
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_bundle, bundle)
    loose = {"min_top1_agreement": 0.9, "max_mean_score_diff": 0.1}  # the ranges are the point here
    request = _request(
        calib_dir,
        ("cpu-int8",),
        calib_method=method,
        fallback=FallbackSettings("none"),
        threshold_overrides=loose,
    )
    _spec, (result,) = add_precision_variants(bundle, request, echo=lambda _m: None)
    assert result.top1_agreement >= 0.9  # a broken range would be far below
    assert ModelSpec.load(bundle).variants["cpu-int8"]["recipe"]["calibration_method"] == method
