"""Each --calib-method gives its own activation ranges (entropy used to write minmax's model).

The model is hand-made so the answer is known: a bundle-shaped graph (uint8 NHWC in, FP32
preprocessing, two convolutions, softmax) whose second convolution sees a heavy-tailed activation:
almost every pixel is dark, two per image are saturated, and the first convolution (a positive 3x3
blur) spreads them into a thin continuous tail. Minmax must take the rare peak, the 99.99th
percentile must sit just below it and the KL search (entropy) must clip the tail well below both.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine_build.precision.int8 import activation_scales, quantize_int8
from engine_build.precision.ranges import AbsHistogram, activation_ranges, amax_entropy, amax_percentile

SIZE = 16
CONV2_INPUT = "relu1"
FLOAT_REL = 1e-5  # NumPy vs ONNX Runtime on the same float32 convolution


def _blur() -> np.ndarray:
    weights = np.random.default_rng(0).uniform(0.5, 1.5, size=(1, 3, 3, 3)).astype(np.float32)
    return weights / weights.sum()


def _conv1(crops: np.ndarray) -> np.ndarray:
    """What the model's conv1 computes (valid 3x3, one output channel), in NumPy."""
    x, w = crops.astype(np.float32), _blur()[0]
    edge = SIZE - 2
    return sum(
        x[:, i : i + edge, j : j + edge, c] * w[c, i, j] for c in range(3) for i in range(3) for j in range(3)
    )


def _tail_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(_blur(), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.5, (3, 4)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(3, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Cast", ["images"], ["as_float"], to=TensorProto.FLOAT, name="pre_cast"),
        helper.make_node("Transpose", ["as_float"], ["preprocessed"], perm=[0, 3, 1, 2], name="pre_t"),
        helper.make_node("Conv", ["preprocessed", "w1"], ["conv1"], name="conv1"),  # 14x14
        helper.make_node("Relu", ["conv1"], [CONV2_INPUT], name="relu1"),
        helper.make_node("Conv", [CONV2_INPUT, "w2"], ["conv2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("GlobalAveragePool", ["conv2"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "tail",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _tail_crops(count: int = 64) -> np.ndarray:
    """Dark noise (0-12) with two saturated pixels per image: |x| has a long, thin tail."""
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 13, size=(count, SIZE, SIZE, 3), dtype=np.uint8)
    for image in crops:
        for _ in range(2):
            y, x = rng.integers(0, SIZE, size=2)
            image[y, x] = 255
    return crops


@pytest.fixture(scope="module")
def tail_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tail") / "model.onnx"
    onnx.save(_tail_model(), str(path))
    return path


def test_each_method_gives_its_own_range_on_a_heavy_tailed_activation(tail_model_path):
    crops = _tail_crops()
    amax = {
        method: activation_ranges(tail_model_path, [CONV2_INPUT], "images", crops, method)[CONV2_INPUT]
        for method in ("minmax", "entropy", "percentile")
    }
    values = _conv1(crops).ravel()  # all positive: the ReLU passes them unchanged
    # NumPy's 27-term sums and ONNX Runtime's convolution kernel round differently (a few 1e-7
    # relative, depending on the CPU's kernels): compare with that slack, never exactly
    assert amax["minmax"] == pytest.approx(values.max(), rel=FLOAT_REL)
    # the percentile is read off the histogram: the upper edge of the bin (amax / 2048 wide) that
    # holds NumPy's 99.99th-percentile value
    exact = float(np.percentile(values, 99.99, method="higher"))
    low, high = exact * (1 - FLOAT_REL), exact * (1 + FLOAT_REL) + float(values.max()) / 2048 * 1.001
    assert low <= amax["percentile"] <= high
    assert amax["percentile"] < amax["minmax"]
    assert amax["entropy"] < 0.8 * amax["percentile"]  # KL clips the thin tail
    assert np.mean(values > amax["entropy"]) <= 0.01  # but never more than 1% of the values


def test_each_method_writes_its_own_int8_model(tail_model_path, tmp_path):
    crops = _tail_crops()
    digests, scales = {}, {}
    for method in ("minmax", "entropy", "percentile"):
        out = tmp_path / f"model.{method}.onnx"
        recipe = quantize_int8(tail_model_path, out, crops, "images", method)
        assert recipe["calibration_method"] == method
        digests[method] = hashlib.sha256(out.read_bytes()).hexdigest()
        scales[method] = activation_scales(onnx.load(str(out)))[CONV2_INPUT]
    assert len(set(digests.values())) == 3
    assert scales["entropy"] < scales["minmax"] and scales["percentile"] < scales["minmax"]
    assert scales["entropy"] != scales["percentile"]


def test_entropy_keeps_the_full_range_when_nothing_is_an_outlier():
    """On a uniform |x| clipping only loses information: the KL search must keep ~all of it."""
    hist = AbsHistogram()
    hist.add(np.random.default_rng(2).uniform(-4, 4, 200_000).astype(np.float32))
    assert amax_entropy(hist) > 0.97 * hist.amax
    assert amax_percentile(hist) > 0.99 * hist.amax


def test_histogram_grows_with_a_later_larger_batch():
    hist = AbsHistogram()
    hist.add(np.linspace(-1, 1, 1000, dtype=np.float32))
    hist.add(np.array([3.0], np.float32))
    assert hist.amax == 3.0 and hist.counts.sum() == 1001
    assert len(hist.counts) * hist.width >= 3.0  # the bins reach the new maximum at the same width
