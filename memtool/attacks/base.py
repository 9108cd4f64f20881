"""The attack contract: ``attack(model, x, y) -> x_adv``.

Inputs and outputs are images in [0, 1]; any normalization lives inside the model. The model
is put in eval mode while it is attacked and its mode is restored afterwards, so an attack
can be called from inside a training loop. Every attack describes its settings with
:meth:`Attack.describe`, which evaluation summaries record next to every number.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn


def margins_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True-class logit minus the largest other logit (> 0 iff correctly classified)."""
    logits = logits.float()
    y = y.expand(logits.shape[:-1])
    true = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    other = logits.scatter(-1, y.unsqueeze(-1), float("-inf")).amax(-1)
    return true - other


@contextmanager
def eval_mode(model: nn.Module):
    """Run the block with ``model`` (and every submodule) in eval mode, then restore each mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.train(mode)


def check_positive(name: str, value, integer: bool = False, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        ok = False
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {kind} {bound}, got {value!r}")


@dataclass(frozen=True)
class Attack:
    """Base of all attacks: subclasses set their fields and implement :meth:`perturb`."""

    eps: float = 0.0

    name = "attack"

    def __post_init__(self):
        check_positive("eps", self.eps, allow_zero=True)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with eval_mode(model), torch.enable_grad():  # callers may hold torch.no_grad()
            return self.perturb(model, x.detach(), y.detach()).detach()

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        """The settings that define this attack's numbers (recorded with every result)."""
        return {"attack": self.name, **asdict(self)}


@dataclass(frozen=True)
class Clean(Attack):
    """No attack: returns the inputs unchanged (the 'clean' column of an evaluation)."""

    name = "clean"

    def perturb(self, model, x, y):
        return x

    def describe(self) -> dict:
        return {"attack": self.name, "eps": 0.0, "norm": "none", "steps": 0, "step_size": 0.0}
