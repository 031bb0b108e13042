"""The ResNet-50 declared as data has the published shape and torchvision's parameter names, and its
classes behave like timm's: importable, picklable, forward_features / forward_head / forward."""

from __future__ import annotations

import io
import pickle

import pytest

torch = pytest.importorskip("torch")

from engine_build.torch_export import ProbabilitiesAndFeatures, model_from_weights  # noqa: E402
from engine_build.weights import LoadedWeights, _unwrap  # noqa: E402
from worker.resnet import (  # noqa: E402
    Bottleneck,
    ResNet,
    count_parameters,
    logits_and_features,
    resnet50,
    resnet50_spec,
)


def test_resnet50_has_the_published_parameter_count():
    assert count_parameters(resnet50()) == 25_557_032


def test_stages_and_widths_match_the_paper():
    spec = resnet50_spec()
    assert [s.blocks for s in spec.stages] == [3, 4, 6, 3]
    assert [(s.width, s.out_channels) for s in spec.stages] == [
        (64, 256),
        (128, 512),
        (256, 1024),
        (512, 2048),
    ]
    assert (spec.stem_channels, spec.stem_kernel, spec.feature_size) == (64, 7, 2048)


def test_state_dict_names_and_shapes_are_torchvisions():
    state = resnet50().state_dict()
    assert len(state) == 320  # torchvision resnet50().state_dict() has 320 entries
    expected = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.conv3.weight": (1024, 256, 1, 1),
        "layer4.0.downsample.1.running_mean": (2048,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    }
    for name, shape in expected.items():
        assert tuple(state[name].shape) == shape, name
    assert "layer1.1.downsample.0.weight" not in state  # only the first block of a stage projects


def test_stages_have_the_spatial_sizes_of_resnet50_and_the_head_pools_and_classifies():
    model = resnet50(num_classes=7).eval()
    x = torch.zeros(2, 3, 224, 224)
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        assert tuple(stem.shape) == (2, 64, 56, 56)
        sizes = []
        for index in range(1, 5):
            stem = getattr(model, f"layer{index}")(stem)
            sizes.append(tuple(stem.shape[1:]))
        feature_map = model.forward_features(x)
        features = model.forward_head(feature_map, pre_logits=True)
        logits = model(x)
    assert sizes == [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
    assert tuple(feature_map.shape) == (2, 2048, 7, 7)
    assert tuple(features.shape) == (2, 2048) == (2, model.num_features)
    assert tuple(logits.shape) == (2, 7)


def _small(num_classes: int = 5, seed: int = 0) -> ResNet:
    """A base-width-8 ResNet-50 with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = resnet50(num_classes, base_width=8)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_forward_is_the_classifier_on_the_pre_logits_features():
    model = _small()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
        pair = logits_and_features(model, x)
    assert tuple(features.shape) == (3, 8 * 8 * 4) == (3, model.num_features)  # base width 8: 256
    torch.testing.assert_close(logits, model.fc(features))
    torch.testing.assert_close(pair[0], logits)
    torch.testing.assert_close(pair[1], features)


def test_the_classes_are_module_level_importable_and_picklable():
    model = _small()
    assert isinstance(model, ResNet) and isinstance(model.layer1[0], Bottleneck)
    assert type(resnet50(3, base_width=8)) is type(model)  # one class, not a new one per call
    assert pickle.loads(pickle.dumps(ResNet)) is ResNet
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, ResNet) and loaded.spec == model.spec
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_the_export_wrapper_gives_probabilities_and_features_of_one_pass():
    model = _small()
    wrapper = ProbabilitiesAndFeatures(model).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        probabilities, features = wrapper(x)
        expected_features = model.forward_head(model.forward_features(x), pre_logits=True)
        expected = torch.softmax(model(x), dim=1)
    torch.testing.assert_close(probabilities, expected)
    torch.testing.assert_close(features, expected_features)
    assert [name for name, _ in wrapper.named_parameters()][0] == "inner.conv1.weight"


def test_checkpoints_wrapped_or_prefixed_load_unchanged():
    source = resnet50(num_classes=5, base_width=8)
    state = source.state_dict()
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    unwrapped = _unwrap(wrapped)
    assert set(unwrapped) == set(state)
    model, spec = model_from_weights(LoadedWeights(unwrapped, 5, "test"))
    assert spec.num_classes == 5 and spec.stem_channels == 8
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
