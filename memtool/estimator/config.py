"""The estimator's configuration: what defines a run's results (and so must match on reopen).

How the work is executed (number of trials, models per stack, device, processes, shard) is
not part of it: the same run directory can be extended with more trials, or finished on
another machine with another ensemble size, and each trial's result stays the same."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import check_int, check_number, setting
from ..datasets import standard_eps
from ..recipe import DataJob, Recipe


@dataclass(frozen=True)
class EstimateConfig(DataJob):
    ratio: float = setting(0.7, "subset size / training set size, in (0, 1)")
    seed: int = setting(0, "seed of the plan, label noise, model inits and minibatch orders")
    robust: bool | None = setting(None, "also record correctness under PGD (default: on for adversarial methods)")
    robust_eps: float | None = setting(None, "L-inf radius of that PGD (default: the method's eps, else the dataset's)")
    recipe: Recipe = setting(None, "how each model is trained", cli=False, factory=Recipe)

    def __post_init__(self):
        check_number("ratio", self.ratio, 0, 1, low_open=True, high_open=True)
        self._check_data()
        check_int("seed", self.seed, 0)
        self._resolve_recipe()
        if self.robust is None:
            object.__setattr__(self, "robust", self.recipe.method.adversarial)
        if self.robust and self.robust_eps is None:
            eps = getattr(self.recipe.method, "eps", None)
            object.__setattr__(self, "robust_eps", standard_eps(self.dataset) if eps is None else eps)
        check_number("robust_eps", self.robust_eps, 0, optional=True)
