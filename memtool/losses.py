"""Per-sample training losses: standard, PGD-AT, TRADES and MART.

Every method is one function ``loss(model, x, y, step) -> LossOutput`` in :data:`LOSSES`;
the training loop (:mod:`memtool.training`) reduces the per-sample losses ``l_i`` with the
per-sample weights ``w_i`` it was given as ``L = sum_i w_i l_i / sum_i w_i``. Adding a method
is adding one function to :data:`LOSSES`. ``step`` carries the batch's sample ids (positions
in the training set), so a method can look up per-sample scores, and the epoch (for
warm-ups). A method may return its own per-sample weights (multiplied with the loop's) and
an extra scalar term added after the weighted mean.

Adversarial examples are made with the model in eval mode (as the official TRADES and MART
code does); the loss itself is computed in the mode the loop set (train mode).

The formulas follow the official implementations, reduced per sample instead of over the
batch (their batch loss is the mean of these per-sample losses; tested):

- TRADES, Zhang et al. 2019, github.com/yaodongyu/TRADES ``trades.py``::

      x_adv = argmax_{|x' - x|_inf <= eps} KL(f(x) || f(x'))   (PGD from x + 0.001 N(0, 1))
      l_i   = CE(f(x_i), y_i) + beta * KL(softmax f(x_i) || softmax f(x_adv_i))

- MART, Wang et al. 2020, github.com/YisenWang/MART ``mart.py``::

      x_adv = PGD on CE(f(x'), y)   (from x + 0.001 N(0, 1))
      p' = softmax f(x_adv), p = softmax f(x), y' = argmax_{k != y} p'_k
      l_i = CE(f(x_adv_i), y_i) - log(1.0001 - p'_{i,y'} + 1e-12)                (BCE)
            + beta * KL(p_i || p'_i) * (1.0000001 - p_{i,y_i})    (log p' + 1e-12 inside KL)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F

from .attacks.base import eval_mode
from .attacks.pgd import pgd, random_start


class LossOutput(NamedTuple):
    per_sample: torch.Tensor  # (B,) losses l_i
    weight: torch.Tensor | None = None  # (B,) the method's own weights (no gradient), times the loop's
    extra: torch.Tensor | None = None  # scalar added after the weighted mean


@dataclass(frozen=True)
class Step:
    """What the loop tells a loss about the current batch."""

    ids: torch.Tensor  # (B,) sample ids: positions in the training set
    epoch: int  # 0-based
    eps: float  # the training attack's radius now (config.eps, or less during an eps warm-up)
    alpha: float  # the training attack's step size now
    config: Any  # the TrainConfig (pgd_steps, beta, ...)


LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, Step], LossOutput]


def weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``sum_i w_i l_i / sum_i w_i`` (plain mean without weights; 0 if all weights are 0)."""
    if weight is None:
        return per_sample.mean()
    return (weight * per_sample).sum() / weight.sum().clamp_min(1e-12)


# ----------------------------------------------------------------------------- pure formulas


def kl_per_sample(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities (``nn.KLDivLoss(q_log, p)`` summed per row)."""
    return F.kl_div(q_log, p_log.exp(), reduction="none").sum(1)


def trades_per_sample(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float):
    """TRADES: CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x_adv)), per sample."""
    kl = kl_per_sample(F.log_softmax(logits_nat, 1), F.log_softmax(logits_adv, 1))
    return F.cross_entropy(logits_nat, y, reduction="none") + beta * kl


def mart_per_sample(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float):
    """MART: boosted CE on the adversarial example + beta * KL * (1 - p_y(x)), per sample,
    with the official code's constants (1.0001, 1e-12, 1.0000001)."""
    adv_probs = F.softmax(logits_adv, 1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])  # most likely wrong class
    bce = F.cross_entropy(logits_adv, y, reduction="none") - torch.log(
        1.0001 - adv_probs.gather(1, new_y[:, None]).squeeze(1) + 1e-12)
    nat_probs = F.softmax(logits_nat, 1)
    true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(1)
    return bce + beta * kl * (1.0000001 - true_probs)


# ----------------------------------------------------------------------------- adversaries


def _ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def pgd_ce(model, x, y, step: Step, start: str = "uniform") -> torch.Tensor:
    """PGD on the cross-entropy (eval mode); start 'uniform' in the ball (Madry et al.) or
    'normal' (x + 0.001 N(0, 1), as in the official MART code)."""
    with eval_mode(model):
        x0 = random_start(x, step.eps, "linf") if start == "uniform" else x + 0.001 * torch.randn_like(x)
        return pgd(model, x, y, _ce, step.eps, step.alpha, step.config.pgd_steps, "linf", x0)


def trades_adversary(model, x, step: Step) -> torch.Tensor:
    """x' maximizing KL(f(x) || f(x')) in the eps-ball (official TRADES inner loop)."""
    with eval_mode(model):
        with torch.no_grad():
            p_log = F.log_softmax(model(x), 1)

        def kl_to_clean(logits, _y):
            return kl_per_sample(p_log, F.log_softmax(logits, 1))

        x0 = x + 0.001 * torch.randn_like(x)
        return pgd(model, x, None, kl_to_clean, step.eps, step.alpha, step.config.pgd_steps, "linf", x0)


# ----------------------------------------------------------------------------- the methods


def standard_loss(model, x, y, step: Step) -> LossOutput:
    return LossOutput(_ce(model(x), y))


def pgd_at_loss(model, x, y, step: Step) -> LossOutput:
    """Madry et al. 2018: CE on PGD examples (uniform random start)."""
    return LossOutput(_ce(model(pgd_ce(model, x, y, step)), y))


def trades_loss(model, x, y, step: Step) -> LossOutput:
    x_adv = trades_adversary(model, x, step)
    return LossOutput(trades_per_sample(model(x), model(x_adv), y, step.config.beta))


def mart_loss(model, x, y, step: Step) -> LossOutput:
    x_adv = pgd_ce(model, x, y, step, start="normal")
    return LossOutput(mart_per_sample(model(x), model(x_adv), y, step.config.beta))


LOSSES: dict[str, LossFn] = {
    "standard": standard_loss,
    "pgd-at": pgd_at_loss,
    "trades": trades_loss,
    "mart": mart_loss,
}
