"""Adversarial attacks on models that take images in [0, 1].

``build_attack("pgd20", eps=0.3)`` parses an attack name:

=================  ==========================================================
``clean``          no attack
``fgsm``           one step of size eps
``pgdK``           PGD-K, L-inf, random start, step 2.5 * eps / K
``pgdK-l2``        the same under the L2 norm
``pgdK-rR``        R restarts (also ``pgdK-l2-rR``)
``cwK``            CW-inf: PGD-K on the margin loss (also ``-rR``)
``autoattack``     AutoAttack, standard version (``autoattack-l2`` for L2)
``apgd``           its APGD-CE + APGD-T alone, standard budget (a ranking attack)
=================  ==========================================================

Every evaluation number (the engine's robust margins, `memtool train`'s per-epoch check,
`memtool evaluate`) comes from :func:`attacked_logits`: the attack's examples, checked to lie
in its threat model, and the model's logits on them.
"""

from __future__ import annotations

import re

from .autoattack import AutoAttack
from .base import Attack, Clean, attacked_logits, eval_mode
from .cw import CW, margin_loss
from .fgsm import FGSM
from .pgd import PGD, default_step_size, pgd, project, random_start

_PGD_NAME = re.compile(r"^(pgd|cw)(\d+)(-l2)?(?:-r(\d+))?$")


def build_attack(name: str, eps: float, **overrides) -> Attack:
    """The attack called ``name`` (see the module docstring) at radius ``eps``; ``overrides``
    set fields directly (e.g. ``step_size=0.01``, ``backend="torchattacks"``)."""
    key = name.strip().lower()
    if key == "clean":
        return Clean(eps=0.0)
    if key == "fgsm":
        return FGSM(eps=eps, **overrides)
    if key == "apgd":
        return AutoAttack(eps=eps, version="apgd", **overrides)
    if key in ("autoattack", "autoattack-l2"):
        return AutoAttack(eps=eps, norm="l2" if key.endswith("l2") else "linf", **overrides)
    m = _PGD_NAME.match(key)
    if m:
        cls = PGD if m[1] == "pgd" else CW
        kw = {"steps": int(m[2]), "norm": "l2" if m[3] else "linf", "restarts": int(m[4] or 1)}
        return cls(eps=eps, **{**kw, **overrides})
    raise ValueError(f"unknown attack {name!r}; use clean, fgsm, pgdK, pgdK-l2, pgdK-rR, cwK, apgd or autoattack "
                     "(K steps, R restarts, e.g. pgd20, cw20, pgd50-r5)")


__all__ = ["Attack", "AutoAttack", "CW", "Clean", "FGSM", "PGD", "attacked_logits", "build_attack",
           "default_step_size", "eval_mode", "margin_loss", "pgd", "project", "random_start"]
