"""Shared pieces of the benchmarks: the naive reference loop, FLOP counting, matmul peak.

The naive loop is written the way Feldman & Zhang's reference script and its PyTorch ports
do it: for every trial a fresh model and optimizer, a DataLoader over the trial's subset,
a Python loop over minibatches, then predictions on every train and test sample.
It uses the same recipe (optimizer, learning rate, epochs, batch size) as memtool, so
both do the same number of SGD steps of the same size.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from memtool.models import build_model
from memtool.recipe import Recipe


def tensors(ds):
    return (torch.from_numpy(ds.x_train).float() / 255, torch.from_numpy(ds.y_train),
            torch.from_numpy(ds.x_test).float() / 255, torch.from_numpy(ds.y_test))


def naive_trial(ds, idx: np.ndarray, recipe: Recipe, seed: int):
    """Train one model on ``idx`` the naive way; return (train correct, test correct) bools."""
    x, y, xt, yt = tensors(ds)
    torch.manual_seed(seed)
    model = build_model(recipe.model, ds.image_shape, ds.num_classes, recipe.hidden)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, nesterov=True)
    loader = DataLoader(TensorDataset(x[idx], y[idx]), batch_size=recipe.batch_size, shuffle=True)
    model.train()
    for _ in range(recipe.epochs):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).numpy(), (model(xt).argmax(1) == yt).numpy()


def forward_flops(model: nn.Module, in_shape) -> tuple[int, int]:
    """(forward FLOPs of one sample, FLOPs of the first parameterised layer) for Linear/Conv2d."""
    flops = []

    def hook(m, inp, out):
        if isinstance(m, nn.Linear):
            flops.append(2 * m.in_features * m.out_features)
        elif isinstance(m, nn.Conv2d):
            flops.append(2 * out[0].numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(torch.zeros(1, *in_shape))
    for h in handles:
        h.remove()
    return sum(flops), flops[0]


def model_flops(ds, recipe: Recipe, m: int) -> float:
    """FLOPs to train one model (forward, weight gradients, input gradients except for the
    first layer's input) on m samples and to evaluate it on every train and test sample."""
    fwd, first = forward_flops(build_model(recipe.model, ds.image_shape, ds.num_classes, recipe.hidden),
                               ds.image_shape)
    train = recipe.epochs * m * (3 * fwd - first)
    return train + fwd * (len(ds.y_train) + len(ds.y_test))


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Measured fp32 matmul GFLOP/s of this process (best of three)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best
