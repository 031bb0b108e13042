"""worker.runners.torch_loader on the CPU: each loader alone, and the torch-cuda runner handed one.

CUDA and FP16 only run on a GPU machine (bench/gpu_check.py); what these check is the part that
does not depend on one: the bundle's module rebuilt with its weights, the device refusal, the move
to a device, dtype and memory format, and the runner running whatever module it is given."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine_build.torch_export import model_from_weights  # noqa: E402
from engine_build.verify import normalize_reference  # noqa: E402
from engine_build.weights import random_weights  # noqa: E402
from worker.resnet import ResNet, logits_and_features, resnet50  # noqa: E402
from worker.runners.base import RunnerError  # noqa: E402
from worker.runners.torch_cuda_runner import TorchCudaRunner  # noqa: E402
from worker.runners.torch_loader import BundleResNet, ModuleOnDevice, torch_device  # noqa: E402
from worker.sidecar import ModelSpec  # noqa: E402


def _images(count: int, size: int = 224) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(5))


def test_bundle_resnet_is_the_bundles_model_with_batchnorm_folded(tiny_bundle):
    """The tiny bundle was built from random_weights(10, seed=1, base_width=8): the module read back
    from its ONNX computes what that source module computes, without BatchNorm layers."""
    spec = ModelSpec.load(tiny_bundle)
    model = BundleResNet(tiny_bundle, spec)()
    assert isinstance(model, ResNet) and not model.training
    assert not [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    source, _ = model_from_weights(random_weights(spec.num_classes, seed=1, base_width=8))
    x = _images(2)
    with torch.no_grad():
        logits, features = logits_and_features(model, x)
        expected_logits, expected_features = logits_and_features(source, x)
    assert tuple(features.shape) == (2, 256)  # base width 8: 2048 / 8
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(features, expected_features, rtol=1e-4, atol=1e-4)


def test_bundle_resnet_refuses_a_bundle_not_built_from_pytorch_when_called(tmp_path, tiny_bundle):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    spec = ModelSpec.load(bundle)
    loader = BundleResNet(bundle, ModelSpec.from_dict({**spec.to_dict(), "source": {"kind": "onnx"}}))
    with pytest.raises(RunnerError, match="built from PyTorch weights"):
        loader()


def test_torch_device_refuses_a_cuda_device_it_cannot_see():
    assert torch_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RunnerError, match="PyTorch sees no CUDA device"):
        torch_device("cuda:0")


def test_module_on_device_builds_only_when_called_in_eval_mode_dtype_and_layout():
    built = []

    def build() -> ResNet:
        built.append(True)
        torch.manual_seed(0)
        return resnet50(3, base_width=8).train()

    for channels_last in (True, False):
        loader = ModuleOnDevice(build, torch.device("cpu"), torch.float64, channels_last)
        assert len(built) == (0 if channels_last else 1)  # nothing built until the call
        model = loader()
        assert not model.training
        assert {p.dtype for p in model.parameters()} == {torch.float64}
        weight = model.layer1[0].conv2.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    reference = build().eval().double()
    x = _images(2, 64).double()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_torch_runner_runs_the_module_it_is_handed(tiny_bundle):
    """build_model replaces the bundle's weights (the bench's random module where ONNX cannot be
    exported); it is called at load(), and the outputs are that module's."""
    spec = ModelSpec.load(tiny_bundle)
    calls = []

    def build() -> ResNet:
        calls.append(True)
        torch.manual_seed(7)
        return resnet50(spec.num_classes, base_width=8).eval()

    runner = TorchCudaRunner(tiny_bundle, spec, device="cpu", precision="fp32", build_model=build)
    assert calls == []
    crops = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    with runner:
        got = runner.infer(crops, want_features=True)
    assert calls == [True]
    x = torch.from_numpy(normalize_reference(crops, spec.preprocessing))
    with torch.no_grad():
        logits, features = logits_and_features(build(), x)
    np.testing.assert_allclose(got.probabilities, torch.softmax(logits, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(got.features, features.numpy(), rtol=1e-4, atol=1e-4)
