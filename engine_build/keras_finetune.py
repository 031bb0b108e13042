"""Transfer learning with Keras: a ResNet-50 backbone, a new softmax head, your own classes.

The classic recipe: `keras.applications.ResNet50(include_top=False)`, global average pooling and
a dense softmax with one output per class; train the head with the backbone frozen (its batch norm
kept in inference mode), then optionally unfreeze the last stage (conv5) at a lower learning rate.
With `weights="none"` there is nothing to keep frozen, so the whole network trains from scratch.

Images are decoded and resized by the worker's own `decode_and_crop` with the "exact" policy that
the bundle's sidecar will record, and normalized caffe-style as preprocess_input does, so training,
the bundle and `labeler run` see the same pixels. Augmentation (flip, shift, brightness) is done
on the uint8 crops in the data pipeline, so the saved model is only backbone and head and exports
cleanly. Files that cannot be decoded are listed and left out; they never stop the training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine_build.errors import BuildError
from engine_build.keras_export import (
    caffe_normalize,
    caffe_preprocessing,
    import_keras,
    labels_path_for,
    training_report_path_for,
)
from worker.pipeline.errors import ImageError
from worker.pipeline.inputs import iter_input_paths
from worker.pipeline.preprocess import decode_and_crop
from worker.sidecar import Preprocessing

log = logging.getLogger(__name__)

LAST_STAGE_PREFIX = "conv5_"


@dataclass(frozen=True)
class Example:
    path: str
    label: int


@dataclass(frozen=True)
class FinetuneOptions:
    """Training settings; the defaults suit a small dataset on top of ImageNet weights."""

    weights: str = "imagenet"  # "imagenet", "none", or a path to a Keras weights file
    input_size: int = 224
    epochs: int = 5
    fine_tune_epochs: int = 0
    batch_size: int = 32
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-5
    held_out_fraction: float = 0.2
    augment: bool = True
    dropout: float = 0.2
    seed: int = 0
    workers: int = 2
    progress: bool = True
    # Batch-norm momentum when training from scratch: Keras' 0.99 needs far more steps than a small
    # dataset gives before its moving statistics (used at inference) settle.
    scratch_bn_momentum: float = 0.9


@dataclass
class FinetuneResult:
    model_path: Path
    labels_path: Path
    report_path: Path
    classes: list[str]
    held_out: list[Example]
    held_out_accuracy: float | None
    skipped: list[str] = field(default_factory=list)
    history: dict[str, list[float]] = field(default_factory=dict)


def scan_image_folders(data_dir: Path) -> tuple[list[str], list[Example]]:
    """One folder per class, class index in sorted folder-name order (as Keras' loaders do)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BuildError(f"{data_dir} is not a directory of class folders")
    classes: list[str] = []
    examples: list[Example] = []
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        paths = list(iter_input_paths([str(folder)]))
        if not paths:
            continue
        label = len(classes)
        classes.append(folder.name)
        examples.extend(Example(path, label) for path in paths)
    if len(classes) < 2:
        raise BuildError(f"{data_dir} needs at least two class folders with images, found {classes}")
    return classes, examples


def split_held_out(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Stratified split: the same fraction of every class is held out (at least one if it has two)."""
    if not 0.0 <= fraction < 1.0:
        raise BuildError(f"held-out fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train: list[Example] = []
    held_out: list[Example] = []
    for label in sorted({e.label for e in examples}):
        members = [e for e in examples if e.label == label]
        order = rng.permutation(len(members))
        count = 0 if fraction == 0 else min(len(members) - 1, max(1, round(len(members) * fraction)))
        held_out += [members[i] for i in order[:count]]
        train += [members[i] for i in order[count:]]
    return train, held_out


def load_crop(path: str, prep: Preprocessing) -> np.ndarray | None:
    """The worker's decode path; None for a file that cannot be read or decoded."""
    try:
        with open(path, "rb") as handle:
            return decode_and_crop(handle.read(), prep)
    except (OSError, ImageError) as exc:
        log.warning("leaving out %s: %s", path, exc)
        return None


def drop_unreadable(
    examples: Sequence[Example], prep: Preprocessing, workers: int
) -> tuple[list[Example], list[str]]:
    """Decode every file once up front, so a bad file is reported before training, not mid-epoch."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        ok = list(pool.map(lambda e: load_crop(e.path, prep) is not None, examples))
    kept = [e for e, good in zip(examples, ok, strict=True) if good]
    return kept, [e.path for e, good in zip(examples, ok, strict=True) if not good]


def augment_crops(crops: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flip, shift by up to 1/8 of the size (edges reflected), brightness +-15%."""
    out = np.empty_like(crops)
    n, height, width, _ = crops.shape
    pad_y, pad_x = max(1, height // 8), max(1, width // 8)
    for i in range(n):
        image = crops[i, :, ::-1] if rng.random() < 0.5 else crops[i]
        padded = np.pad(image, ((pad_y, pad_y), (pad_x, pad_x), (0, 0)), mode="reflect")
        top, left = rng.integers(0, 2 * pad_y + 1), rng.integers(0, 2 * pad_x + 1)
        shifted = padded[top : top + height, left : left + width].astype(np.float32)
        out[i] = np.clip(shifted * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
    return out


def make_batches(
    examples: Sequence[Example],
    prep: Preprocessing,
    batch_size: int,
    augment: bool,
    seed: int,
    workers: int,
):
    """A keras.utils.PyDataset of (caffe-normalized float batch, int labels), reshuffled per epoch."""
    keras = import_keras()

    class ImageFolderBatches(keras.utils.PyDataset):
        """Batches are decoded on `workers` threads; each batch's randomness depends only on
        (seed, epoch, index), so a run is reproducible whichever thread loads which batch."""

        def __init__(self) -> None:
            super().__init__(workers=workers, use_multiprocessing=False)
            self._epoch = 0
            self._order = self._shuffled()

        def _shuffled(self) -> np.ndarray:
            order = np.arange(len(examples))
            if augment:
                np.random.default_rng([seed, self._epoch]).shuffle(order)
            return order

        def __len__(self) -> int:
            return math.ceil(len(examples) / batch_size)

        def __getitem__(self, index: int):
            chosen = [examples[i] for i in self._order[index * batch_size : (index + 1) * batch_size]]
            loaded = [(load_crop(e.path, prep), e.label) for e in chosen]
            good = [(crop, label) for crop, label in loaded if crop is not None]
            if not good:  # every file of this batch vanished since the up-front check
                raise BuildError(f"no readable image left in batch {index}")
            crops = np.stack([crop for crop, _ in good])
            if augment:
                crops = augment_crops(crops, np.random.default_rng([seed, self._epoch, index]))
            labels = np.asarray([label for _, label in good], dtype=np.int64)
            return caffe_normalize(crops), labels

        def on_epoch_end(self) -> None:
            self._epoch += 1
            self._order = self._shuffled()

    return ImageFolderBatches()


def build_classifier(num_classes: int, options: FinetuneOptions) -> tuple[Any, Any]:
    """(model, backbone): ResNet50 without its top, pooled, dropout, dense softmax."""
    keras = import_keras()
    size = (options.input_size, options.input_size, 3)
    weights = _backbone_weights(options.weights)
    try:
        backbone = keras.applications.ResNet50(include_top=False, weights=weights, input_shape=size)
    except Exception as exc:
        if options.weights in ("none", "imagenet"):
            raise
        raise BuildError(
            f"--weights {options.weights} does not fit keras.applications.ResNet50(include_top=False): {exc}"
        ) from None
    scratch = options.weights == "none"
    if scratch:
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = options.scratch_bn_momentum
    inputs = keras.Input(size, name="image")
    # Pretrained: batch norm stays in inference mode even when conv5 is unfrozen later, so small
    # fine-tuning batches cannot wreck the ImageNet statistics.
    x = backbone(inputs) if scratch else backbone(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(options.dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="resnet50_finetuned"), backbone


def _backbone_weights(weights: str) -> str | None:
    if weights == "none":
        return None
    if weights == "imagenet":
        return _imagenet_backbone_file()
    path = Path(weights)
    if not path.is_file():
        raise BuildError(f"--weights {weights}: no such file (use imagenet, none, or a Keras weights file)")
    return str(path)


def _imagenet_backbone_file() -> str:
    """Keras' own download of the no-top ResNet50 weights, with a clear message when offline.

    The same file, URL and MD5 that ResNet50(weights="imagenet", include_top=False) fetches, and the
    same cache ($KERAS_HOME/models), fetched here first so a failure can say what to do instead.
    """
    keras = import_keras()
    name = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    origin = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + name
    try:
        return keras.utils.get_file(
            name, origin, cache_subdir="models", file_hash="4d473c1dd8becc155b73f8504c6f6626"
        )
    except Exception as exc:
        raise BuildError(
            f"could not download the ImageNet weights for ResNet50 ({type(exc).__name__}: {exc}). "
            f"Offline? Fetch {name} on a connected machine and pass --weights FILE, "
            "or train from scratch with --weights none."
        ) from None


def _set_trainable(model: Any, backbone: Any, phase: str) -> None:
    keras = import_keras()
    if phase == "scratch":
        model.trainable = True
        return
    backbone.trainable = phase == "fine_tune"
    if phase == "fine_tune":
        for layer in backbone.layers:
            layer.trainable = layer.name.startswith(LAST_STAGE_PREFIX) and not isinstance(
                layer, keras.layers.BatchNormalization
            )


def finetune(
    data_dir: Path,
    out_path: Path,
    options: FinetuneOptions = FinetuneOptions(),  # noqa: B008 (frozen dataclass)
    echo: Callable[[str], None] = print,
) -> FinetuneResult:
    """Train on DATA_DIR's class folders and save MODEL.keras, its labels file and a report."""
    keras = import_keras()
    out_path = Path(out_path)
    if out_path.suffix != ".keras":
        raise BuildError(f"--out must end in .keras (Keras 3's model format), got {out_path.name}")
    keras.utils.set_random_seed(options.seed)
    prep = caffe_preprocessing((options.input_size, options.input_size))
    classes, examples = scan_image_folders(data_dir)
    examples, skipped = drop_unreadable(examples, prep, options.workers)
    if skipped:
        echo(f"left out {len(skipped)} unreadable file(s), e.g. {skipped[0]}")
    train, held_out = split_held_out(examples, options.held_out_fraction, options.seed)
    echo(f"{len(classes)} classes, {len(train)} training and {len(held_out)} held-out images")
    model, backbone = build_classifier(len(classes), options)
    train_data = make_batches(train, prep, options.batch_size, options.augment, options.seed, options.workers)
    held_data = (
        make_batches(held_out, prep, options.batch_size, False, options.seed, options.workers)
        if held_out
        else None
    )
    phases = (
        [("scratch", options.epochs, options.learning_rate)]
        if options.weights == "none"
        else [("head", options.epochs, options.learning_rate)]
        + [("fine_tune", options.fine_tune_epochs, options.fine_tune_learning_rate)]
    )
    history: dict[str, list[float]] = {}
    for phase, epochs, rate in phases:
        if epochs <= 0:
            continue
        _set_trainable(model, backbone, phase)
        model.compile(
            optimizer=keras.optimizers.Adam(rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        echo(f"phase {phase}: {epochs} epoch(s) at learning rate {rate:g}")
        started = time.monotonic()
        fit = model.fit(
            train_data, validation_data=held_data, epochs=epochs, verbose=1 if options.progress else 2
        )
        echo(f"phase {phase} took {time.monotonic() - started:.0f} s")
        for key, values in fit.history.items():
            history.setdefault(f"{phase}_{key}", []).extend(float(v) for v in values)
    accuracy = None
    if held_out:
        predicted = predict_files(model, [e.path for e in held_out], prep, options.batch_size)
        accuracy = float(np.mean(predicted.argmax(1) == np.asarray([e.label for e in held_out])))
        echo(f"held-out accuracy {accuracy:.1%} on {len(held_out)} images")
    result = _save(model, out_path, classes, held_out, accuracy, skipped, history, options, prep)
    echo(f"saved {result.model_path}, labels in {result.labels_path}")
    return result


def predict_files(model: Any, paths: Sequence[str], prep: Preprocessing, batch_size: int = 32) -> np.ndarray:
    """Keras' predictions for image files, through the same decode path as training.

    Decoded a few batches at a time, so a large held-out set never sits in memory as float32.
    """
    chunk = max(1, batch_size) * 8
    rows = []
    for start in range(0, len(paths), chunk):
        crops = [load_crop(p, prep) for p in paths[start : start + chunk]]
        if any(c is None for c in crops):
            raise BuildError("some files could not be decoded; see the log")
        batch = caffe_normalize(np.stack(crops))
        rows.append(np.asarray(model.predict(batch, batch_size=batch_size, verbose=0)))
    return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


def _save(
    model: Any,
    out_path: Path,
    classes: list[str],
    held_out: list[Example],
    accuracy: float | None,
    skipped: list[str],
    history: dict[str, list[float]],
    options: FinetuneOptions,
    prep: Preprocessing,
) -> FinetuneResult:
    """The model, its labels in class order, and a report (held-out files, accuracy, settings)."""
    import keras

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.stem}.{os.getpid()}.keras")
    model.save(str(tmp))
    tmp.replace(out_path)
    labels = labels_path_for(out_path)
    labels.write_text("".join(f"{name}\n" for name in classes), encoding="utf-8")
    report = training_report_path_for(out_path)
    report.write_text(
        json.dumps(
            {
                "classes": classes,
                "held_out_accuracy": accuracy,
                "held_out": [asdict(e) for e in held_out],
                "skipped": skipped,
                "history": history,
                "options": asdict(options),
                "preprocessing": asdict(prep),
                "keras_version": keras.__version__,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return FinetuneResult(out_path, labels, report, classes, held_out, accuracy, skipped, history)
