"""Model zoo. Every model takes images in [0, 1] of shape (batch, C, H, W) and returns logits;
any input normalization lives inside the model, so attacks never need to know about it.

- ``mlp`` and ``cnn``: small BatchNorm-free nets for MNIST-sized data on a CPU; the ensemble
  trainer stacks many of them (see :mod:`memtool.ensemble`).
- ``preact-resnet18`` and ``wrn-D-W`` (e.g. ``wrn-28-10``, ``wrn-34-10``): the paper-scale
  models for 32x32 and 64x64 images (global average pooling makes them size-agnostic).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("mlp", "cnn", "preact-resnet18", "wrn-D-W")


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def mlp(in_shape, num_classes, hidden: int = 256) -> nn.Module:
    c, h, w = in_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def cnn(in_shape, num_classes, hidden: int = 128, width: int = 32) -> nn.Module:
    """Two 3x3 conv + max-pool blocks and a hidden fully connected layer (no BatchNorm)."""
    c, h, w = in_shape
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )  # fmt: skip


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    def __init__(self, in_ch, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideResNet(nn.Module):
    def __init__(self, in_ch, num_classes, depth=28, widen=10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6k+4 (16, 22, 28, 34, ...), got {depth}")
        n, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                layers.append(PreActBlock(cin, cout, stride if i == 0 else 1))  # WRN's basic block
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def check_model_name(name: str) -> None:
    if not isinstance(name, str) or not (name in ("mlp", "cnn", "preact-resnet18") or re.fullmatch(r"wrn-\d+-\d+", name)):
        raise ValueError(f"model must be one of {', '.join(MODELS)} (e.g. wrn-28-10), got {name!r}")


def build_model(name: str, in_shape, num_classes: int, hidden: int = 256, mean=None, std=None) -> nn.Module:
    """Build model ``name`` for images of ``in_shape`` = (C, H, W).

    ``mean``/``std`` (per channel, on the [0, 1] scale) add a normalization layer in front."""
    in_shape = tuple(in_shape)
    if name == "mlp":
        net = mlp(in_shape, num_classes, hidden)
    elif name == "cnn":
        net = cnn(in_shape, num_classes, hidden)
    elif name == "preact-resnet18":
        net = PreActResNet18(in_shape[0], num_classes)
    elif m := re.fullmatch(r"wrn-(\d+)-(\d+)", name):
        net = WideResNet(in_shape[0], num_classes, int(m[1]), int(m[2]))
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS} (e.g. wrn-28-10)")
    if mean is not None:
        net = nn.Sequential(Normalize(mean, std), net)
    return net


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
