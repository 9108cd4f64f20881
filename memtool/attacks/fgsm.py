"""FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps on the cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Attack


@dataclass(frozen=True)
class FGSM(Attack):
    name = "fgsm"

    def perturb(self, model, x, y, gen=None):
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
        return (x + self.eps * g.sign()).clamp(0, 1)

    def describe(self) -> dict:
        return {**super().describe(), "norm": "linf", "steps": 1, "step_size": self.eps}
