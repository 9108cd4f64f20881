"""What a researcher brings to memtool: their own networks and data (docs/own-model.md).

Nothing here is part of memtool: it is the user's side of the interface, used by the guide,
the notebook notebooks/own_model.ipynb and the tests.

- ``bn_cnn``: a BatchNorm + residual CNN, ``build(in_shape, num_classes) -> nn.Module``;
- ``tabular_mlp``: an MLP with BatchNorm for feature vectors;
- ``write_digits_folder(DIR)``: scikit-learn's 8x8 digits as PNG files in torchvision's
  ImageFolder layout (DIR/train/CLASS/*.png, DIR/test/CLASS/*.png);
- ``breast_cancer()``: scikit-learn's bundled breast-cancer data (30 features), standardized
  with the training split's mean and deviation: floats, no input range, so no attacks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))


class BNCNN(nn.Module):
    def __init__(self, in_ch: int, num_classes: int, width: int):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, width, 3, padding=1, bias=False)
        self.block = ResBlock(width)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.block(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def bn_cnn(in_shape, num_classes, width: int = 16) -> nn.Module:
    """A BatchNorm + residual CNN for images (C, H, W)."""
    return BNCNN(in_shape[0], num_classes, width)


def tabular_mlp(in_shape, num_classes, hidden: int = 64) -> nn.Module:
    """An MLP with BatchNorm for feature vectors (d,)."""
    (d,) = in_shape
    return nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def write_digits_folder(root) -> Path:
    """scikit-learn's digits (first 1,437 train, last 360 test) as grey PNGs under ``root``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)
    for i, (img, label) in enumerate(zip(images, d.target)):
        folder = root / ("train" if i < 1437 else "test") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root


def breast_cancer():
    """(x_train, y_train, x_test, y_test): the first 455 samples train, the last 114 test."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test = x[:455], x[455:]
    mean, std = x_train.mean(0), x_train.std(0)
    return ((x_train - mean) / std).astype(np.float32), y[:455], ((x_test - mean) / std).astype(np.float32), y[455:]
