"""Checking a fresh bundle against the model it came from, on real photographs.

The images go through the worker's own preprocessing (decode_and_crop from the sidecar) to uint8
crops; the bundle runs them with its in-graph normalization, and the reference runs the same crops
normalized in NumPy. Agreement proves the export and the prepended preprocessing, not the photo.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from engine_build.errors import BuildError
from worker.pipeline.preprocess import decode_and_crop
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner
from worker.sidecar import ModelSpec, Preprocessing

Reference = Callable[[np.ndarray], np.ndarray]  # float input tensor -> probabilities


def sample_images() -> list[Path]:
    folder = resources.files("engine_build").joinpath("data/samples")
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".jpg"))


def load_crops(paths: Sequence[Path], prep: Preprocessing) -> np.ndarray:
    return np.stack([decode_and_crop(Path(p).read_bytes(), prep) for p in paths])


def normalize_reference(crops: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """What the graph's preprocessing must compute, written the obvious way in NumPy."""
    x = crops.astype(np.float32)
    if prep.model_channel_order == "RGB":
        x = x[..., ::-1]
    x = (x / 255.0 - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    if prep.model_layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)


def verify_bundle(
    bundle_dir: Path,
    spec: ModelSpec,
    reference: Reference,
    images: Sequence[Path] | None = None,
    atol: float = 1e-3,
) -> dict[str, Any]:
    """Compare bundle probabilities with the reference; raise BuildError if they disagree."""
    paths = list(images) if images else sample_images()
    if not paths:
        raise BuildError("no images to verify the bundle with")
    crops = load_crops(paths, spec.preprocessing)
    expected = reference(normalize_reference(crops, spec.preprocessing))
    with OnnxRuntimeRunner(bundle_dir, spec) as runner:
        got = runner.infer(crops).probabilities
    diff = np.abs(got - expected)
    result = {
        "images": len(paths),
        "max_abs_diff": float(diff.max()),
        "top1_agreement": float(np.mean(got.argmax(1) == expected.argmax(1))),
        "tolerance": atol,
    }
    if result["max_abs_diff"] > atol:
        raise BuildError(f"bundle output disagrees with the source model: {result}")
    return result
