"""Bundles: the ONNX graph against the PyTorch model on photos, the sidecar, imports, the default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402

from engine_build import weights as weights_module  # noqa: E402
from engine_build.build import build_from_onnx, build_from_weights  # noqa: E402
from engine_build.errors import BuildError  # noqa: E402
from engine_build.torch_export import model_from_weights  # noqa: E402
from engine_build.verify import load_crops, normalize_reference, sample_images  # noqa: E402
from engine_build.weights import LoadedWeights, load_weights_file, random_weights  # noqa: E402
from worker.cli import main  # noqa: E402
from worker.resnet import logits_and_features, resnet50  # noqa: E402
from worker.runners import RunnerError  # noqa: E402
from worker.runners.onnxruntime_runner import OnnxRuntimeRunner  # noqa: E402
from worker.sidecar import ModelSpec, Preprocessing  # noqa: E402


def test_sidecar_records_what_the_worker_needs(resnet50_bundle):
    data = json.loads((resnet50_bundle / "model.json").read_text())
    assert data["input"] == {
        "name": "images",
        "height": 224,
        "width": 224,
        "channel_order": "BGR",
        "layout": "NHWC",
        "dtype": "uint8",
        "shape": ["batch", 224, 224, 3],
    }
    prep = data["preprocessing"]
    assert prep["resize"] == "shorter_side" and prep["resize_size"] == 256 and prep["crop_size"] == [224, 224]
    assert prep["mean"] == [0.485, 0.456, 0.406] and prep["std"] == [0.229, 0.224, 0.225]
    assert prep["model_channel_order"] == "RGB" and prep["model_layout"] == "NCHW"
    assert data["num_classes"] == 1000 == len(data["classes"]) and data["classes"][281] == "tabby"
    assert data["precision"] == "fp32" and len(data["checksum_sha256"]) == 64
    assert data["features_output"] == "features" and data["feature_size"] == 2048
    assert data["source"]["kind"] == "pytorch" and data["source"]["verification"]["max_abs_diff"] < 1e-3
    assert json.loads(json.dumps(ModelSpec.from_dict(data).to_dict())) == data


def test_the_embedded_default_says_loudly_that_random_labels_mean_nothing(resnet50_bundle):
    spec = ModelSpec.load(resnet50_bundle)
    assert spec.source["labels_meaningful"] is False
    assert any("RANDOM WEIGHTS" in w for w in spec.warnings)


def test_onnx_graph_matches_pytorch_on_photos(resnet50_bundle):
    """Independent of the build's own check: same weights, same crops, torch vs ONNX Runtime."""
    spec = ModelSpec.load(resnet50_bundle)
    model, _ = model_from_weights(random_weights(1000, seed=0))
    crops = load_crops(sample_images(), spec.preprocessing)
    with torch.no_grad():
        logits, features = logits_and_features(
            model, torch.from_numpy(normalize_reference(crops, spec.preprocessing))
        )
    with OnnxRuntimeRunner(resnet50_bundle, spec) as runner:
        got = runner.infer(crops, want_features=True)
    np.testing.assert_allclose(got.probabilities, torch.softmax(logits, 1).numpy(), atol=1e-4)
    np.testing.assert_allclose(got.features, features.numpy(), atol=1e-3, rtol=1e-3)
    assert got.features.shape == (len(crops), 2048)


def test_batch_axis_is_dynamic(tiny_bundle):
    model = onnx.load(str(tiny_bundle / "model.onnx"))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [224, 224, 3]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    with OnnxRuntimeRunner(tiny_bundle) as runner:
        for n in (1, 3, 17):
            assert runner.infer(np.zeros((n, 224, 224, 3), np.uint8)).probabilities.shape == (n, 10)


