"""The estimator's configuration: what defines a run's results (and so must match on reopen).

How the work is executed (number of trials, models per stack, device, processes, shard) is
not part of it: the same run directory can be extended with more trials, or finished on
another machine with another ensemble size, and each trial's result stays the same."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from ..config import check_int, check_number, setting
from ..datasets import standard_eps
from ..models import SPEC, spec_of
from ..recipe import DataJob, Recipe


@dataclass(frozen=True)
class EstimateConfig(DataJob):
    ratio: float = setting(0.7, "subset size / training set size, in (0, 1)")
    seed: int = setting(0, "seed of the plan, label noise, model inits and minibatch orders")
    robust: bool | None = setting(None, "also record correctness under PGD (default: on for adversarial methods)")
    robust_eps: float | None = setting(None, "L-inf radius of that PGD (default: the method's eps, else the dataset's)")
    recipe: Recipe = setting(None, "how each model is trained", cli=False, factory=Recipe)
    train_fn: str | None = setting(None, "MODULE:FUNCTION: your own training loop f(data, subset_ids, seed) -> "
                                         "nn.Module, in place of the recipe's (memtool keeps plan, seeds, resume, tables)")
    trainer: object = field(default=None, compare=False, repr=False)  # the train_fn callable (never serialized)

    def __post_init__(self):
        if callable(self.train_fn):
            object.__setattr__(self, "trainer", self.train_fn)
            object.__setattr__(self, "train_fn", spec_of(self.train_fn))
        if self.train_fn is not None and not (isinstance(self.train_fn, str) and SPEC.fullmatch(self.train_fn)):
            raise ValueError(f"train_fn must be a callable or MODULE:FUNCTION, got {self.train_fn!r}")
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

    def to_dict(self) -> dict:
        d = super().to_dict()
        del d["trainer"]
        if d["train_fn"] is None:  # only when set: runs made before it reopen unchanged
            del d["train_fn"]
        return d

    def check_trainer(self) -> None:
        """A run made with a train_fn is trained further only with the user's callable named again."""
        if self.train_fn is not None and self.trainer is None:
            raise ValueError(f"this run trains with your own loop {self.train_fn}, and memtool never imports code named "
                             f"in a run directory: name it yourself (--train-fn {self.train_fn}, or train_fn=...)")
        if self.trainer is not None:
            try:
                inspect.signature(self.trainer).bind(None, None, 0)
            except TypeError as e:
                raise TypeError(f"train_fn {self.train_fn} must take (dataset, subset_ids, seed) and return the trained "
                                f"nn.Module; calling it so fails: {e}") from None
            except ValueError:  # no signature to read (a builtin): its first call says
                pass
