"""Shared benchmark helpers: an ImageNet-like image set made from real photos, and machine facts."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import cv2
import numpy as np


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description() -> str:
    cpu = cpu_name()
    import onnxruntime

    return (
        f"{cpu}, {os.cpu_count()} cores visible, Python {platform.python_version()}, "
        f"OpenCV {cv2.__version__}, ONNX Runtime {onnxruntime.__version__}"
    )


def make_photo_set(folder: Path, count: int, seed: int = 0, large_every: int = 0) -> list[Path]:
    """`count` JPEGs cut from scikit-image's photographs at ImageNet-typical sizes (about 500x375),
    every `large_every`-th one 4x larger (a phone photo), quality 90."""
    import skimage.data as data

    sources = [
        data.astronaut(),
        data.chelsea(),
        data.coffee(),
        data.rocket(),
        data.hubble_deep_field(),
        data.retina(),
        data.stereo_motorcycle()[0],
    ]
    sources = [cv2.resize(np.ascontiguousarray(s[..., :3][..., ::-1]), None, fx=2, fy=2) for s in sources]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        source = sources[index % len(sources)]
        h, w = source.shape[:2]
        cw, ch = (500, 375) if index % 3 else (375, 500)
        y, x = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
        image = source[y : y + ch, x : x + cw]
        if large_every and index % large_every == 0:
            image = cv2.resize(image, None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
        path = folder / f"photo{index:05d}.jpg"
        cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(path)
    return paths


def bundle_or_default(model: Path | None) -> Path:
    """The bundle a benchmark was given, else the embedded default (built once, as `labeler run` does)."""
    if model is not None:
        return model
    from engine_build.default_bundle import ensure_default_bundle

    return ensure_default_bundle()
