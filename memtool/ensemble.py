"""Train K models at once, each on its own subset with its own minibatches.

The K models share one architecture (a ``nn.Sequential`` of Linear, Conv2d, ReLU, MaxPool2d,
Flatten and Normalize layers). Their parameters are stacked along a leading model axis and
one forward pass serves all of them: linear layers are batched matmuls (``baddbmm``), conv
layers run per model (measured faster than one grouped convolution on CPUs), and a batch
that all models share (evaluation) goes through the first layer as one wide matmul/conv.
Plain autograd then gives all K gradients in one backward pass, and since SGD is elementwise
one optimizer over the stacked tensors is exactly K separate optimizers. Model k is
initialised and shuffled from ``seeds[k]`` alone, so a trial's result does not depend on
which other trials share its ensemble (tested against K runs of :func:`train_single`).

Models with other layers (BatchNorm in particular: its running statistics are per model)
are trained one at a time by :func:`train_single`; :func:`stackable` tells which is which.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attacks.base import margins_from_logits
from .attacks.pgd import ce_loss, pgd, project, random_start
from .models import Normalize
from .recipe import TrainRecipe, epoch_orders, init_model

_STACKABLE = (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, Normalize)


def _autocast(recipe: TrainRecipe, device: torch.device):
    if recipe.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _layers(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        return [leaf for m in model for leaf in _layers(m)]
    return [model]


def stackable(model: nn.Module) -> bool:
    """Whether :class:`Ensemble` can stack copies of ``model``."""
    return all(isinstance(m, _STACKABLE) for m in _layers(model))


class Ensemble:
    """K copies of one architecture with stacked parameters (leading axis = model)."""

    def __init__(self, build: Callable[[], nn.Module], seeds, device="cpu"):
        self.device = torch.device(device)
        models = [init_model(build, int(s)).to(self.device) for s in seeds]
        self.k = len(models)
        per_model = [_layers(m) for m in models]
        if not stackable(models[0]):
            raise ValueError(f"cannot stack {type(models[0]).__name__}: supported layers are "
                             f"{[t.__name__ for t in _STACKABLE]}; train it with train_single")
        self.layers, self.params = [], {}
        for i, layer in enumerate(per_model[0]):
            p = {}
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                w = torch.stack([m[i].weight.detach() for m in per_model])
                p["weight"] = w.transpose(1, 2).contiguous() if isinstance(layer, nn.Linear) else w
                p["bias"] = torch.stack([m[i].bias.detach() for m in per_model])
                for name, t in p.items():
                    self.params[f"{i}.{name}"] = t.requires_grad_(True)
            self.layers.append((layer, p))

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def logits(self, x: torch.Tensor, shared: bool) -> torch.Tensor:
        """(K, batch, classes). ``shared``: x (batch, ...) goes to every model; else x is
        (K, batch, ...), one batch per model."""
        k = self.k
        for layer, p in self.layers:
            if isinstance(layer, nn.Linear):
                if shared:  # one wide matmul: (B, D) @ (D, K*out)
                    w = p["weight"].permute(1, 0, 2).reshape(x.shape[-1], -1)
                    x = (x @ w).view(len(x), k, -1).transpose(0, 1) + p["bias"][:, None]
                else:
                    x = torch.baddbmm(p["bias"][:, None], x, p["weight"])
                shared = False
            elif isinstance(layer, nn.Conv2d):
                kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
                if shared:  # one conv with K * out channels
                    w, b = p["weight"].flatten(0, 1), p["bias"].flatten()
                    x = F.conv2d(x, w, b, **kw)
                    x = x.view(len(x), k, -1, *x.shape[2:]).transpose(0, 1)
                else:
                    x = torch.stack([F.conv2d(x[j], p["weight"][j], p["bias"][j], **kw) for j in range(k)])
                shared = False
            elif isinstance(layer, nn.MaxPool2d) and not shared:
                y = layer(x.flatten(0, 1))
                x = y.view(k, -1, *y.shape[1:])
            elif isinstance(layer, nn.Flatten):
                x = x.flatten(1 if shared else 2)
            else:  # ReLU, Normalize, shared MaxPool2d: elementwise or per image
                x = layer(x)
        return x

    def input_grad(self, x: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
        """d loss / d x of each model on its own batch: x (K, batch, ...), y (K, batch)."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            out = self.logits(x, shared=False)
            if loss == "ce":
                total = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum")
            else:  # CW-style margin loss
                total = -margins_from_logits(out, y).sum()
            return torch.autograd.grad(total, x)[0]

    def pgd(self, x, y, eps, step_size, steps, gens=None, loss="ce") -> torch.Tensor:
        """L-inf PGD with random start against each model; x (K, batch, ...) in [0, 1]. The
        same update as :func:`memtool.attacks.pgd.pgd`, with the K input gradients from one
        stacked backward pass."""
        if gens is None:
            x_adv = random_start(x, eps, "linf")
        else:  # one generator per model keeps the trial reproducible whatever K is
            x_adv = torch.stack([random_start(x[j], eps, "linf", g) for j, g in enumerate(gens)])
        for _ in range(steps):
            g = self.input_grad(x_adv, y, loss)
            x_adv = project(x_adv + step_size * g.sign(), x, eps, "linf")
        return x_adv.detach()


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()


