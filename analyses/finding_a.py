"""Finding (a) of Xu et al.: memorizing atypical samples helps clean accuracy on atypical test
samples, hardly their adversarial robustness (docs/science.md section 3a).

    python -m analyses.finding_a RUN --out figures/mnist/finding_a --seeds 3

From RUN's score table: atypical training samples (mem >= tau) and atypical test samples
(in a same-class high-influence pair with one). Standard (ST) and PGD-AT models, ``seeds``
each, are trained on the full training set, on the set without its atypical samples and on
the set without as many random samples, with the run's recipe (PGD-AT at ``eps``, the
dataset's usual radius by default). Written to OUT:

- ``finding_a.parquet`` / ``finding_a.md``: clean and robust (PGD-20) accuracy on the atypical
  and the typical test samples per method and training set, mean over seeds with 95 %
  intervals over the seeds and the test samples, and the paired difference to the full set;
  and the models' clean and adversarial training accuracy on the atypical training samples
  (full set);
- ``finding_a.png``: the same as bars.

Expected shape (the paper, CIFAR-100): removing atypical samples drops clean accuracy on
atypical test samples a lot for ST and AT alike, while AT's robust accuracy on them barely
moves. Whatever direction it takes here is the result.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from memtool.estimator import Thresholds
from memtool.experiments import (EXPERIMENT, bar_panels, contrast_markdown, contrasts, markdown, model_accuracy,
                                 retrain, sample_matrix, summarize)
from memtool.methods import PGDAT, Method
from memtool.recipe import Recipe, stream
from memtool.rundir import write_table

from .study import StudySettings, load_study, main as study_main

VARIANTS = ("full", "without atypical", "without random")
# robust accuracy on the training samples is read on the full set only (the fit of the atypical ones)
ROBUST_SPLITS = {"full": ("train", "test"), "without atypical": ("test",), "without random": ("test",)}
EVAL_STEPS = 20


def run(run_dir, out, *, seeds: int = 3, eps: float | None = None, pgd_steps: int = 10,
        thresholds: Thresholds = Thresholds(), recipe: Recipe | None = None, device: str = "cpu", data_root=None,
        progress: bool = True) -> pd.DataFrame:
    """Run finding (a) on ``run_dir``'s scores into ``out`` (see the module docstring).
    ``recipe``: how the models are retrained (default: the run's), its method replaced by
    standard training and by PGD-AT at ``eps`` with ``pgd_steps`` steps."""
    run_dir, out = Path(run_dir), Path(out)
    st = load_study(run_dir, eps, thresholds, device, data_root)
    mem_threshold, infl_threshold = thresholds.mem_threshold, thresholds.infl_threshold
    cfg, ds, data, eps, meta = st.config, st.dataset, st.data, st.eps, st.meta
    atyp_train, atyp_test, atypical_ids = st.atypical_train, st.atypical_test, st.atypical_ids
    rng = np.random.default_rng(stream(cfg.seed, EXPERIMENT, len(atypical_ids)))
    variants = dict(zip(VARIANTS, ([], atypical_ids, rng.choice(len(atyp_train), len(atypical_ids), replace=False))))
    methods = {"ST": Method(), "AT": PGDAT(eps=eps, pgd_steps=pgd_steps)}
    tables, per_model, kept = [], {}, {}
    for name, method in methods.items():
        records = retrain(out / name, data, replace(recipe or cfg.recipe, method=method), variants, seeds,
                          seed=cfg.seed, robust_eps=eps, robust_steps=EVAL_STEPS, robust_splits=ROBUST_SPLITS,
                          settings={"fingerprint": ds.fingerprint}, progress=progress)
        test = summarize(records, {"atypical test": atyp_test, "typical test": ~atyp_test}, baseline="full")
        train = summarize(records[records["variant"] == "full"], {"atypical train": atyp_train,
                                                                  "typical train": ~atyp_train}, split="train")
        tables.append(pd.concat([test, train], ignore_index=True).assign(method=name))
        per_model[name] = model_accuracy(records)
        kept[name] = records
    table = pd.concat(tables, ignore_index=True)
    table = table[["method"] + [c for c in table.columns if c != "method"]]
    info = {"run": str(run_dir), "eps": eps, "robust_attack": f"pgd{EVAL_STEPS}", "seeds": seeds,
            "mem_threshold": mem_threshold, "infl_threshold": infl_threshold,
            "n_atypical_train": int(atyp_train.sum()), "n_train": int(len(atyp_train)),
            "n_atypical_test": int(atyp_test.sum()), "n_test": int(len(atyp_test)), "dataset": meta["dataset"]}
    con = loss_contrasts(kept, np.flatnonzero(atyp_test))
    info["contrasts"] = con.to_dict(orient="records")
    write_table(table, out / "finding_a.parquet", info)
    (out / "finding_a.md").write_text(
        f"# Finding (a) on {cfg.dataset} ({run_dir})\n\n"
        f"Atypical training samples (mem >= {mem_threshold}): {info['n_atypical_train']} of {info['n_train']}; "
        f"atypical test samples (high-influence pair, infl >= {infl_threshold}): {info['n_atypical_test']} of "
        f"{info['n_test']}. Robust: PGD-{EVAL_STEPS} at eps {eps:g}. {seeds} seeds per cell, 95 % intervals "
        "over the seeds and the test samples; differences paired by seed and sample.\n\n"
        + "\n".join(f"## {m}\n\n" + markdown(t.drop(columns="method")) for m, t in table.groupby("method", sort=False))
        + "\n## Contrasts on the atypical test samples\n\n" + contrast_markdown(con, CONTRAST_NOTE)
        + "\n## Per model\n\n" + "\n".join(f"{m}:\n\n{t}" for m, t in per_model.items()))
    test = table[table["group"] != "atypical train"]
    panels = {f"{m}: {k} accuracy": test[(test["method"] == m) & (test["metric"] == k)]
              for m in methods for k in ("clean", "robust")}
    bar_panels(table, out / "finding_a.png", f"Finding (a) on {cfg.dataset} (robust: PGD-{EVAL_STEPS}, eps {eps:g})",
               panels)
    return table


CONTRAST_NOTE = ("A loss is accuracy without the atypical training samples minus accuracy with them, per seed; the "
                 "paper's claim is that AT's robust loss is small (\"hardly\") next to the clean loss memorization "
                 "buys. Seeds pair across ST and AT by index, test samples by id; 95 % intervals over the seeds and "
                 "the test samples.")


def loss_contrasts(records: dict, ids) -> pd.DataFrame:
    """Finding (a)'s contrasts on the test samples ``ids`` (the atypical ones), paired by seed and
    sample: AT's robust loss, AT's clean loss and ST's clean loss from removing the atypical
    training samples, and AT's robust loss against each of the two clean losses (``records``:
    method -> its per-sample records)."""
    def loss(method, column):
        return (sample_matrix(records[method], "without atypical", column, ids)
                - sample_matrix(records[method], "full", column, ids))

    at_rob, at_clean, st_clean = loss("AT", "robust_correct"), loss("AT", "correct"), loss("ST", "correct")
    return contrasts({"AT robust loss": at_rob, "AT clean loss": at_clean, "ST clean loss": st_clean,
                      "AT robust loss - ST clean loss": at_rob - st_clean,
                      "AT robust loss - AT clean loss": at_rob - at_clean})


def main(argv=None):
    table = study_main(__doc__, run, StudySettings, argv)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
