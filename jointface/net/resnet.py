"""ResNet 18/34/50 in plain torch, with torchvision's parameter names.

The module tree mirrors ``torchvision.models.resnet`` exactly (``conv1``,
``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc`` ...), so a
torchvision ``state_dict`` loads key for key (:func:`load_torchvision_weights`)
without torchvision, which does not import here.

Differences from torchvision, all opt-in:

* ``num_classes=0`` replaces ``fc`` by ``nn.Identity`` (timm's convention): the
  detector only uses :meth:`ResNet.forward_features`, and a parameter that never
  gets a gradient would hide real gradient bugs in the tests.
* ``base_width`` scales every stage (64 in torchvision); the ``resnet_tiny``
  entry of :data:`RESNET_SPECS` (``base_width=8``, one block per stage) exists
  only so tests run in milliseconds.

Feature map: ``forward_features`` returns ``(B, C, H/32, W/32)`` with
``C = 8 * base_width * expansion`` (512 for ResNet 18/34, 2048 for ResNet 50).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Type

import torch
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


@dataclass(frozen=True)
class ResNetSpec:
    block: Type[nn.Module]
    layers: tuple[int, int, int, int]
    base_width: int = 64


#: Registry of backbones by name. ``resnet_tiny`` is for tests only.
RESNET_SPECS: dict[str, ResNetSpec] = {
    "resnet18": ResNetSpec(BasicBlock, (2, 2, 2, 2)),
    "resnet34": ResNetSpec(BasicBlock, (3, 4, 6, 3)),
    "resnet50": ResNetSpec(Bottleneck, (3, 4, 6, 3)),
    "resnet_tiny": ResNetSpec(BasicBlock, (1, 1, 1, 1), base_width=8),
}


def make_stage(block, inplanes: int, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
    """A residual stage: ``blocks`` blocks of ``planes`` planes, the first with ``stride`` (and a projection
    shortcut when the shape changes)."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stride),
                                   nn.BatchNorm2d(planes * block.expansion))
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """torchvision-compatible ResNet; ``stride`` (32) is the feature map's stride."""

    stride = 32

    def __init__(self, block: Type[nn.Module], layers: tuple[int, ...], num_classes: int = 1000,
                 base_width: int = 64):
        super().__init__()
        self.inplanes = base_width
        self.conv1 = nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, base_width, layers[0])
        self.layer2 = self._make_layer(block, base_width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base_width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base_width * 8, layers[3], stride=2)
        self.num_features = base_width * 8 * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layer = make_stage(block, self.inplanes, planes, blocks, stride)
        self.inplanes = planes * block.expansion
        return layer

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, num_features, ceil(H/32), ceil(W/32))``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(features), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_resnet(name: str, num_classes: int = 0) -> ResNet:
    """A backbone from :data:`RESNET_SPECS` (``num_classes=0``: no ``fc``)."""
    if name not in RESNET_SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(RESNET_SPECS))}")
    spec = RESNET_SPECS[name]
    return ResNet(spec.block, spec.layers, num_classes=num_classes, base_width=spec.base_width)


def resnet_stage(name: str, stage: int, planes: int | None = None) -> nn.Sequential:
    """Stage ``stage`` (1-4) of backbone ``name``, freshly initialised as :class:`ResNet` does, with its own
    planes or ``planes`` instead (same blocks, same stride, same input channels: e.g. a narrower copy)."""
    if name not in RESNET_SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(RESNET_SPECS))}")
    spec = RESNET_SPECS[name]
    planes = spec.base_width * 2 ** (stage - 1) if planes is None else planes
    if stage not in (1, 2, 3, 4) or planes < 1:
        raise ValueError(f"a stage is 1-4 with at least one plane: stage {stage!r}, planes {planes!r}")
    inplanes = spec.base_width * 2 ** (stage - 2) * spec.block.expansion if stage > 1 else spec.base_width
    layer = make_stage(spec.block, inplanes, planes, spec.layers[stage - 1], stride=1 if stage == 1 else 2)
    for module in layer.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return layer


def resnet18(num_classes: int = 1000) -> ResNet:
    return build_resnet("resnet18", num_classes)


def resnet34(num_classes: int = 1000) -> ResNet:
    return build_resnet("resnet34", num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return build_resnet("resnet50", num_classes)


def infer_arch(state_dict: dict[str, torch.Tensor]) -> str:
    """Which of resnet18/34/50 a torchvision state dict belongs to."""
    blocks = []
    for stage in range(1, 5):
        indices = {int(key.split(".")[1]) for key in state_dict if key.startswith(f"layer{stage}.")}
        blocks.append(len(indices))
    bottleneck = any(key.endswith(".conv3.weight") for key in state_dict)
    for name, spec in RESNET_SPECS.items():
        if tuple(blocks) == spec.layers and (spec.block is Bottleneck) == bottleneck and name != "resnet_tiny":
            return name
    raise ValueError(f"state dict matches no known ResNet (blocks per stage {blocks}, bottleneck={bottleneck})")


def load_torchvision_weights(path: str | os.PathLike, model: ResNet | None = None) -> ResNet:
    """Load a torchvision ResNet checkpoint (a plain ``state_dict`` file).

    The file is read with ``weights_only=True`` (no pickled code runs). Every
    key of the file must match the model's own keys, except ``fc.*`` when the
    model has no classifier (``num_classes=0``); missing or unexpected keys
    raise ``ValueError`` naming them. With ``model=None`` the architecture is
    inferred from the keys and a headless backbone is returned.
    """
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, dict) and "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: not a torchvision state dict (expected a dict of tensors)")
    if model is None:
        model = build_resnet(infer_arch(state_dict), num_classes=0)
    if isinstance(model.fc, nn.Identity):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: keys do not match the backbone; missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(state_dict, strict=True)
    return model