def train_ensemble(
    build: Callable[[], torch.nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    members: np.ndarray,
    seeds,
    recipe: TrainRecipe,
    device="cpu",
    on_step: Callable[[int], None] | None = None,
) -> Ensemble:
    """Train one model per row of ``members`` ((K, m) dataset indices) on ``x``, ``y``.

    ``x`` (n, C, H, W) float in [0, 1] and ``y`` (n,) live on ``device``; model k is
    initialised and shuffled from ``seeds[k]`` only."""
    ens = Ensemble(build, seeds, device)
    k, m = members.shape
    members_t = torch.as_tensor(members, device=ens.device)
    gens = [torch.Generator().manual_seed(int(s) + 1) for s in seeds]  # PGD random starts
    orders = torch.stack([epoch_orders(m, int(s), recipe.epochs) for s in seeds]).to(ens.device)  # (K, E, m)
    opt = recipe.make_optimizer(ens.parameters())
    ac = _autocast(recipe, ens.device)
    per_epoch, total, step = math.ceil(m / recipe.batch_size), recipe.steps(m), 0
    for epoch in range(recipe.epochs):
        batches = members_t.gather(1, orders[:, epoch])
        for s in range(per_epoch):
            idx = batches[:, s * recipe.batch_size : (s + 1) * recipe.batch_size]
            xb, yb = x[idx], y[idx]
            if recipe.train == "pgd-at":
                xb = ens.pgd(xb, yb, recipe.eps, recipe.step_size, recipe.pgd_steps, gens)
            with ac:
                out = ens.logits(xb, shared=False)
            # sum over models of each model's mean loss: model k's gradient is its own
            loss = F.cross_entropy(out.float().flatten(0, 1), yb.flatten(), reduction="sum") / idx.shape[1]
            _step(opt, loss, recipe.lr_at(step, total))
            step += 1
            if on_step is not None:
                on_step(1)
    return ens


@torch.no_grad()
def _shared_margins(ens: Ensemble, x: torch.Tensor, y: torch.Tensor, batch: int, recipe) -> torch.Tensor:
    out = []
    for i in range(0, len(x), batch):
        with _autocast(recipe, ens.device):
            out.append(margins_from_logits(ens.logits(x[i : i + batch], shared=True), y[i : i + batch]))
    return torch.cat(out, dim=1)


def ensemble_margins(ens: Ensemble, x, y, recipe: TrainRecipe, batch: int = 1024, robust: bool = False):
    """(K, n) margins of every model on every sample; with ``robust``, under PGD at
    ``recipe.eps`` (``recipe.pgd_steps`` steps, random start) against each model."""
    if not robust:
        return _shared_margins(ens, x, y, batch, recipe).cpu()
    out = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch].expand(ens.k, *x[i : i + batch].shape)
        yb = y[i : i + batch].expand(ens.k, -1)
        x_adv = ens.pgd(xb, yb, recipe.eps, recipe.step_size, recipe.pgd_steps)
        with torch.no_grad():
            out.append(margins_from_logits(ens.logits(x_adv, shared=False), yb))
    return torch.cat(out, dim=1).cpu()


def train_single(build, x, y, member_idx: np.ndarray, seed: int, recipe: TrainRecipe, device="cpu") -> torch.nn.Module:
    """Reference loop for one model: the same init, order and update rule as one ensemble row.

    Used for models with BatchNorm and as the ground truth in the ensemble's tests."""
    device = torch.device(device)
    model = init_model(build, seed).to(device)
    model.train()
    idx_all = torch.as_tensor(member_idx, device=device)
    m = len(idx_all)
    orders = epoch_orders(m, seed, recipe.epochs).to(device)
    opt = recipe.make_optimizer(model.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    total, step = recipe.steps(m), 0
    for epoch in range(recipe.epochs):
        batches = idx_all[orders[epoch]]
        for s in range(0, m, recipe.batch_size):
            idx = batches[s : s + recipe.batch_size]
            xb, yb = x[idx], y[idx]
            if recipe.train == "pgd-at":
                xb = _pgd_single(model, xb, yb, recipe, gen)
            with _autocast(recipe, device):
                loss = F.cross_entropy(model(xb).float(), yb)
            _step(opt, loss, recipe.lr_at(step, total))
            step += 1
    return model.eval()


def single_margins(model, x, y, recipe: TrainRecipe, batch: int = 1024, robust: bool = False) -> torch.Tensor:
    """(n,) margins of one model (in eval mode) on every sample, optionally under PGD."""
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        if robust:
            xb = _pgd_single(model, xb, yb, recipe)
        with torch.no_grad(), _autocast(recipe, xb.device):
            out.append(margins_from_logits(model(xb), yb))
    return torch.cat(out).cpu()


def _pgd_single(model, x, y, recipe: TrainRecipe, gen=None) -> torch.Tensor:
    x0 = random_start(x, recipe.eps, "linf", gen)
    return pgd(model, x, y, ce_loss, recipe.eps, recipe.step_size, recipe.pgd_steps, "linf", x0)
