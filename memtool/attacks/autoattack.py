"""AutoAttack (Croce & Hein 2020), standard version: APGD-CE, APGD-T, FAB-T, Square.

A thin wrapper over a maintained package; memtool does not re-implement it. The default
backend is ``pyautoattack`` (the PyPI release of the authors' fra31/auto-attack code);
``torchattacks`` (Harry24k's re-implementation) is the alternative, compared in
benchmarks/autoattack_compare.py. Install: ``pip install --no-deps pyautoattack==0.2.0``
(and for the comparison ``pip install --no-deps torchattacks==3.5.1``).

Resuming an interrupted AutoAttack run is done by :mod:`memtool.evaluation`, which calls the
attack batch by batch and saves per-sample flags after each batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Attack

BACKENDS = ("pyautoattack", "torchattacks")
_NORM_NAMES = {"linf": "Linf", "l2": "L2"}


def _missing(backend: str) -> ImportError:
    pins = {"pyautoattack": "pyautoattack==0.2.0", "torchattacks": "torchattacks==3.5.1"}
    return ImportError(f"AutoAttack backend {backend!r} is not installed: "
                       f"run `pip install --no-deps {pins[backend]}`")


@dataclass(frozen=True)
class AutoAttack(Attack):
    norm: str = "linf"
    version: str = "standard"
    seed: int = 0
    backend: str = "pyautoattack"

    name = "autoattack"

    def __post_init__(self):
        super().__post_init__()
        if self.norm not in _NORM_NAMES:
            raise ValueError(f"norm must be one of {tuple(_NORM_NAMES)}, got {self.norm!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def perturb(self, model, x, y):
        norm = _NORM_NAMES[self.norm]
        if self.backend == "pyautoattack":
            try:
                from pyautoattack import AutoAttack as AA
            except ImportError:
                raise _missing(self.backend) from None
            aa = AA(model, eps=self.eps, norm=norm, version=self.version, seed=self.seed, device=x.device)
            return aa.run_standard_evaluation(x, y, batch_size=len(x))[0]
        try:
            import torchattacks
        except ImportError:
            raise _missing(self.backend) from None
        with torch.no_grad():
            n_classes = model(x[:1]).shape[1]
        atk = torchattacks.AutoAttack(model, norm=norm, eps=self.eps, version=self.version,
                                      n_classes=n_classes, seed=self.seed)
        return atk(x, y)

    def describe(self) -> dict:
        d = {**super().describe(), "attacks": self.version}
        if self.version == "standard":  # the fixed budget of the standard version
            d.update(attacks=["apgd-ce", "apgd-t", "fab-t", "square"], steps=100, square_queries=5000,
                     step_size="adaptive (APGD)")
        return d
