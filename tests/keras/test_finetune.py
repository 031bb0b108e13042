"""`labeler finetune` pieces: the image-folder dataset, the split, bad files, weights, phases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from engine_build.errors import BuildError
from engine_build.keras_export import caffe_normalize, caffe_preprocessing, import_keras, load_keras_model
from engine_build.keras_finetune import (
    Example,
    FinetuneOptions,
    augment_crops,
    build_classifier,
    drop_unreadable,
    finetune,
    make_batches,
    scan_image_folders,
    split_held_out,
)
from engine_build.shapes_dataset import SHAPE_CLASSES, make_shapes_dataset
from worker.cli import main
from worker.pipeline.preprocess import decode_and_crop

# Keras' torch backend calls np.array(tensor) in a way NumPy 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """Four classes of five images, plus a text file and an empty folder that must be ignored."""
    root = make_shapes_dataset(tmp_path_factory.mktemp("small") / "data", per_class=5, seed=7)
    (root / SHAPE_CLASSES[1] / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    return root


def test_scan_gives_classes_in_sorted_folder_order(small_dataset):
    classes, examples = scan_image_folders(small_dataset)
    assert classes == sorted(SHAPE_CLASSES)
    assert len(examples) == 20
    assert all(Path(e.path).parent.name == classes[e.label] for e in examples)
    assert not any(e.path.endswith(".txt") for e in examples)


def test_scan_needs_two_classes(tmp_path):
    make_shapes_dataset(tmp_path, per_class=2, classes=("disc",))
    with pytest.raises(BuildError, match="at least two class folders"):
        scan_image_folders(tmp_path)


def test_held_out_split_is_stratified_disjoint_and_seeded():
    examples = [Example(f"{label}/{i}.jpg", label) for label in range(3) for i in range(10)]
    train, held = split_held_out(examples, 0.2, seed=1)
    assert sorted(e.label for e in held) == [0, 0, 1, 1, 2, 2]
    assert not {e.path for e in train} & {e.path for e in held}
    assert len(train) + len(held) == len(examples)
    assert split_held_out(examples, 0.2, seed=1)[1] == held
    assert split_held_out(examples, 0.2, seed=2)[1] != held


def test_unreadable_files_are_left_out_not_fatal(small_dataset, tmp_path):
    _, examples = scan_image_folders(small_dataset)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(examples[0].path).read_bytes()[:200])  # truncated JPEG
    missing = tmp_path / "gone.png"
    kept, skipped = drop_unreadable(
        [*examples[:3], Example(str(broken), 0), Example(str(missing), 1)], caffe_preprocessing((32, 32)), 2
    )
    assert kept == examples[:3]
    assert skipped == [str(broken), str(missing)]


def test_batches_are_the_worker_crops_caffe_normalized(small_dataset):
    _, examples = scan_image_folders(small_dataset)
    prep = caffe_preprocessing((32, 32))
    plain = make_batches(examples, prep, 8, augment=False, seed=0, workers=1)
    x, y = plain[0]
    expected = caffe_normalize(
        np.stack([decode_and_crop(Path(e.path).read_bytes(), prep) for e in examples[:8]])
    )
    assert len(plain) == 3 and x.shape == (8, 32, 32, 3) and x.dtype == np.float32
    assert np.array_equal(x, expected)
    assert list(y) == [e.label for e in examples[:8]]
    crops = np.stack([decode_and_crop(Path(e.path).read_bytes(), prep) for e in examples[:8]])
    augmented = augment_crops(crops, np.random.default_rng(0))
    assert augmented.shape == crops.shape and augmented.dtype == np.uint8
    assert not np.array_equal(augmented, crops)


def test_imagenet_offline_fails_with_a_message_naming_the_alternatives(small_dataset, tmp_path):
    """A real download attempt from a child process that cannot reach the network (proxy on a closed port)."""
    env = dict(os.environ, KERAS_HOME=str(tmp_path / "keras-home"), HTTPS_PROXY="http://127.0.0.1:9")
    env["https_proxy"] = env["HTTPS_PROXY"]
    done = subprocess.run(
        [sys.executable, "-m", "worker", "finetune", str(small_dataset), "--out", str(tmp_path / "m.keras"),
         "--weights", "imagenet", "--input-size", "32", "--epochs", "0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert "could not download the ImageNet weights" in done.stderr
    assert "--weights FILE" in done.stderr and "--weights none" in done.stderr
    assert not (tmp_path / "m.keras").exists()


def test_local_weights_file_frozen_head_phase_then_last_stage_fine_tune(small_dataset, tmp_path):
    """--weights FILE loads the backbone; the head phase leaves it untouched; fine-tuning moves conv5 only."""
    keras = import_keras()
    donor = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    weights_file = tmp_path / "backbone.weights.h5"
    donor.save_weights(str(weights_file))
    options = FinetuneOptions(
        weights=str(weights_file), input_size=32, epochs=1, fine_tune_epochs=1, batch_size=8,
        fine_tune_learning_rate=1e-3, progress=False,
    )  # fmt: skip
    result = finetune(small_dataset, tmp_path / "out" / "tuned.keras", options, echo=lambda _m: None)
    backbone = load_keras_model(result.model_path).get_layer("resnet50")

    def weights(model, name):
        return [np.asarray(w) for w in model.get_layer(name).get_weights()]

    for frozen in ("conv1_conv", "conv2_block1_1_conv", "conv4_block6_3_conv", "conv5_block3_3_bn"):
        assert all(
            np.array_equal(a, b)
            for a, b in zip(weights(backbone, frozen), weights(donor, frozen), strict=True)
        )
    tuned = weights(backbone, "conv5_block3_3_conv")
    assert not np.array_equal(tuned[0], weights(donor, "conv5_block3_3_conv")[0])
    assert result.labels_path.read_text().split() == sorted(SHAPE_CLASSES)
    assert set(result.history) >= {"head_loss", "fine_tune_loss", "head_val_accuracy"}


def test_weights_file_that_does_not_fit_is_refused(tmp_path):
    bogus = tmp_path / "other.weights.h5"
    keras = import_keras()
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save_weights(str(bogus))
    with pytest.raises(BuildError, match="does not fit keras.applications.ResNet50"):
        build_classifier(2, FinetuneOptions(weights=str(bogus), input_size=32))


def test_cli_writes_model_labels_and_report_then_build_uses_the_labels(small_dataset, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli" / "shapes.keras"
    done = runner.invoke(
        main,
        ["finetune", str(small_dataset), "--out", str(out), "--weights", "none", "--input-size", "32",
         "--epochs", "0", "--no-progress"],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert out.is_file() and "held-out accuracy" in done.output
    assert (tmp_path / "cli" / "shapes.labels.txt").read_text().split() == sorted(SHAPE_CLASSES)
    assert '"held_out"' in (tmp_path / "cli" / "shapes.training.json").read_text()
    built = runner.invoke(main, ["build", "--keras", str(out), "--out", str(tmp_path / "bundle")])
    assert built.exit_code == 0, built.output
    assert "checkerboard, disc, square_outline, stripes" in built.output
    refused = runner.invoke(
        main,
        ["finetune", str(small_dataset), "--out", str(out), "--weights", "none", "--fine-tune-epochs", "1"],
    )
    assert refused.exit_code != 0 and "needs pretrained --weights" in refused.output
