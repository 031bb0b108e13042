"""Keras fixtures: tiny hand-made Keras classifiers for the export, and one trained ResNet-50.

Keras runs on its PyTorch backend (set before keras is first imported, by import_keras). The tiny
models are real Keras models saved as .keras files; only their size is small, so the export and
the comparison with Keras cost seconds. The trained model is the full keras.applications ResNet50
trained from scratch on generated shapes, once per session (about two minutes on two cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from keras_models import save_tiny_classifier

from engine_build.keras_export import import_keras

import_keras()  # fixes the torch backend before anything imports keras


@pytest.fixture(scope="session")
def tiny_keras_model(tmp_path_factory) -> Path:
    return save_tiny_classifier(tmp_path_factory.mktemp("keras") / "tiny.keras")


@pytest.fixture(scope="session")
def shapes_model(tmp_path_factory):
    """engine_build.shapes_dataset.train_shapes_model, trained once for the whole session."""
    from engine_build.shapes_dataset import train_shapes_model

    return train_shapes_model(tmp_path_factory.mktemp("shapes-model"))
