"""A user's own networks, as a researcher would write them in their own package (tests/ is on
sys.path under pytest, so ``user_models:bn_resnet`` is a MODULE:FUNCTION spec)."""

import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.conv(F.relu(self.bn(x)))


class BNResNet(nn.Module):
    def __init__(self, in_ch, num_classes, width):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, width, 3, padding=1, bias=False)
        self.block = Block(width)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.block(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def bn_resnet(in_shape, num_classes, width: int = 8):
    """A BatchNorm + residual CNN: build(in_shape, num_classes) -> nn.Module."""
    return BNResNet(in_shape[0], num_classes, width)


def tabular(in_shape, num_classes, hidden: int = 16):
    """An MLP with BatchNorm for feature vectors."""
    (d,) = in_shape
    return nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def raises(in_shape, num_classes):
    raise RuntimeError("out of ideas")


def wrong_output(in_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(in_shape[0] * in_shape[1] * in_shape[2]), num_classes + 1))


def no_parameters(in_shape, num_classes):
    return nn.Flatten()


not_callable = 3
