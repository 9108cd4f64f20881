"""What every analysis of a run starts from: its config, its data as it was used, the
typical / atypical split of docs/science.md section 2, and the command line they share
(generated from the settings dataclasses, like the rest of memtool's CLI)."""

from __future__ import annotations

import argparse
import inspect
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from memtool.analysis import atypical_test, atypical_train
from memtool.config import Runtime, add_flags, check_int, check_number, flag_values, setting
from memtool.datasets import Dataset, standard_eps
from memtool.estimator import EstimateConfig, Thresholds, load_influence, load_scores, open_run, read_run_json
from memtool.experiments import Data
from memtool.recipe import Recipe, flat_recipe, user_settings


@dataclass
class Study:
    run: Path
    meta: dict
    config: EstimateConfig
    dataset: Dataset
    data: Data  # the same samples as tensors on the device
    eps: float  # the robustness radius of the analysis
    thresholds: Thresholds
    atypical_train: np.ndarray  # (n_train,) bool
    atypical_test: np.ndarray  # (n_test,) bool

    @property
    def atypical_ids(self) -> np.ndarray:
        return np.flatnonzero(self.atypical_train)


def load_study(run, eps: float | None = None, thresholds: Thresholds = Thresholds(), device: str = "cpu",
               data_root=None) -> Study:
    run = Path(run)
    meta, cfg, ds = open_run(run, data_root)
    scores, infl = load_scores(run), load_influence(run)
    return Study(run, meta, cfg, ds, Data.of(ds, device), standard_eps(cfg.dataset) if eps is None else eps,
                 thresholds, atypical_train(scores, thresholds.mem_threshold).to_numpy(),
                 atypical_test(scores, infl, thresholds.mem_threshold, thresholds.infl_threshold).to_numpy())


@dataclass(frozen=True)
class StudySettings:
    """What the retraining analyses share (finding (a), finding (b), the BAT comparison)."""

    seeds: int = setting(3, "models per cell")
    eps: float | None = setting(None, "robustness radius of training and evaluation (default: the dataset's usual one)")
    pgd_steps: int = setting(10, "PGD steps of adversarial training")

    def __post_init__(self):
        check_int("seeds", self.seeds, 1)
        check_number("eps", self.eps, 0, optional=True)
        check_int("pgd_steps", self.pgd_steps, 1)


def main(doc: str, run, settings_cls, argv=None, what: str = "a `memtool estimate` run directory"):
    """The command line of an analysis module: RUN, ``--out`` and one flag per field of
    ``settings_cls``, :class:`Thresholds` and :class:`Runtime` (and of :class:`Recipe` where
    ``run`` retrains models: the flags given override the run's recipe); calls ``run(RUN, OUT,
    thresholds=..., **settings, **runtime)`` and returns its table. A bad input is one error line."""
    p = argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))
    p.add_argument("run", help=what)
    p.add_argument("--out", required=True, help="output directory (resumable)")
    seen: set = set()
    for cls in (settings_cls, Thresholds, Runtime):
        add_flags(p, cls, seen=seen)
    retrains = "recipe" in inspect.signature(run).parameters
    if retrains:
        add_flags(p.add_argument_group("recipe of the retrained models (the flags given override the run's)"), Recipe,
                  seen=seen)
    a = p.parse_args(argv)
    try:
        settings = asdict(settings_cls(**flag_values(a, settings_cls)))  # validated
        if retrains:
            settings["recipe"] = retraining_recipe(a.run, flag_values(a, Recipe))
        thresholds = Thresholds(**flag_values(a, Thresholds))
        return run(a.run, a.out, thresholds=thresholds, **settings, **flag_values(a, Runtime))
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")


def retraining_recipe(run, given: dict) -> Recipe | None:
    """The run's recipe with the ``given`` settings over it (None for a run without one: the
    analysis says why). A constant schedule (the estimate's default, for standard training)
    is noted: the analyses train adversarially with it too."""
    config = read_run_json(run)["config"]
    if "recipe" not in config:
        return None
    recipe = EstimateConfig.from_dict(config).recipe
    if given:
        recipe = Recipe.from_flat(**{**flat_recipe(recipe), **user_settings(given)})  # --model M:F: the user's
    if recipe.schedule == "constant" and "schedule" not in given:
        print(f"note: the retrained models use {run}'s recipe, lr {recipe.lr:g} at a constant schedule; adversarial "
              "training is more reliable with --schedule onecycle (docs/adversarial.md)", file=sys.stderr)
    return recipe
