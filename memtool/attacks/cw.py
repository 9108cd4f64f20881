"""CW-inf: PGD on the Carlini-Wagner margin loss (largest other logit minus the true logit).

As in the robust-training literature (e.g. Wang et al. 2020's evaluation), this is the margin
used as the PGD objective under the L-inf constraint, not the original C&W optimisation. The
margin is not clamped at -kappa: the ascent keeps pushing a fooled sample further, which
changes nothing about whether it is fooled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import margins_from_logits
from .pgd import PGD


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample (max other logit) - (true logit): > 0 iff the sample is misclassified."""
    return -margins_from_logits(logits, y)


@dataclass(frozen=True)
class CW(PGD):
    name = "cw"
    loss = "margin"

    def loss_fn(self, logits, y):
        return margin_loss(logits, y)
