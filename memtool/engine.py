"""The training engine: one function trains K models, each on its own subset, for every job.

    models = fit(recipe, x, y, subsets, seeds, num_classes=10, weights=w)
    models.margins(x_test, y_test)              # (K, n) clean margins
    models.margins(x_test, y_test, robust=0.3)  # under PGD (the method's steps) at eps 0.3
    models[k]                                   # model k as a plain nn.Module

An estimator trial, `memtool train`, the findings' retraining and a BAT run are all this
call. ``x`` (n, ...) uint8 images (scaled to [0, 1] per batch) or floats and ``y`` (n,) live
on the device, or in host memory (each batch is then moved to ``device``; the same result);
a subset is an index array, a minibatch an index tensor. Models whose subsets have the same
size are stacked ``ensemble_size`` at a time: the hand-written :class:`memtool.ensemble.Ensemble`
where the architecture allows (Linear / Conv2d / ReLU / pooling), else any module through
``torch.func`` (:class:`memtool.ensemble.FuncEnsemble`, BatchNorm included). The default
stacks where it was measured faster (:func:`default_ensemble_size`). All run the same loop.

Seeding rule: model k's initialisation, minibatch order, augmentation and attack noise derive
from ``seeds[k]`` alone (:func:`memtool.recipe.stream`; the order and the noise from
(seed, epoch)), so a model's result depends only on its seed, subset, weights and recipe,
never on K or on its neighbours, and training resumed from the end of any epoch gives the
identical model.

Weights: ``weights`` (n,) for all models or (K, n) per model; each model's loss on a batch is
``sum_i w_i l_i / sum_i w_i`` (with the method's own weights multiplied in). Leaving a sample
out is done with the subset, not with a zero weight, so it takes no slot in a batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .attacks import PGD, attacked_logits
from .attacks.base import margins_from_logits
from .augment import crop_flip
from .config import check_int
from .ensemble import Ensemble, FuncEnsemble, stackable
from .methods import Batch, weighted_mean
from .recipe import EVAL, Recipe, epoch_order, init_model, noise_generator, stream


def default_ensemble_size(recipe: Recipe, device, in_features: int = 784) -> int:
    """Models per stack where stacking pays off (benchmarks/README.md): MLPs everywhere; the
    CNN and any other module only on GPUs (on a CPU per-model convolutions already run near
    peak, and K models' activations overflow the cache: K = 8 CNNs measured 16 % slower than
    one at a time, a vmap stack of 8 small BN-ResNets 2.5x slower).
    On a CPU, small MLPs stack more models so each batched matmul stays big enough for BLAS:
    K = 64 below 10^6 multiply-adds per model and step (digits 64-128-10 at batch 32), else 16
    (MNIST 784-256-10: K = 8, 16, 32 within 4 %)."""
    if torch.device(device).type == "cuda":
        if recipe.model in ("mlp", "cnn"):
            return 64
        return 1 if recipe.model == "preact-resnet18" or recipe.model.startswith("wrn-") else 16  # 16: a user's model
    if recipe.model != "mlp":  # a user's model too: give --ensemble-size to stack it
        return 1
    return 64 if recipe.batch_size * in_features * recipe.hidden < 1_000_000 else 16


def _autocast(recipe: Recipe, device: torch.device):
    if recipe.precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if recipe.precision == "bf16" else torch.float16)
    return nullcontext()


def as_floats(xb: torch.Tensor, device=None) -> torch.Tensor:
    """A batch as floats on ``device`` (uint8 images scaled to [0, 1]; floats as they are)."""
    xb = xb.to(device, non_blocking=True) if device is not None else xb
    return xb.float().div_(255) if xb.dtype == torch.uint8 else xb.float()


def _builder(recipe: Recipe, x: torch.Tensor, num_classes: int) -> Callable[[], nn.Module]:
    return partial(recipe.build, tuple(x.shape[1:]), num_classes)


def _stack(modules: list[nn.Module], build) -> nn.Module:
    """One module for K models: the hand-written ensemble where the layers allow, else torch.func."""
    if len(modules) == 1:
        return modules[0]
    return Ensemble(modules, build) if stackable(modules[0]) else FuncEnsemble(modules, build)


def is_stack(model: nn.Module) -> bool:
    return isinstance(model, (Ensemble, FuncEnsemble))


def train_stack(recipe: Recipe, x, y, subsets: np.ndarray, seeds: Sequence[int], *, num_classes: int,
                weights: torch.Tensor | None = None, start: dict | None = None,
                on_epoch: Callable | None = None, on_step: Callable[[int], None] | None = None,
                recorder=None, positions: Sequence[int] | None = None, device=None) -> nn.Module:
    """Train ``len(seeds)`` models on the equal-size ``subsets`` ((K, m) indices) at once:
    a stack (:class:`Ensemble` or :class:`FuncEnsemble`) for K > 1, a plain module for K = 1.
    ``device``: where the models train (default: ``x``'s; ``x`` may stay in host memory).

    ``start``: {"model", "optimizer", "epoch"} state to resume from; ``on_epoch(epochs_done,
    model, optimizer, stats)`` runs after every epoch (checkpoints; ``stats["loss"]``: each
    model's mean batch loss, plus the method's own statistics, e.g. BAT's weights, pooled over
    the stack); ``on_step(k)`` after every step. ``recorder`` (:class:`memtool.recorder.Recorder`)
    sees every step's per-sample losses and the model after every epoch, as models
    ``positions`` (default 0..K-1) of its own numbering."""
    device = torch.device(device) if device is not None else x.device
    build = _builder(recipe, x, num_classes)
    k, m = subsets.shape
    stacked = k > 1
    positions = list(range(k)) if positions is None else list(positions)
    modules = [init_model(build, int(s)).to(device) for s in seeds]
    model = _stack(modules, build)
    opt = recipe.make_optimizer(model.parameters())
    scaler = torch.amp.GradScaler(device.type) if recipe.precision == "fp16" else None
    first = 0
    if start is not None:
        model.load_state_dict(start["model"])
        opt.load_state_dict(start["optimizer"])
        first = int(start["epoch"])
    subsets_t = torch.as_tensor(subsets, device=x.device)
    if weights is not None and weights.dim() == 1:
        weights = weights.expand(k, -1)
    method, bs = recipe.method, recipe.batch_size
    per_epoch = recipe.batches(m)
    total = recipe.epochs * per_epoch
    ac = _autocast(recipe, device)
    for epoch in range(first, recipe.epochs):
        order = torch.stack([epoch_order(m, int(s), epoch) for s in seeds]).to(x.device)
        batches = subsets_t.gather(1, order)  # (K, m) sample ids in this epoch's order
        gens = [noise_generator(int(s), epoch, device) for s in seeds]
        loss_sum = torch.zeros(k if stacked else (), device=device)
        stat_sums: dict = {}
        model.train()
        for s in range(per_epoch):
            ids = batches[:, s * bs : (s + 1) * bs]
            wb = None if weights is None else weights.gather(1, ids)
            if not stacked:
                ids, wb = ids[0], None if wb is None else wb[0]
            batch = Batch(ids, epoch, (epoch * per_epoch + s) / total, gens, stacked, wb, recipe.label_smoothing)
            xb, yb = as_floats(x[ids], device), y[ids].to(device)
            if ids.device != device:
                ids, wb = ids.to(device), None if wb is None else wb.to(device)
                batch.ids, batch.weights = ids, wb
            if recipe.augment:
                xb = crop_flip(xb, gens, stacked)
            with ac:
                out = method.loss(model, xb, yb, batch)
            if out.weight is not None:
                wb = out.weight.detach() if wb is None else wb * out.weight.detach()
            if recorder is not None:
                recorder.visit(positions, ids, out.per_sample)
            loss = weighted_mean(out.per_sample, wb)
            if out.extra is not None:
                loss = loss + out.extra
            opt.zero_grad(set_to_none=True)
            lr = recipe.lr_at(epoch * per_epoch + s, total)
            for group in opt.param_groups:
                group["lr"] = lr
            if scaler is None:
                loss.sum().backward()  # model k's gradient is that of its own loss
                opt.step()
            else:  # fp16: one scale for the stack (a step with an inf/NaN gradient is skipped for every model)
                scaler.scale(loss.sum()).backward()
                scaler.step(opt)
                scaler.update()
            loss_sum += loss.detach()
            for name, (num, den) in (out.stats or {}).items():
                prev = stat_sums.get(name, (0.0, 0.0))
                stat_sums[name] = (prev[0] + num.detach().sum(), prev[1] + den.detach().sum())
            if on_step is not None:
                on_step(k)
        model.eval()
        if recorder is not None:
            recorder.epoch_end(positions, model, epoch + 1)
        if on_epoch is not None:
            stats = {name: float(num / den) if float(den) > 0 else float("nan") for name, (num, den) in stat_sums.items()}
            on_epoch(epoch + 1, model, opt, {"loss": (loss_sum / per_epoch).cpu(), **stats})
    return model.eval()


class Models:
    """K trained models in the order of the subsets given to :func:`fit`."""

    def __init__(self, recipe: Recipe, seeds: Sequence[int], stacks: list[tuple[list[int], nn.Module]]):
        self.recipe, self.seeds, self.stacks = recipe, [int(s) for s in seeds], stacks

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, k: int) -> nn.Module:
        for positions, model in self.stacks:
            if k in positions:
                return model.member(positions.index(k)) if is_stack(model) else model
        raise IndexError(k)

    def margins(self, x, y, robust: float | None = None, steps: int | None = None, batch: int = 1024,
                key: int = 0) -> torch.Tensor:
        """(K, n) margins (true-class logit minus the largest other; > 0 iff correct) of every
        model on ``x``, ``y``; with ``robust`` = eps, under L-inf PGD (:class:`memtool.attacks.PGD`
        through :func:`memtool.attacks.attacked_logits`, the evaluation path; ``steps``:
        default the method's, else 10; random start from a generator of the model's seed and
        ``key``)."""
        out = torch.empty(len(self), len(y))
        for positions, model in self.stacks:
            out[positions] = _margins(model, x, y, self.recipe, [self.seeds[p] for p in positions], robust,
                                      steps, batch, key)
        return out


def _margins(model, x, y, recipe, seeds, robust, steps, batch, key) -> torch.Tensor:
    stacked = is_stack(model)
    device = next(model.parameters()).device
    ac = _autocast(recipe, device)
    if robust is not None:
        attack = PGD(eps=float(robust), steps=steps or getattr(recipe.method, "pgd_steps", 10))
        gens = [torch.Generator(device=device).manual_seed(stream(s, EVAL, key)) for s in seeds]
    out = []
    for i in range(0, len(y), batch):
        xb, yb = as_floats(x[i : i + batch], device), y[i : i + batch].to(device)
        if robust is None:
            with torch.no_grad(), ac:
                logits = model.forward_shared(xb) if stacked else model(xb)
        else:
            if stacked:
                xb, yb = xb.expand(len(seeds), *xb.shape), yb.expand(len(seeds), -1)
            with ac:
                logits = attacked_logits(attack, model, xb, yb, gens if stacked else gens[0])
        out.append(margins_from_logits(logits, yb).cpu())
    return torch.cat(out, dim=-1).view(len(seeds), -1)


def fit(recipe: Recipe, x: torch.Tensor, y: torch.Tensor, subsets, seeds: Sequence[int], *, num_classes: int,
        weights=None, ensemble_size: int | None = None, start: dict | None = None, on_epoch=None,
        on_step=None, recorder=None, device=None) -> Models:
    """Train one model per subset (``subsets``: K index arrays into ``x``) with ``seeds[k]``.

    ``weights``: optional per-sample weights, (n,) shared or (K, n) per model. Models whose
    subsets have equal size are stacked ``ensemble_size`` at a time (default:
    :func:`default_ensemble_size`, which stacks only where it was measured faster).
    ``device``: where the models train (default ``x``'s); ``x`` and ``y`` may stay in host
    memory, one batch at a time is moved. ``start`` / ``on_epoch`` (resume and
    checkpoints, see :func:`train_stack`) need a single model; ``recorder`` records proxies of
    every model (:mod:`memtool.proxies`)."""
    subsets = [np.asarray(s, dtype=np.int64) for s in subsets]
    if len(subsets) != len(seeds):
        raise ValueError(f"fit needs one seed per subset, got {len(subsets)} subsets and {len(seeds)} seeds")
    if not subsets:
        raise ValueError("fit needs at least one subset")
    n = len(y)
    for k, s in enumerate(subsets):
        if s.ndim != 1 or len(s) == 0 or s.min() < 0 or s.max() >= n:
            raise ValueError(f"subset {k} must be a non-empty 1-D array of sample ids in 0..{n - 1}")
    if weights is not None:
        weights = torch.as_tensor(weights, dtype=torch.float32, device=x.device)
        if weights.shape not in ((n,), (len(subsets), n)):
            raise ValueError(f"weights must have shape ({n},) or ({len(subsets)}, {n}), got {tuple(weights.shape)}")
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("weights must be finite and >= 0")
    check_int("ensemble_size", ensemble_size, 1, optional=True)
    device = torch.device(device) if device is not None else x.device
    k_max = ensemble_size or default_ensemble_size(recipe, device, int(np.prod(x.shape[1:])))
    by_size: dict[int, list[int]] = {}
    for k, s in enumerate(subsets):
        by_size.setdefault(len(s), []).append(k)
    groups = [g[i : i + k_max] for g in by_size.values() for i in range(0, len(g), k_max)]
    if (start is not None or on_epoch is not None) and len(groups) > 1:
        raise ValueError("resuming and per-epoch callbacks need the models to train as one stack")
    stacks = []
    for g in groups:
        w = None if weights is None or weights.dim() == 1 else weights[g]
        w = weights if weights is not None and weights.dim() == 1 else w
        model = train_stack(recipe, x, y, np.stack([subsets[k] for k in g]), [seeds[k] for k in g],
                            num_classes=num_classes, weights=w, start=start, on_epoch=on_epoch, on_step=on_step,
                            recorder=recorder, positions=g, device=device)
        stacks.append((g, model))
    return Models(recipe, seeds, stacks)
