"""A generated image-folder dataset of simple shapes, for training tests and accuracy gates offline.

Real photographs of our own classes cannot be downloaded here, and a from-scratch ResNet-50 on two
shared CPU cores gets only a few dozen training steps in a test's budget, so the classes are made
easy to tell apart: each has its own shape or texture (a filled disc, an outlined square, stripes,
a checkerboard) *and* its own hue range, on noisy grey backgrounds of random brightness.
Image sizes and aspect ratios vary so the resize path is exercised, and every file is a real JPEG
or PNG on disk in the usual one-folder-per-class layout that `labeler finetune` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

SHAPE_CLASSES = ("checkerboard", "disc", "square_outline", "stripes")


def make_shapes_dataset(
    root: Path,
    per_class: int = 60,
    classes: tuple[str, ...] = SHAPE_CLASSES,
    size_range: tuple[int, int] = (72, 120),
    seed: int = 0,
) -> Path:
    """Write `per_class` images of each class into root/<class>/; return root.

    Deterministic for a given seed. Every fifth image is a PNG, the rest JPEGs.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            image = draw_shape(name, rng, size_range)
            suffix = ".png" if index % 5 == 4 else ".jpg"
            cv2.imwrite(str(folder / f"{name}_{index:04d}{suffix}"), image)
    return root


def draw_shape(name: str, rng: np.random.Generator, size_range: tuple[int, int] = (72, 120)) -> np.ndarray:
    """One BGR uint8 image of class `name`: random size, position, colours and background noise."""
    height = int(rng.integers(size_range[0], size_range[1] + 1))
    width = int(np.clip(height * rng.uniform(0.8, 1.25), size_range[0], size_range[1]))
    grey = rng.integers(30, 226) + rng.integers(-12, 13, size=3)
    image = np.clip(grey + rng.normal(0, 12, size=(height, width, 3)), 0, 255).astype(np.uint8)
    colour = _class_colour(classes_index(name), rng)
    short = min(height, width)
    if name == "disc":
        radius = int(short * rng.uniform(0.22, 0.4))
        centre = _centre(rng, width, height, radius)
        cv2.circle(image, centre, radius, colour, thickness=-1, lineType=cv2.LINE_AA)
    elif name == "square_outline":
        half = int(short * rng.uniform(0.22, 0.4))
        cx, cy = _centre(rng, width, height, half)
        thickness = max(2, short // 16)
        cv2.rectangle(image, (cx - half, cy - half), (cx + half, cy + half), colour, thickness)
    elif name == "stripes":
        period = int(rng.integers(6, 14))
        angle = rng.uniform(0, np.pi)
        ys, xs = np.mgrid[0:height, 0:width]
        phase = (xs * np.cos(angle) + ys * np.sin(angle)) / period
        image[(phase % 1.0) < 0.5] = colour
    elif name == "checkerboard":
        cell = int(rng.integers(6, 14))
        ys, xs = np.mgrid[0:height, 0:width]
        image[((ys // cell) + (xs // cell)) % 2 == 0] = colour
    return image


def classes_index(name: str) -> int:
    if name not in SHAPE_CLASSES:
        raise ValueError(f"unknown shape class {name!r}; known: {SHAPE_CLASSES}")
    return SHAPE_CLASSES.index(name)


def _class_colour(index: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated BGR colour whose hue is the class's own (+-10 degrees)."""
    hue = (index * 45 + int(rng.integers(-5, 6))) % 180  # OpenCV hue: 0..179
    hsv = np.array([[[hue, rng.integers(170, 256), rng.integers(170, 256)]]], dtype=np.uint8)
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def _centre(rng: np.random.Generator, width: int, height: int, margin: int) -> tuple[int, int]:
    return (
        int(rng.integers(margin, max(margin + 1, width - margin))),
        int(rng.integers(margin, max(margin + 1, height - margin))),
    )


@dataclass(frozen=True)
class TrainedShapesModel:
    """A from-scratch Keras ResNet-50 on the shapes dataset, with its bundle and held-out images."""

    data_dir: Path
    model_path: Path
    bundle_dir: Path
    classes: list[str]
    held_out_paths: list[str]
    held_out_labels: list[int]
    held_out_accuracy: float
    skipped: list[str]


# About 1.5 minutes of training on two quiet CPU cores (12 epochs of 6 steps); the classes are easy
# (see above), and held-out accuracy reaches about 0.9.
SHAPES_TRAINING = {
    "per_class": 30,
    "input_size": 32,
    "epochs": 12,
    "batch_size": 16,
    "learning_rate": 1e-3,
}


def train_shapes_model(work_dir: Path, corrupt_file: bool = True) -> TrainedShapesModel:
    """Generate the dataset, train from scratch (`--weights none`), build the bundle.

    For tests and accuracy gates that need a *trained* model: its outputs are confident and depend
    on the input, unlike random weights. With `corrupt_file`, one unreadable JPEG sits among the
    training images, to show that it is left out rather than stopping the training.
    """
    from engine_build.keras_export import build_from_keras
    from engine_build.keras_finetune import FinetuneOptions, finetune

    work_dir = Path(work_dir)
    data_dir = make_shapes_dataset(work_dir / "data", per_class=SHAPES_TRAINING["per_class"])
    if corrupt_file:
        (data_dir / SHAPE_CLASSES[0] / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    options = FinetuneOptions(
        weights="none",
        input_size=SHAPES_TRAINING["input_size"],
        epochs=SHAPES_TRAINING["epochs"],
        batch_size=SHAPES_TRAINING["batch_size"],
        learning_rate=SHAPES_TRAINING["learning_rate"],
        progress=False,
    )
    result = finetune(data_dir, work_dir / "shapes.keras", options, echo=lambda _m: None)
    bundle_dir = work_dir / "bundle"
    build_from_keras(result.model_path, bundle_dir)
    return TrainedShapesModel(
        data_dir=data_dir,
        model_path=result.model_path,
        bundle_dir=bundle_dir,
        classes=result.classes,
        held_out_paths=[e.path for e in result.held_out],
        held_out_labels=[e.label for e in result.held_out],
        held_out_accuracy=float(result.held_out_accuracy or 0.0),
        skipped=result.skipped,
    )
