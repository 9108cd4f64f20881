"""Finding (b) of Xu et al.: memorizing certain atypical samples hurts the typical ones
(docs/science.md section 3b).

    python -m analyses.finding_b RUN --out figures/mnist/finding_b --seeds 3

``judges`` PGD-AT reference models are trained on the full training set (the run's recipe, PGD-AT
at ``eps``, seeds of their own, so no model that judges is one of those evaluated); for every
atypical training sample (mem >= tau) its harmfulness is the judges' mean of
h_i = max over k != y_i of softmax(f(x'_i))_k on its PGD example x'_i against that judge (a
judge puts x'_i confidently into another class when h_i is high). Then PGD-AT is
retrained, ``seeds`` each, on the full set, on the set without the k most harmful atypical
samples, and on the set without k random atypical samples, for several k. Written to OUT:

- ``harmfulness.parquet``: h_i of every atypical training sample (mean and standard deviation over
  the judges, and its mem and label);
- ``finding_b.parquet`` / ``finding_b.md``: clean and robust (PGD-20) accuracy on the typical
  (and atypical) test samples per training set, mean over seeds with 95 % intervals over the
  seeds and the test samples, and the paired difference to the full set;
- ``finding_b.png``: accuracy on the typical test samples against the number removed.

Expected shape (the paper): removing the harmful ones raises clean and robust accuracy on
typical test samples; removing random atypical ones does not. Whatever direction it takes
here is the result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from memtool.config import check_int, check_number, setting
from memtool.engine import fit
from memtool.estimator import Thresholds, load_scores
from memtool.experiments import (EXPERIMENT, contrast_markdown, contrasts, markdown, model_accuracy,
                                 retrain, sample_matrix, summarize)
from memtool.methods import PGDAT, Batch, other_class_confidence
from memtool.recipe import EVAL, Recipe, stream
from memtool.rundir import read_table, write_table
from memtool.sharing import shared

from .study import StudySettings, load_study, main as study_main

EVAL_STEPS = 20
REFERENCE = 0xB0  # seed stream of the reference model (independent of the retrained ones)
FRACTIONS = (0.125, 0.25, 0.5)  # removal sizes, as fractions of the atypical training set


def judge_seed(seed: int, j: int) -> int:
    """The seed of judge ``j`` (judge 0's is the single reference model's of earlier studies)."""
    return stream(seed, EXPERIMENT, REFERENCE) if j == 0 else stream(seed, EXPERIMENT, REFERENCE, j)


def judged_by(path) -> int:
    """How many judges a harmfulness table averages (tables written before judges existed: one)."""
    return int(read_table(path).attrs["memtool"].get("judges", 1))


def harmfulness(model, x, y, attack: PGDAT, seed: int, batch: int = 512) -> np.ndarray:
    """h_i of every sample of ``x`` (uint8 or [0, 1]) under ``attack`` against ``model``."""
    gen = [torch.Generator(device=x.device).manual_seed(stream(seed, EVAL, 7))]
    out = []
    for i in range(0, len(y), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        xb = xb.float().div(255) if xb.dtype == torch.uint8 else xb
        x_adv = attack.pgd(model, xb, yb, Batch(None, 0, 1.0, gen, False))
        with torch.no_grad():
            out.append(other_class_confidence(model(x_adv), yb).cpu())
    return torch.cat(out).numpy()


@dataclass(frozen=True)
class FindingB(StudySettings):
    fractions: tuple[float, ...] = setting(FRACTIONS, "removal sizes, as fractions of the atypical training set")
    judges: int = setting(3, "PGD-AT reference models whose mean harmfulness ranks the atypical samples")

    def __post_init__(self):
        super().__post_init__()
        check_int("judges", self.judges, 1)
        for f in self.fractions:
            check_number("fractions", f, 0, 1, low_open=True)


def run(run_dir, out, *, seeds: int = 3, eps: float | None = None, pgd_steps: int = 10, fractions=FRACTIONS,
        judges: int = 3, thresholds: Thresholds = Thresholds(), recipe: Recipe | None = None, device: str = "cpu",
        data_root=None, progress: bool = True, reuse=None) -> pd.DataFrame:
    """Run finding (b) on ``run_dir``'s scores into ``out`` (see the module docstring).
    ``reuse``: finding (a)'s AT folder, whose full-set models are this one's when their
    settings agree (:func:`memtool.experiments.retrain`)."""
    run_dir, out = Path(run_dir), Path(out)
    st = load_study(run_dir, eps, thresholds, device, data_root)
    mem_threshold = thresholds.mem_threshold
    cfg, ds, data, eps, meta = st.config, st.dataset, st.data, st.eps, st.meta
    atyp_train, atyp_test, atypical_ids = st.atypical_train, st.atypical_test, st.atypical_ids
    if len(atypical_ids) == 0:
        raise ValueError(f"{run_dir} has no atypical training samples (mem >= {mem_threshold})")
    at = PGDAT(eps=eps, pgd_steps=pgd_steps)
    train_recipe = replace(recipe or cfg.recipe, method=at)

    h_path = out / "harmfulness.parquet"

    def reference(_):  # PGD-AT on the full set, seeds of their own: one process trains them, the others wait
        if h_path.exists() and judged_by(h_path) == judges:
            return
        everything = np.arange(len(atyp_train))
        refs = fit(train_recipe, data.x_train, data.y_train, [everything] * judges,
                   [judge_seed(cfg.seed, j) for j in range(judges)], num_classes=data.num_classes)
        probe = PGDAT(eps=eps, pgd_steps=EVAL_STEPS, eps_warmup=0.0)
        h = np.stack([harmfulness(ref, data.x_train[atypical_ids], data.y_train[atypical_ids], probe, cfg.seed)
                      for ref in refs])
        tr = load_scores(run_dir).query("split == 'train'").set_index("sample_id")
        write_table(pd.DataFrame({"sample_id": atypical_ids, "label": ds.y_train[atypical_ids],
                                  "mem": tr.loc[atypical_ids, "mem"].to_numpy(), "h": h.mean(0),
                                  "h_sd": h.std(0, ddof=1) if judges > 1 else np.nan}),
                    h_path, {"run": str(run_dir), "eps": eps, "attack": f"pgd{EVAL_STEPS}", "judges": judges})

    shared(["harmfulness"], "reference", reference, out / "claims", desc=f"{judges} judge model(s)", progress=False)
    harm = read_table(h_path).sort_values(["h", "sample_id"], ascending=[False, True])

    rng = np.random.default_rng(stream(cfg.seed, EXPERIMENT, len(atypical_ids)))
    shuffled = rng.permutation(atypical_ids)
    sizes = sorted({max(1, int(round(f * len(atypical_ids)))) for f in fractions})
    variants = {"full": []}
    for k in sizes:
        variants[f"harmful {k}"] = harm["sample_id"].to_numpy()[:k]
        variants[f"random atypical {k}"] = shuffled[:k]
    records = retrain(out / "AT", data, train_recipe, variants, seeds, seed=cfg.seed, robust_eps=eps,
                      robust_steps=EVAL_STEPS, robust_splits=("test",),
                      settings={"fingerprint": ds.fingerprint}, progress=progress, reuse=reuse)
    table = summarize(records, {"typical test": ~atyp_test, "atypical test": atyp_test}, baseline="full")
    train = summarize(records, {"atypical train": atyp_train, "typical train": ~atyp_train}, split="train",
                      metrics={"correct": "clean"})  # the premise, what each model fits (robust: finding (a)'s models)
    table = pd.concat([table, train], ignore_index=True)
    kind = table["variant"].str.extract(r"^(harmful|random atypical|full)")[0]
    table.insert(1, "removed", kind)
    table.insert(2, "n_removed", pd.to_numeric(table["variant"].str.extract(r"(\d+)$")[0]).fillna(0).astype(int))
    info = {"run": str(run_dir), "eps": eps, "robust_attack": f"pgd{EVAL_STEPS}", "seeds": seeds,
            "mem_threshold": mem_threshold, "n_atypical_train": int(len(atypical_ids)),
            "n_typical_test": int((~atyp_test).sum()), "sizes": sizes, "h_median": float(harm["h"].median()),
            "judges": judges,
            "dataset": meta["dataset"]}
    typical = np.flatnonzero(~atyp_test)
    con = contrasts({f"harmful {k} - random {k}: {metric}": sample_matrix(records, f"harmful {k}", column, typical)
                     - sample_matrix(records, f"random atypical {k}", column, typical)
                     for metric, column in (("robust", "robust_correct"), ("clean", "correct")) for k in sizes},
                    adjust=True)
    info["contrasts"] = con.to_dict(orient="records")
    write_table(table, out / "finding_b.parquet", info)
    (out / "finding_b.md").write_text(
        f"# Finding (b) on {cfg.dataset} ({run_dir})\n\n"
        f"{len(atypical_ids)} atypical training samples (mem >= {mem_threshold}), ranked by harmfulness h under "
        f"PGD-{EVAL_STEPS} at eps {eps:g}, the mean over {judges} PGD-AT model(s) trained on the full set (median h "
        f"{info['h_median']:.3f}). PGD-AT retrained without the k most harmful or k random atypical samples, "
        f"k in {sizes}; {seeds} seeds each, 95 % intervals over the seeds and the test samples, "
        "differences paired by seed and sample.\n\n"
        + markdown(table.drop(columns=["removed", "n_removed"]))
        + "\n## The decisive contrast: harmful minus random removal, typical test samples\n\n"
        + contrast_markdown(con, "Per seed and test sample, correct without the k most harmful atypical samples "
                                 "minus correct without k random ones; the paper's claim is > 0 for robust accuracy. "
                                 "Holm-adjusted over the contrasts: each interval at its Holm step's level.")
        + "\n## Per model\n\nClean accuracy on the training set (the samples a variant leaves out included) and robust "
          "accuracy on the test set; robust training accuracy, the premise, is measured on finding (a)'s full-set "
          "models, which are this table's wherever their settings agree (finding_a.md).\n\n" + model_accuracy(records))
    figure(table, out / "finding_b.png", cfg.dataset, eps)
    return table


def figure(table: pd.DataFrame, path, dataset: str, eps: float):
    import matplotlib.pyplot as plt

    t = table[table["group"] == "typical test"]
    metrics = list(dict.fromkeys(t["metric"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.5), squeeze=False)
    full = t[t["removed"] == "full"].set_index("metric")
    for ax, metric in zip(axes[0], metrics):
        for kind in ("harmful", "random atypical"):
            r = pd.concat([full.loc[[metric]].reset_index(), t[(t["removed"] == kind) & (t["metric"] == metric)]])
            r = r.sort_values("n_removed")
            ax.plot(r["n_removed"], 100 * r["accuracy"], marker="o", label=f"without {kind}")
            ax.fill_between(r["n_removed"], 100 * r["ci_low"], 100 * r["ci_high"], alpha=0.2)
        ax.set(xlabel="atypical training samples removed", ylabel=f"{metric} accuracy on typical test (%)")
        ax.legend(frameon=False, fontsize=8)
    fig.suptitle(f"Finding (b) on {dataset}: PGD-AT (robust: PGD-{EVAL_STEPS}, eps {eps:g})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    table = study_main(__doc__, run, FindingB, argv)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
