"""The embedded default model: ImageNet ResNet-50 when its weights can be had, else seeded random.

`labeler run` without --model uses this, so a fresh machine labels images with one command. Offline
(as in CI) the random fallback keeps the pipeline runnable and says loudly that labels mean nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine_build.errors import BuildError
from worker.sidecar import SIDECAR_NAME


def labeler_home() -> Path:
    return Path(os.environ.get("LABELER_HOME", Path.home() / ".cache" / "resnet-labeler"))


def default_bundle_dir() -> Path:
    return labeler_home() / "bundles" / "default-resnet50"


def ensure_default_bundle(echo=print) -> Path:
    """Return the default bundle, building it on first use."""
    target = default_bundle_dir()
    if (target / SIDECAR_NAME).is_file():
        return target
    try:
        from engine_build.build import build_from_weights
        from engine_build.weights import imagenet_weights, random_weights
    except ImportError as exc:  # torch missing
        raise BuildError(
            f"no --model given and the default model cannot be built here ({exc}). Install the export "
            "extra (pip install 'resnet-labeler[export]') or pass --model BUNDLE."
        ) from None
    echo(f"No --model given: building the default ResNet-50 bundle in {target} (once).")
    try:
        weights = imagenet_weights(labeler_home() / "weights", timeout_s=20.0)
    except BuildError as exc:
        echo(f"ImageNet weights unavailable: {exc}")
        echo("Falling back to SEEDED RANDOM WEIGHTS: the pipeline runs, the labels mean nothing.")
        weights = random_weights(num_classes=1000, seed=0)
    build_from_weights(weights, target)
    return target
