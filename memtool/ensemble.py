"""Train K models at once, each on its own subset with its own minibatches.

The K models share one architecture; their parameters are stacked along a leading axis
(``torch.func.stack_module_state``) and one ``vmap``-ed step computes all K gradients, so a
K-model step is a handful of batched matmuls / grouped convolutions instead of K Python
loops. SGD is elementwise, so one optimizer over the stacked tensors is exactly K separate
optimizers. Model k is initialised and shuffled from ``seeds[k]`` alone, which makes the
result of a trial independent of which other trials share its ensemble (tested against
K sequential runs of :func:`train_single`).

Models with BatchNorm are not supported here (running statistics would mix under vmap);
the estimator trains those one at a time with :func:`train_single`.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, stack_module_state, vmap

from .recipe import TrainRecipe, epoch_orders, init_model


def _autocast(recipe: TrainRecipe, device: torch.device):
    if recipe.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def margins_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True-class logit minus the largest other logit (> 0 iff correctly classified)."""
    logits = logits.float()
    y = y.expand(logits.shape[:-1])
    true = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    other = logits.scatter(-1, y.unsqueeze(-1), float("-inf")).amax(-1)
    return true - other


class Ensemble:
    """K stacked copies of one architecture, as a pure function of stacked parameters."""

    def __init__(self, build: Callable[[], torch.nn.Module], seeds, device="cpu"):
        self.device = torch.device(device)
        models = [init_model(build, int(s)).to(self.device) for s in seeds]
        self.k = len(models)
        self.params, self.buffers = stack_module_state(models)
        self.base = copy.deepcopy(models[0]).to("meta")

    def _logits(self, p, b, x):
        return functional_call(self.base, (p, b), (x,))

    def logits(self, x: torch.Tensor, shared: bool) -> torch.Tensor:
        """(K, batch, classes). ``shared``: x is one batch for all models, else (K, batch, ...)."""
        return vmap(self._logits, in_dims=(0, 0, None if shared else 0))(self.params, self.buffers, x)

    def input_grad(self, x: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
        """d loss / d x for each model's own batch: x (K, batch, ...), y (K, batch)."""

        def f(p, b, xx, yy):
            out = self._logits(p, b, xx)
            if loss == "ce":
                return F.cross_entropy(out, yy, reduction="sum")
            return -margins_from_logits(out, yy).sum()  # CW-style margin loss

        return vmap(grad(f, argnums=2))(self.params, self.buffers, x, y)

    def pgd(self, x, y, eps, step_size, steps, gens=None, loss="ce") -> torch.Tensor:
        """L-inf PGD with random start against each model; x (K, batch, ...) in [0, 1]."""
        if gens is None:
            delta = (torch.rand(x.shape, device=x.device) * 2 - 1) * eps
        else:  # one generator per model keeps the trial reproducible whatever K is
            delta = torch.stack([(torch.rand(x.shape[1:], generator=g) * 2 - 1) * eps for g in gens]).to(x.device)
        x_adv = (x + delta).clamp(0, 1)
        for _ in range(steps):
            g = self.input_grad(x_adv, y, loss)
            x_adv = torch.min(torch.max(x_adv + step_size * g.sign(), x - eps), x + eps).clamp(0, 1)
        return x_adv.detach()

    def state_dicts(self) -> list[dict]:
        return [{n: t[k].detach().cpu().clone() for n, t in {**self.params, **self.buffers}.items()} for k in range(self.k)]


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
    opt = torch.optim.SGD(ens.params.values(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay, nesterov=recipe.momentum > 0)
    ac = _autocast(recipe, ens.device)

    def loss_fn(p, b, xb, yb):
        with ac:
            return F.cross_entropy(ens._logits(p, b, xb).float(), yb)

    step_fn = vmap(grad_and_value(loss_fn))
    per_epoch, total, step = math.ceil(m / recipe.batch_size), recipe.steps(m), 0
    for epoch in range(recipe.epochs):
        batches = members_t.gather(1, orders[:, epoch])
        for s in range(per_epoch):
            idx = batches[:, s * recipe.batch_size : (s + 1) * recipe.batch_size]
            xb, yb = x[idx], y[idx]
            if recipe.train == "pgd-at":
                xb = ens.pgd(xb, yb, recipe.eps, recipe.step_size, recipe.pgd_steps, gens)
            grads, _ = step_fn(ens.params, ens.buffers, xb, yb)
            for name, p in ens.params.items():
                p.grad = grads[name]
            for group in opt.param_groups:
                group["lr"] = recipe.lr_at(step, total)
            opt.step()
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
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay, nesterov=recipe.momentum > 0)
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
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = recipe.lr_at(step, total)
            opt.step()
            step += 1
    return model.eval()


def _pgd_single(model, x, y, recipe: TrainRecipe, gen) -> torch.Tensor:
    eps, alpha = recipe.eps, recipe.step_size
    x_adv = (x + ((torch.rand(x.shape, generator=gen) * 2 - 1) * eps).to(x.device)).clamp(0, 1)
    for _ in range(recipe.pgd_steps):
        x_adv.requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()
