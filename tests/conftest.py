"""Shared fixtures: real photographs and small real bundles built once per test session.

The bundles are built by the real build path (PyTorch export, preprocessing prepended, verified with
ONNX Runtime). `tiny_bundle` uses a ResNet-50 with every width divided by 8 so tests stay fast on two
cores; `resnet50_bundle` is the full-size architecture, for the tests that need it.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

# PyTorch's OpenMP threads sleep instead of spinning while they wait (read once, when torch loads,
# so it is set here, before any test imports torch; child processes inherit it). On two cores shared
# with other work, a spinning thread steals the core the other one needs: training the Keras shapes
# model took 2-3 s per step with spinning and 1 s without (same numbers out, same thread count);
# on idle cores it costs about a tenth. Set OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TINY_CLASSES = 10


def _skimage_photos() -> dict[str, np.ndarray]:
    """RGB uint8 photographs shipped with scikit-image (no download)."""
    import skimage.data as data

    photos = {
        "astronaut": data.astronaut(),
        "cat": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "hubble": data.hubble_deep_field(),
        "retina": data.retina(),
        "motorcycle": data.stereo_motorcycle()[0],
        "camera": np.stack([data.camera()] * 3, axis=-1),
    }
    return {name: np.ascontiguousarray(photo[..., :3]) for name, photo in photos.items()}


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    return _skimage_photos()


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory, photos) -> Path:
    """The photos as JPEG files at their own size, plus 3x upscaled copies (reduced-decode path)."""
    folder = tmp_path_factory.mktemp("photos")
    for name, rgb in photos.items():
        bgr = rgb[..., ::-1]
        cv2.imwrite(str(folder / f"{name}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])
        big = cv2.resize(bgr, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / f"{name}_large.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return folder


@pytest.fixture(scope="session")
def image_paths(photo_dir) -> list[str]:
    """The photo JPEGs (at their size and upscaled), as sorted path strings."""
    return sorted(str(p) for p in photo_dir.glob("*.jpg"))


@pytest.fixture(scope="session")
def labeler_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("labeler-home")
    os.environ["LABELER_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A 10-class ResNet-50-shaped bundle at 1/8 width, seeded random weights."""
    from engine_build.build import build_from_weights
    from engine_build.weights import random_weights

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    build_from_weights(random_weights(TINY_CLASSES, seed=1, base_width=8), out)
    return out


@pytest.fixture(scope="session")
def resnet50_bundle(labeler_home) -> Path:
    """The embedded default: full ResNet-50, 1000 classes. Offline (CI) it is the seeded random
    fallback, built through the same path `labeler run` takes when no --model is given."""
    from engine_build.default_bundle import ensure_default_bundle

    return ensure_default_bundle(echo=lambda message: None)
