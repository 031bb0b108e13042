"""The ResNet-50 declared as data has the published shape and torchvision's parameter names."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from engine_build.torch_export import model_from_weights  # noqa: E402
from engine_build.weights import LoadedWeights, _unwrap  # noqa: E402
from worker.resnet import build_resnet, count_parameters, resnet50_spec  # noqa: E402


def test_resnet50_has_the_published_parameter_count():
    assert count_parameters(build_resnet(resnet50_spec())) == 25_557_032


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
    state = build_resnet(resnet50_spec()).state_dict()
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


def test_forward_gives_logits_and_pooled_features_with_spatial_sizes_of_resnet50():
    model = build_resnet(resnet50_spec(num_classes=7)).eval()
    x = torch.zeros(2, 3, 224, 224)
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        assert tuple(stem.shape) == (2, 64, 56, 56)
        sizes = []
        for index in range(1, 5):
            stem = getattr(model, f"layer{index}")(stem)
            sizes.append(tuple(stem.shape[1:]))
        logits, features = model(x)
    assert sizes == [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
    assert tuple(logits.shape) == (2, 7) and tuple(features.shape) == (2, 2048)


def test_checkpoints_wrapped_or_prefixed_load_unchanged():
    source = build_resnet(resnet50_spec(num_classes=5, base_width=8))
    state = source.state_dict()
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    unwrapped = _unwrap(wrapped)
    assert set(unwrapped) == set(state)
    model, spec = model_from_weights(LoadedWeights(unwrapped, 5, "test"))
    assert spec.num_classes == 5 and spec.stem_channels == 8
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
