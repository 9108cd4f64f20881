"""`memtool validate RUN`: do the scores predict retraining? (Feldman & Zhang's own check.)

Retrain the run's recipe, several seeds each, on three training sets: the full set, the set
without the training side of every high-influence pair, and the set without as many random
training samples. If the influence estimates are right, removing the high-influence
training samples lowers accuracy on the test samples they influence (the test side of the
pairs) far more than removing random samples does, and barely moves overall accuracy. On
CIFAR-100 Feldman & Zhang measured 72.1 % -> 45.4 % on the influenced test samples against a
2.5-point drop overall.

Writes ``OUT/validate.parquet`` and ``OUT/validate.md`` (accuracy per variant and group with
95 % intervals over the seeds and the test samples, and the paired difference to the full
set; and each variant's accuracy on its own training samples, whether the learner fits them) and
``OUT/validate.png``; ``OUT/models/`` holds each model's per-sample records, so an
interrupted validation resumes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from .estimator import load_influence, open_run
from .estimator.tables import ESTIMATOR_NAMES
from .experiments import EXPERIMENT, Data, bar_panels, markdown, retrain, summarize
from .models import check_model_record, resolve_model
from .recipe import Recipe, flat_recipe, stream, user_settings
from .userdata import given_for_run
from .rundir import write_table

VARIANTS = ("full", "without high-influence", "without random")


def validate(run, out=None, seeds: int = 3, *, recipe=None, model=None, dataset=None, progress: bool = True,
             device: str = "cpu", data_root=None) -> pd.DataFrame:
    """Retrain and compare (see the module docstring); returns the summary table.
    ``recipe``: retrain with another recipe than the run's (do one learner's pairs predict
    another learner's retraining?), a :class:`memtool.Recipe` or flat overrides of the run's
    (``{"model": "cnn", "lr": 0.05}``). ``model`` / ``dataset``: the user's factory and data
    the run was made with (a run directory names them; memtool does not import them)."""
    run = Path(run)
    out = Path(out) if out is not None else run / "validate"
    if dataset is not None:
        given_for_run(dataset, run)
    meta, cfg, ds = open_run(run, data_root, "validate")
    if model is not None:  # the user's model, checked against the one the run was made with
        cfg = replace(cfg, recipe=cfg.recipe.with_factory(resolve_model(model)))
        check_model_record(meta.get("model"), cfg.recipe.model_record(ds.image_shape, ds.num_classes), run)
    if isinstance(recipe, dict):
        given = user_settings(recipe)
        recipe = Recipe.from_flat(**{**flat_recipe(cfg.recipe), "model": cfg.recipe.factory or cfg.recipe.model,
                                     **given})
    recipe = (recipe or cfg.recipe).for_dataset(cfg.dataset)
    pairs = load_influence(run)
    rule = (pairs.attrs.get("memtool", {}).get("thresholds") or {}).get("pairs", "fz")  # the estimator that called them
    pairs = pairs[pairs["high"]]
    if pairs.empty:
        raise ValueError(f"{run} has no high-influence pairs: nothing to validate (more trials, or lower "
                         "thresholds with `memtool scores RUN --infl-threshold ...`)")
    n, n_test = len(ds.y_train), len(ds.y_test)
    removed = np.unique(pairs["train_id"].to_numpy())
    influenced = np.isin(np.arange(n_test), pairs["test_id"].to_numpy())
    rng = np.random.default_rng(stream(cfg.seed, EXPERIMENT, len(removed)))
    variants = dict(zip(VARIANTS, ([], removed, rng.choice(n, len(removed), replace=False))))
    records = retrain(out, Data.of(ds, device), recipe, variants, seeds, seed=cfg.seed,
                      robust_eps=cfg.robust_eps if cfg.robust else None,
                      settings={"fingerprint": ds.fingerprint}, progress=progress)
    groups = {"influenced test samples": influenced, "all test samples": np.ones(n_test, bool)}
    table = summarize(records, groups, baseline="full")
    fit = [summarize(records[records["variant"] == v], {"own training samples": ~np.isin(np.arange(n), ex)},
                     split="train") for v, ex in variants.items()]  # does the learner fit what it trained on?
    table = pd.concat([table, *fit], ignore_index=True)
    info = {"run": str(run), "n_removed": int(len(removed)), "n_influenced": int(influenced.sum()),
            "seeds": seeds, "recipe": recipe.to_dict(), "dataset": meta["dataset"], "pairs": rule}
    write_table(table, out / "validate.parquet", info)
    r = recipe.to_dict()
    learner = (f"Retrained: {r['model']} (hidden {r['hidden']}), {r['epochs']} epochs, batch {r['batch_size']}, lr "
               f"{r['lr']} {r['schedule']}, {r['method']['name']} training"
               + ("" if recipe == cfg.recipe.for_dataset(cfg.dataset) else " (not the run's recipe)") + ". ")
    (out / "validate.md").write_text(
        f"# Do the scores predict retraining? ({run})\n\n{learner}Removed: the {len(removed)} training samples of the "
        f"high-influence pairs ({ESTIMATOR_NAMES.get(rule, rule)} estimate), or as many random "
        f"ones; influenced test samples: {int(influenced.sum())}; "
        f"{seeds} seeds per variant; 95 % intervals over the seeds and the test samples; differences are "
        f"paired by seed and sample.\n\n"
        + markdown(table))
    panels = {f"{m} accuracy": table[table["metric"] == m] for m in dict.fromkeys(table["metric"])}
    bar_panels(table, out / "validate.png", f"Retraining a {r['model']} without high-influence samples ({cfg.dataset})",
               panels)
    return table
