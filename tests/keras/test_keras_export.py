"""`labeler build --keras`: Keras conventions in the sidecar, bundle outputs equal to Keras' own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from keras_models import save_tiny_classifier
from label_agreement import assert_same_labels_up_to_ties

from engine_build.errors import BuildError
from engine_build.keras_export import (
    CAFFE_MEAN_BGR_255,
    build_from_keras,
    caffe_normalize,
    import_keras,
    labels_path_for,
    load_keras_model,
)
from engine_build.verify import load_crops
from worker.cli import main
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner
from worker.sidecar import ModelSpec

# Keras' torch backend calls np.array(tensor) in a way NumPy 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _photos(photo_dir: Path) -> list[Path]:
    return sorted(photo_dir.glob("*.jpg"))


def test_sidecar_records_keras_layout_and_caffe_preprocessing(tiny_keras_model, tmp_path, photo_dir):
    spec = build_from_keras(tiny_keras_model, tmp_path / "bundle", verify_images=_photos(photo_dir))
    prep = spec.preprocessing
    assert prep.model_layout == "NHWC"
    assert prep.model_channel_order == "BGR"
    assert prep.resize == "exact" and prep.crop_size == (48, 48)
    assert np.allclose(np.asarray(prep.mean) * 255, CAFFE_MEAN_BGR_255)
    assert np.allclose(np.asarray(prep.std) * 255, 1.0)
    assert spec.source["kind"] == "keras" and spec.source["keras_backend"] == "torch"
    assert spec.source["verification"]["images"] == len(_photos(photo_dir))
    assert ModelSpec.load(tmp_path / "bundle") == spec


def test_bundle_probabilities_and_features_equal_keras_on_photos(tiny_keras_model, tmp_path, photo_dir):
    """The worker's crops through the bundle vs the same crops through Keras with preprocess_input."""
    keras = import_keras()
    spec = build_from_keras(tiny_keras_model, tmp_path / "bundle")
    crops = load_crops(_photos(photo_dir), spec.preprocessing)
    model = load_keras_model(tiny_keras_model)
    rgb = crops[..., ::-1].astype(np.float32)
    expected = model.predict(keras.applications.resnet50.preprocess_input(rgb), verbose=0)
    penultimate = keras.Model(model.inputs, model.get_layer("head").input)
    expected_features = penultimate.predict(caffe_normalize(crops), verbose=0)
    with OnnxRuntimeRunner(tmp_path / "bundle", spec) as runner:
        out = runner.infer(crops, want_features=True)
        single = runner.infer(crops[:1]).probabilities
    assert spec.features_output == "features" and spec.feature_size == 16
    assert np.abs(out.probabilities - expected).max() < 1e-4
    assert np.abs(out.features - expected_features).max() < 1e-3
    assert_same_labels_up_to_ties(expected, out.probabilities.argmax(1), tie=2e-4)  # 2x the 1e-4 above
    assert np.abs(single - expected[:1]).max() < 1e-4  # the batch axis is dynamic


def test_logits_model_gets_a_softmax(tmp_path, photo_dir):
    path = save_tiny_classifier(tmp_path / "logits.keras", activation="linear")
    spec = build_from_keras(path, tmp_path / "bundle")
    crops = load_crops(_photos(photo_dir), spec.preprocessing)
    logits = load_keras_model(path).predict(caffe_normalize(crops), verbose=0)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    with OnnxRuntimeRunner(tmp_path / "bundle", spec) as runner:
        got = runner.infer(crops).probabilities
    assert spec.source["output_is_logits"] is True
    assert np.allclose(got.sum(1), 1.0, atol=1e-5)
    assert np.abs(got - expected).max() < 1e-4


def test_sigmoid_head_is_refused_with_a_reason(tmp_path):
    path = save_tiny_classifier(tmp_path / "sigmoid.keras", activation="sigmoid")
    with pytest.raises(BuildError, match="softmax probabilities or linear logits"):
        build_from_keras(path, tmp_path / "bundle")


def test_labels_file_beside_the_model_is_used_and_checked(tmp_path):
    path = save_tiny_classifier(tmp_path / "named.keras")
    labels_path_for(path).write_text("cat\ndog\nfox\n")
    assert build_from_keras(path, tmp_path / "b1").classes == ("cat", "dog", "fox")
    labels_path_for(path).write_text("cat\ndog\n")
    with pytest.raises(BuildError, match="2 labels but the model has 3 classes"):
        build_from_keras(path, tmp_path / "b2")


def test_not_a_keras_file_fails_clearly(tmp_path):
    bogus = tmp_path / "bogus.keras"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(BuildError, match="cannot load .* as a Keras 3 model"):
        build_from_keras(bogus, tmp_path / "bundle")


def test_cli_build_keras_uses_keras_defaults_unless_told_otherwise(tiny_keras_model, tmp_path):
    runner = CliRunner()
    plain = runner.invoke(main, ["build", "--keras", str(tiny_keras_model), "--out", str(tmp_path / "a")])
    assert plain.exit_code == 0, plain.output
    assert "BGR NHWC" in plain.output and "top-1 agreement 100%" in plain.output
    custom = runner.invoke(
        main,
        ["build", "--keras", str(tiny_keras_model), "--out", str(tmp_path / "b"), "--channel-order", "RGB",
         "--mean", "0,0,0", "--std", "1,1,1"],
    )  # fmt: skip
    assert custom.exit_code == 0, custom.output
    prep = ModelSpec.load(tmp_path / "b").preprocessing
    assert prep.model_channel_order == "RGB" and prep.mean == (0.0, 0.0, 0.0) and prep.std == (1.0, 1.0, 1.0)
    assert prep.resize == "exact" and prep.model_layout == "NHWC"
    wrong = runner.invoke(
        main, ["build", "--keras", str(tiny_keras_model), "--out", str(tmp_path / "c"), "--input-size", "64"]
    )
    assert wrong.exit_code != 0 and "contradicts the model's fixed input" in wrong.output
    both = runner.invoke(
        main, ["build", "--keras", str(tiny_keras_model), "--weights", "random", "--out", str(tmp_path / "d")]
    )
    assert both.exit_code != 0 and "exactly one of" in both.output
