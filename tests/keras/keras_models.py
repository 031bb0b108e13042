"""Small real Keras models for the export tests (seconds to build and export, unlike ResNet50)."""

from __future__ import annotations

from pathlib import Path


def save_tiny_classifier(path: Path, activation: str = "softmax", size: int = 48, classes: int = 3) -> Path:
    """Conv -> pool -> dense head, seeded, saved as a .keras file."""
    from engine_build.keras_export import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(3)
    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    # Caffe-normalized inputs span about +-150, which would saturate a random head; scale it down.
    x = keras.layers.Rescaling(1 / 64)(x)
    outputs = keras.layers.Dense(classes, activation=activation, name="head")(x)
    model = keras.Model(inputs, outputs)
    model.save(str(path))
    return path
