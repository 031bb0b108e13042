"""ResNet-50 declared as data, and the torch module for it with torchvision's parameter names.

The spec is the whole architecture: a 7x7/64 stride-2 stem, a 3x3 stride-2 max pool, bottleneck
stages of (3, 4, 6, 3) blocks with 1x1-3x3-1x1 widths 64/64/256 ... 512/512/2048 (stride on the 3x3,
as torchvision's "ResNet v1.5"), global average pooling and a fully connected layer. Parameter names
match torchvision's resnet50 state_dict, so ImageNet weights and fine-tuned checkpoints load as they
are. `base_width` shrinks every width for the small models the tests train and export quickly.

The classes are declared once, at module level, as timm's models/resnet.py declares them: they can be
imported, pickled and checked with isinstance, and split the forward pass the same way
(`forward_features` -> feature map, `forward_head` -> pooled features or logits, `forward` -> logits).
This module imports torch; the runtime imports it only inside the functions that need a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class StageSpec:
    blocks: int
    width: int  # channels of the 1x1 and 3x3 convolutions
    out_channels: int  # channels of the last 1x1 convolution (width * expansion)
    stride: int


@dataclass(frozen=True)
class ResNetSpec:
    stem_channels: int
    stem_kernel: int
    stages: tuple[StageSpec, ...]
    num_classes: int = 1000

    @property
    def feature_size(self) -> int:
        return self.stages[-1].out_channels


def resnet50_spec(num_classes: int = 1000, base_width: int = 64) -> ResNetSpec:
    """ResNet-50; base_width 64 is the real thing (25,557,032 parameters at 1000 classes)."""
    stages = tuple(
        StageSpec(blocks, base_width * mult, base_width * mult * 4, stride)
        for blocks, mult, stride in ((3, 1, 1), (4, 2, 2), (6, 4, 2), (3, 8, 2))
    )
    return ResNetSpec(stem_channels=base_width, stem_kernel=7, stages=stages, num_classes=num_classes)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand, plus the shortcut (projected when the
    shape changes)."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """The network for a ResNetSpec; submodules named as torchvision names them (conv1, bn1,
    layer1..layerN, fc), so its state_dict is torchvision's."""

    def __init__(self, spec: ResNetSpec) -> None:
        super().__init__()
        self.spec = spec
        self.num_classes = spec.num_classes
        self.num_features = spec.feature_size  # timm's name: the width of forward_head(pre_logits=True)
        pad = spec.stem_kernel // 2
        self.conv1 = nn.Conv2d(3, spec.stem_channels, spec.stem_kernel, stride=2, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.stem_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_channels = spec.stem_channels
        for index, stage in enumerate(spec.stages, start=1):
            blocks = []
            for block in range(stage.blocks):
                stride = stage.stride if block == 0 else 1
                blocks.append(Bottleneck(in_channels, stage.width, stage.out_channels, stride))
                in_channels = stage.out_channels
            self.add_module(f"layer{index}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, spec.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and stages: the last stage's feature map (N, num_features, H/32, W/32)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(1, len(self.spec.stages) + 1):
            x = getattr(self, f"layer{index}")(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, then the classifier; pre_logits stops before it (the embedding)."""
        x = self.avgpool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def resnet50(num_classes: int = 1000, base_width: int = 64) -> ResNet:
    """ResNet-50 (freshly initialized); load a torchvision-style state_dict into it for weights."""
    return ResNet(resnet50_spec(num_classes, base_width))


def logits_and_features(model: ResNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass giving the logits and the pooled features they come from: what the bundle's graph
    and the torch-cuda runner output (forward() alone would pool the feature map a second time)."""
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    return model.fc(features), features


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
