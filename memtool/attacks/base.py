"""The attack contract: ``attack(model, x, y, gen=None) -> x_adv``.

Inputs and outputs are images in [0, 1]; any normalization lives inside the model. The model
is put in eval mode while it is attacked and its mode is restored afterwards, so an attack
can be called from inside a training loop. ``gen`` is the source of an attack's random draws
(the random start of PGD and CW; AutoAttack seeds itself with its ``seed``): None (the global
RNG), a ``torch.Generator``, or a list of generators, one per model of a stacked model
(:class:`memtool.ensemble.Ensemble`) whose inputs carry a leading model axis. Every attack describes its settings with :meth:`Attack.describe`, which
evaluation summaries record next to every number.

:func:`attacked_logits` is the one evaluation path: the engine's robust margins, the
per-epoch check of `memtool train` and `memtool evaluate` all call it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..config import check_number


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


@dataclass(frozen=True)
class Attack:
    """Base of all attacks: subclasses set their fields and implement :meth:`perturb`."""

    eps: float = 0.0

    name = "attack"

    def __post_init__(self):
        check_number("eps", self.eps, 0)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen=None) -> torch.Tensor:
        with eval_mode(model), torch.enable_grad():  # callers may hold torch.no_grad()
            return self.perturb(model, x.detach(), y.detach(), gen).detach()

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen=None) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        """The settings that define this attack's numbers (recorded with every result)."""
        return {"attack": self.name, **asdict(self)}


@dataclass(frozen=True)
class Clean(Attack):
    """No attack: returns the inputs unchanged (the 'clean' column of an evaluation)."""

    name = "clean"

    def perturb(self, model, x, y, gen=None):
        return x

    def describe(self) -> dict:
        return {"attack": self.name, "eps": 0.0, "norm": "none", "steps": 0, "step_size": 0.0}


def attacked_logits(attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen=None) -> torch.Tensor:
    """``model``'s logits (no gradient) on ``attack``'s examples of ``x``, ``y`` (random draws
    from ``gen``, see the module docstring), once they are checked to lie in the attack's
    eps-ball and in [0, 1]: an attack that leaves them raises a RuntimeError, so no number is
    ever computed from an example outside the threat model."""
    if isinstance(attack, Clean):  # no attack: the inputs as given, whatever their range
        with eval_mode(model), torch.no_grad():
            return model(x)
    x_adv = attack(model, x, y, gen)
    d = attack.describe()
    delta = (x_adv - x).flatten(2 if isinstance(gen, (list, tuple)) else 1)  # one row per sample
    size = delta.norm(dim=-1) if d.get("norm") == "l2" else delta.abs().amax(-1)
    excess = float(size.max()) - d["eps"]
    if excess > 1e-4 or x_adv.min() < 0 or x_adv.max() > 1:
        raise RuntimeError(f"attack {d['attack']} left the eps-ball or [0, 1] (by {excess:.2g}); "
                           "its examples are not used")
    with torch.no_grad():
        return model(x_adv)
