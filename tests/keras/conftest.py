"""Keras fixtures: tiny hand-made Keras classifiers for the export, and one trained ResNet-50.

Keras runs on its PyTorch backend (set before keras is first imported, by import_keras). The tiny
models are real Keras models saved as .keras files; only their size is small, so the export and
the comparison with Keras cost seconds. The trained model is the full keras.applications ResNet50
trained from scratch on generated shapes, once per session (about 80 s on two shared cores, with
one PyTorch thread: torch_threads.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from keras_models import save_tiny_classifier
from torch_threads import one_torch_thread

from engine_build.keras_export import import_keras

import_keras()  # fixes the torch backend before anything imports keras


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Every Keras test (training, export, prediction) with one PyTorch thread; see torch_threads.py."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def tiny_keras_model(tmp_path_factory) -> Path:
    with one_torch_thread():
        return save_tiny_classifier(tmp_path_factory.mktemp("keras") / "tiny.keras")


@pytest.fixture(scope="session")
def shapes_model(tmp_path_factory):
    """engine_build.shapes_dataset.train_shapes_model, trained once for the whole session."""
    from engine_build.shapes_dataset import train_shapes_model

    with one_torch_thread():
        return train_shapes_model(tmp_path_factory.mktemp("shapes-model"))
