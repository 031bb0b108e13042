"""The CPU crop plus the in-graph normalization against torchvision's evaluation transform.

Tolerance, on real photographs (scikit-image's samples) at their own size and 3x upscaled (which
takes the reduced-resolution JPEG decode): per image, mean |difference| of the uint8 crop at most
5 grey levels and 99th percentile at most 32 (PIL's bilinear resize is anti-aliased, OpenCV's
INTER_LINEAR is not; high-frequency texture such as the motorcycle photo differs most); after
normalization the mean |difference| is at most 0.09 in normalized units. The in-graph normalization
itself matches NumPy to 1e-5. Measured figures are in bench/RESULTS.md.
"""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from reference_transform import reference_crop, reference_tensor

from engine_build.preprocess_graph import preprocessing_graph
from worker.pipeline.image_header import read_header
from worker.pipeline.preprocess import decode_and_crop, plan_crop
from worker.sidecar import ModelInput, Preprocessing

PREP = Preprocessing()
MAX_MEAN_GREY = 5.0
MAX_P99_GREY = 32.0
MAX_MEAN_NORMALIZED = 0.09


def jpeg(bgr: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()


def photo_bytes(photos, scale: int) -> dict[str, bytes]:
    out = {}
    for name, rgb in photos.items():
        bgr = rgb[..., ::-1]
        if scale > 1:
            bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        out[name] = jpeg(np.ascontiguousarray(bgr))
    return out


@pytest.fixture(scope="module")
def graph_session():
    model = preprocessing_graph(PREP, ModelInput(), opset=18, ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("scale", [1, 3], ids=["native", "large-reduced-decode"])
def test_crop_matches_torchvision_geometry_and_resampling(photos, scale):
    for name, data in photo_bytes(photos, scale).items():
        ours = decode_and_crop(data, PREP)
        assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
        diff = np.abs(ours[..., ::-1].astype(np.float32) - reference_crop(data).astype(np.float32))
        assert diff.mean() <= MAX_MEAN_GREY, (name, scale, diff.mean())
        assert np.percentile(diff, 99) <= MAX_P99_GREY, (name, scale, np.percentile(diff, 99))


def test_large_photos_take_the_reduced_decode_path(photos):
    factors = {
        name: plan_crop(read_header(data), PREP).reduce_factor
        for name, data in photo_bytes(photos, 3).items()
    }
    assert all(f >= 2 for f in factors.values()), factors
    assert max(factors.values()) >= 4


def test_whole_path_matches_torchvision_tensor(photos, graph_session):
    for scale in (1, 3):
        for name, data in photo_bytes(photos, scale).items():
            crop = decode_and_crop(data, PREP)
            ours = graph_session.run(None, {"images": crop[None]})[0][0]
            diff = np.abs(ours - reference_tensor(data))
            assert ours.shape == (3, 224, 224)
            assert diff.mean() <= MAX_MEAN_NORMALIZED, (name, scale, diff.mean())


def test_in_graph_normalization_is_exactly_the_reference_arithmetic(photos, graph_session):
    crop = decode_and_crop(photo_bytes(photos, 1)["cat"], PREP)
    ours = graph_session.run(None, {"images": crop[None]})[0][0]
    rgb = crop[..., ::-1].astype(np.float32) / 255.0
    expected = ((rgb - np.array(PREP.mean, np.float32)) / np.array(PREP.std, np.float32)).transpose(2, 0, 1)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_identical_crop_region_when_no_resampling_is_needed():
    """A 256x320 image: the 224 crop is a plain slice, so the result must equal the reference exactly."""
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)
    data = cv2.imencode(".png", bgr)[1].tobytes()
    ours = decode_and_crop(data, PREP)
    np.testing.assert_array_equal(ours[..., ::-1], reference_crop(data))
