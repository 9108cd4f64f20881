"""AutoAttack (Croce & Hein 2020), standard version: APGD-CE, APGD-T, FAB-T, Square; and its
first two attacks alone (``apgd``: APGD-CE + APGD-T with the standard budget), a cheaper
ranking attack whose agreement with the standard version is measured where it is used.

A thin wrapper over a maintained package; memtool does not re-implement it. The default
backend is ``pyautoattack`` (the PyPI release of the authors' fra31/auto-attack code);
``torchattacks`` (Harry24k's re-implementation) is the alternative, compared in
benchmarks/autoattack_compare.py. With either backend only the standard version runs, with
its fixed budget (:data:`STANDARD`), and that is what every summary records.
Install: ``pip install --no-deps pyautoattack==0.2.0``
(and for the comparison ``pip install --no-deps torchattacks==3.5.1``).

Resuming an interrupted AutoAttack run is done by :mod:`memtool.evaluation`, which calls the
attack batch by batch and saves per-sample flags after each batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import check_choice
from .base import Attack

BACKENDS = ("pyautoattack", "torchattacks")
VERSIONS = ("standard", "apgd")
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
        check_choice("version", self.version, VERSIONS)  # standard AutoAttack, or its APGD-CE + APGD-T
        check_choice("norm", self.norm, tuple(_NORM_NAMES))
        check_choice("backend", self.backend, BACKENDS)
        if self.version == "apgd" and self.backend != "pyautoattack":
            raise ValueError("the apgd version runs with backend pyautoattack only")

    def perturb(self, model, x, y, gen=None):
        """Both packages seed the global RNG with ``seed`` (``gen`` is not used); the caller's RNG
        state is restored afterwards."""
        with torch.random.fork_rng(devices=[x.device.index or 0] if x.device.type == "cuda" else []):
            return self._run(model, x, y)

    def _run(self, model, x, y):
        norm = _NORM_NAMES[self.norm]
        if self.backend == "pyautoattack":
            try:
                from pyautoattack import AutoAttack as AA
            except ImportError:
                raise _missing(self.backend) from None
            if self.version == "standard":
                aa = AA(model, eps=self.eps, norm=norm, version="standard", seed=self.seed, device=x.device)
            else:  # the standard version's first two attacks with its settings (_set_version("standard"))
                aa = AA(model, eps=self.eps, norm=norm, version="custom", attacks=["apgd-ce", "apgd-t"],
                        seed=self.seed, device=x.device)
                aa.apgd.n_restarts = aa.apgd_targeted.n_restarts = STANDARD["restarts"]
                aa.apgd_targeted.n_target_classes = STANDARD["target_classes"]
            return aa.run_standard_evaluation(x, y, batch_size=len(x))[0]
        try:
            import torchattacks
        except ImportError:
            raise _missing(self.backend) from None
        with torch.no_grad():
            n_classes = model(x[:1]).shape[1]
        return torchattacks_standard(torchattacks, model, norm, self.eps, n_classes, self.seed)(x, y)

    def describe(self) -> dict:
        d = {**super().describe(), **STANDARD, "version": self.version}
        if self.version == "apgd":
            d["attacks"], d["attack"] = ["apgd-ce", "apgd-t"], "apgd"
        return d


# The standard version's fixed budget (fra31/auto-attack, AutoAttack._set_version("standard")).
STANDARD = {"attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "steps": 100, "restarts": 1,
            "target_classes": 9, "square_queries": 5000, "step_size": "adaptive (APGD)"}


def torchattacks_standard(torchattacks, model, norm: str, eps: float, n_classes: int, seed: int):
    """AutoAttack's standard version built from torchattacks' components with the authors'
    settings: APGD-CE and APGD-T (DLR, 9 target classes) with 100 iterations and 1 restart,
    FAB-T (9 targets, 100 iterations), Square (5000 queries, p_init 0.8, no schedule
    rescaling); each later attack runs on the samples the earlier ones did not fool.
    (``torchattacks.AutoAttack(version="standard")`` runs 10 iterations and n_classes - 1
    targets, so memtool does not use it.)"""
    targets = min(STANDARD["target_classes"], n_classes - 1)
    steps = STANDARD["steps"]
    apgd_t = torchattacks.APGDT(model, norm=norm, eps=eps, steps=steps, n_restarts=1, seed=seed, n_classes=n_classes)
    fab_t = torchattacks.FAB(model, norm=norm, eps=eps, steps=steps, n_restarts=1, seed=seed, multi_targeted=True,
                             n_classes=n_classes)
    apgd_t.n_target_classes = fab_t.n_target_classes = targets
    return torchattacks.MultiAttack([
        torchattacks.APGD(model, norm=norm, eps=eps, steps=steps, n_restarts=1, seed=seed, loss="ce"),
        apgd_t, fab_t,
        torchattacks.Square(model, norm=norm, eps=eps, n_queries=STANDARD["square_queries"], n_restarts=1,
                            p_init=0.8, resc_schedule=False, seed=seed),
    ])
