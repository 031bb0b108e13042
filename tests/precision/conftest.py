"""A ResNet-50 (1/8 width, 32x32 crops) trained in the test session on generated shapes, built
into a bundle by the real build path, plus calibration images from the same task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from shapes_task import CALIB_COUNT, CLASSES, CROP, HELDOUT_COUNT, train_tiny_resnet, write_images


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory) -> Path:
    """Trained for a few hundred steps on one thread (well under a minute on an idle core)."""
    import torch

    from engine_build.build import build_from_weights
    from engine_build.verify import load_crops, normalize_reference
    from engine_build.weights import LoadedWeights

    root = tmp_path_factory.mktemp("trained")
    items = write_images(root / "train", 800, seed=1)
    crops = load_crops([p for p, _ in items], CROP)  # the worker's decode_and_crop
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers: one thread beats two contending ones
    try:
        state = train_tiny_resnet(
            normalize_reference(crops, CROP), np.array([lab for _, lab in items]), 8, 300
        )
    finally:
        torch.set_num_threads(threads)
    labels = root / "labels.txt"
    labels.write_text("\n".join(CLASSES) + "\n")
    weights = LoadedWeights(state, len(CLASSES), "tiny ResNet-50 trained on generated shapes (tests)")
    build_from_weights(weights, root / "bundle", CROP, labels)
    return root / "bundle"


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory) -> Path:
    """Images of the same task, not seen in training: CALIB_COUNT calibrate, the rest are held out."""
    folder = tmp_path_factory.mktemp("calib")
    write_images(folder, CALIB_COUNT + HELDOUT_COUNT, seed=3)
    return folder
