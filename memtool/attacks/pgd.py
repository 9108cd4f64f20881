"""Projected gradient descent (Madry et al. 2018) under the L-inf or L2 norm.

Random start (uniform in the L-inf ball; for L2 a random direction scaled by a uniform
radius), ``steps`` steps of size ``step_size`` (default ``2.5 * eps / steps``, Madry et al.'s
rule, so that a run can walk from one side of the ball to the other), and ``restarts`` runs:
each further restart attacks only the samples that no earlier restart fooled, and each sample
keeps the first restart that fooled the model (or the last one if none did).

:func:`pgd` is the single run with a pluggable per-sample loss; the training losses use it
directly (TRADES maximizes a KL divergence with it). :class:`PGD` also attacks a stacked
model (inputs with a leading model axis, ``gen`` one generator per model; L-inf, one
restart): model k's slice of the result is what attacking model k alone with ``gen[k]`` gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..config import check_choice, check_int, check_number
from .base import Attack

NORMS = ("linf", "l2")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> per-sample loss


def default_step_size(eps: float, steps: int) -> float:
    return 2.5 * eps / steps


def _noise(shape, device, gen, normal: bool = False) -> torch.Tensor:
    """Uniform [0, 1) (or standard normal) noise from ``gen``: None (the global RNG), a
    generator, or a list of generators, one per slice of the leading (model) axis."""
    draw = torch.randn if normal else torch.rand
    if isinstance(gen, (list, tuple)):
        return torch.stack([_noise(shape[1:], device, g, normal) for g in gen])
    if gen is None:
        return draw(shape, device=device)
    return draw(shape, generator=gen, device=gen.device).to(device)


def _l2(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The point of the eps-ball around ``x`` (intersected with [0, 1]) nearest to ``x_adv``."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / (_l2(delta) + 1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0, 1)  # clamping only shrinks |delta| coordinate-wise


def random_start(x: torch.Tensor, eps: float, norm: str, gen=None) -> torch.Tensor:
    if norm == "linf":
        delta = (_noise(x.shape, x.device, gen) * 2 - 1) * eps
    else:
        direction = _noise(x.shape, x.device, gen, normal=True)
        radius = _noise((len(x),) + (1,) * (x.dim() - 1), x.device, gen)
        delta = direction / (_l2(direction) + 1e-12) * radius * eps
    return (x + delta).clamp(0, 1)


def ce_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample cross-entropy over any leading dims, logits (..., C) and y (...);
    half-precision logits (autocast) are taken in float32."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none",
                           label_smoothing=label_smoothing).view(y.shape)


def pgd(model, x, y, loss_fn: LossFn, eps: float, step_size: float, steps: int, norm: str = "linf",
        x_init: torch.Tensor | None = None, on_iterate: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """One PGD run from ``x_init`` (default: ``x``) ascending ``loss_fn(model(x_adv), y).sum()``.

    ``on_iterate(logits)`` sees the logits of every iterate before its step (the start
    included, the final point not: GAIRAT counts its Kappa there). The caller decides the
    model's mode (attacks put it in eval mode)."""
    x_adv = (x if x_init is None else x_init).detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        if on_iterate is not None:
            on_iterate(logits.detach())
        (g,) = torch.autograd.grad(loss_fn(logits, y).sum(), x_adv)
        step = g.sign() if norm == "linf" else g / (_l2(g) + 1e-12)
        x_adv = project(x_adv.detach() + step_size * step, x, eps, norm)
    return x_adv.detach()


@dataclass(frozen=True)
class PGD(Attack):
    """PGD-``steps`` on the cross-entropy; ``step_size=None`` means ``2.5 * eps / steps``."""

    steps: int = 20
    step_size: float | None = None
    norm: str = "linf"
    restarts: int = 1
    random_start: bool = True

    name = "pgd"
    loss = "ce"  # the objective, recorded by describe()

    def __post_init__(self):
        super().__post_init__()
        check_int("steps", self.steps, 1)
        check_int("restarts", self.restarts, 1)
        check_number("step_size", self.step_size, 0, low_open=True, optional=True)
        check_choice("norm", self.norm, NORMS)

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else default_step_size(self.eps, self.steps)

    def loss_fn(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ce_loss(logits, y)

    def perturb(self, model, x, y, gen=None):
        if isinstance(gen, (list, tuple)) and (self.norm != "linf" or self.restarts > 1):
            raise ValueError("a stacked model (one generator per model) is attacked with L-inf PGD and one restart")
        x_adv = x.clone()
        todo = torch.arange(len(x), device=x.device)  # samples no restart has fooled yet
        for r in range(self.restarts):
            xs, ys = x[todo], y[todo]
            start = random_start(xs, self.eps, self.norm, gen) if self.random_start else xs
            cand = pgd(model, xs, ys, self.loss_fn, self.eps, self.alpha, self.steps, self.norm, start)
            x_adv[todo] = cand
            if r + 1 == self.restarts:
                break
            with torch.no_grad():
                todo = todo[model(cand).argmax(1) == ys]
            if len(todo) == 0:
                break
        return x_adv

    def describe(self) -> dict:
        return {**super().describe(), "step_size": self.alpha, "loss": self.loss}