def test_a_tampered_model_is_refused(tiny_bundle, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(RunnerError, match="checksum"):
        OnnxRuntimeRunner(copy).load()


def test_weights_file_with_labels_round_trips(tmp_path):
    torch.manual_seed(3)
    model = resnet50(num_classes=3, base_width=8)
    torch.save(
        {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
        tmp_path / "ckpt.pth",
    )
    (tmp_path / "labels.txt").write_text("apple\nbanana\ncherry\n")
    result = CliRunner().invoke(
        main,
        [
            "build",
            "--out",
            str(tmp_path / "b"),
            "--weights",
            str(tmp_path / "ckpt.pth"),
            "--labels",
            str(tmp_path / "labels.txt"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "apple, banana, cherry" in result.output and "verified" in result.output
    spec = ModelSpec.load(tmp_path / "b")
    assert spec.classes == ("apple", "banana", "cherry") and spec.labels_meaningful and not spec.warnings


def test_pickled_code_in_a_weights_file_is_not_executed(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"state_dict": Exploit()}, handle)
    with pytest.raises(BuildError):
        load_weights_file(tmp_path / "evil.pth")
    assert not marker.exists()


def test_wrong_labels_count_is_a_clear_error(tmp_path):
    (tmp_path / "labels.txt").write_text("only-one\n")
    with pytest.raises(BuildError, match="1 labels but the model has 10"):
        build_from_weights(
            random_weights(10, base_width=8), tmp_path / "b", labels_file=tmp_path / "labels.txt"
        )


def test_imagenet_offline_names_the_offline_alternative(tmp_path, monkeypatch):
    monkeypatch.setattr(weights_module, "IMAGENET_WEIGHTS_URL", "http://127.0.0.1:9/resnet50-0676ba61.pth")
    with pytest.raises(BuildError) as caught:
        weights_module.imagenet_weights(tmp_path, timeout_s=5)
    assert "--weights /path/to/resnet50-0676ba61.pth" in str(caught.value)


def _export_plain_classifier(path: Path, layout: str, dynamic_batch: bool = True) -> torch.nn.Module:
    """A foreign classifier: float input, logits out. A few layers, not a ResNet: the import only
    sees an ONNX graph's input and output, and exporting a small graph takes seconds, not half a minute."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 7, stride=4),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 4),
    ).eval()

    class Logits(torch.nn.Module):
        def forward(self, x):
            if layout == "NHWC":
                x = x.permute(0, 3, 1, 2)
            return model(x)

    shape = (2, 3, 224, 224) if layout == "NCHW" else (2, 224, 224, 3)
    example, dynamic = torch.zeros(shape), {"x": {0: torch.export.Dim("batch", min=1, max=64)}}
    if not dynamic_batch:
        example, dynamic = example[:1], None
    torch.onnx.export(
        Logits().eval(),
        (example,),
        str(path),
        dynamo=True,
        opset_version=18,
        input_names=["data"],
        output_names=["logits"],
        dynamic_shapes=dynamic,
    )
    return model


@pytest.mark.parametrize("layout,order", [("NCHW", "RGB"), ("NHWC", "BGR")])
def test_foreign_onnx_import_matches_the_original(tmp_path, layout, order):
    _export_plain_classifier(tmp_path / "foreign.onnx", layout)
    prep = Preprocessing(
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), model_channel_order=order, model_layout=layout
    )
    spec = build_from_onnx(tmp_path / "foreign.onnx", tmp_path / "b", prep)
    assert spec.num_classes == 4 and spec.features_output is None
    assert spec.source["verification"]["max_abs_diff"] < 1e-4
    import onnxruntime as ort

    original = ort.InferenceSession(str(tmp_path / "foreign.onnx"), providers=["CPUExecutionProvider"])
    crops = load_crops(sample_images()[:2], prep)
    x = normalize_reference(crops, prep)
    logits = np.concatenate([original.run(None, {"data": x[i : i + 1]})[0] for i in range(len(x))])
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    with OnnxRuntimeRunner(tmp_path / "b") as runner:
        np.testing.assert_allclose(runner.infer(crops).probabilities, expected, atol=1e-5)


def test_random_weights_loaded_weights_carry_their_seed():
    weights = random_weights(2, seed=7, base_width=8)
    assert isinstance(weights, LoadedWeights) and weights.extra["seed"] == 7 and not weights.labels_meaningful


def test_foreign_onnx_with_a_hard_coded_batch_is_refused_with_the_fix(tmp_path):
    _export_plain_classifier(tmp_path / "static.onnx", "NCHW", dynamic_batch=False)
    with pytest.raises(BuildError, match="(?s)fixed batch size.*dynamic batch axis"):
        build_from_onnx(tmp_path / "static.onnx", tmp_path / "b", Preprocessing())
    assert not (tmp_path / "b").exists()
