"""Classifiers of the lifelong classification experiment: a small CNN (CPU) and ResNet-18 (GPU-sized).

:func:`make_classifier` builds one by name. ``"resnet18"`` is torchvision's ResNet-18 when torchvision
is installed, else :class:`ResNet18` (the same architecture, written here); either way it is adapted to
32x32 inputs as usual for CIFAR-sized images: a 3x3 stride-1 stem convolution and no max-pool, so the
four stages see 32, 16, 8 and 4 pixels.
"""
from __future__ import annotations

import importlib.util

from torch import Tensor, nn

__all__ = ["SmallCNN", "ResNet18", "make_classifier", "CLASSIFIERS", "resnet18_source"]

CLASSIFIERS = ("small", "resnet18")


class SmallCNN(nn.Module):
    """``[N, C, 32, 32]`` in [-1, 1] -> logits ``[N, num_classes]``.

    Three 3x3 conv + ReLU + pool stages, then a linear head.
    """

    def __init__(self, channels: int = 3, num_classes: int = 10, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


class _BasicBlock(nn.Module):
    """Two 3x3 conv + batch norm layers with an identity (or 1x1 conv, when the shape changes) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: ``[N, channels, H, W]`` -> logits ``[N, num_classes]``.

    Stem: 3x3 stride-1 conv (``width`` channels) + batch norm + ReLU, no max-pool; four stages of two
    basic blocks with ``width * (1, 2, 4, 8)`` channels (strides 1, 2, 2, 2); global average pool; linear.
    """

    def __init__(self, channels: int = 3, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        widths = [width, 2 * width, 4 * width, 8 * width]
        cin, stages = width, []
        for k, w in enumerate(widths):
            stages.append(nn.Sequential(_BasicBlock(cin, w, 1 if k == 0 else 2), _BasicBlock(w, w, 1)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18_source(prefer_torchvision: bool = True) -> str:
    """Which ResNet-18 :func:`make_classifier` builds: ``"torchvision"`` or ``"gmem"`` (the own one)."""
    if prefer_torchvision and importlib.util.find_spec("torchvision") is not None:
        return "torchvision"
    return "gmem"


def make_classifier(kind: str, channels: int = 3, num_classes: int = 10, *, prefer_torchvision: bool = True
                    ) -> nn.Module:
    """A fresh classifier ``[N, channels, 32, 32] -> [N, num_classes]`` by name (one of :data:`CLASSIFIERS`).

    Initial weights come from the global RNG (wrap the call in :func:`gmem.seeding.seeded`).
    """
    if kind == "small":
        return SmallCNN(channels, num_classes)
    if kind != "resnet18":
        raise KeyError(f"unknown classifier {kind!r}; choose from {list(CLASSIFIERS)}")
    if resnet18_source(prefer_torchvision) == "gmem":
        return ResNet18(channels, num_classes)
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=num_classes)
    # 32x32 inputs: a 3x3 stride-1 stem and no max-pool (the ImageNet stem would leave 1x1 maps)
    net.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net
