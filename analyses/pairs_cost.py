"""High-influence pairs from a few trials: each estimator of memtool.estimator.pairs against a
reference, on trials disjoint from the reference's (issue 30).

    python -m analyses.pairs_cost references/mnist --pool runs/pairs/mnist-s4242 --out figures/mnist-pairs-cost

POOL is a ``memtool estimate`` of the reference's data and recipe under another plan seed, so
no trial is the reference's. Each draw of T trials is a random subset of the pool (seeded by T
and the draw's number), so two draws share about T / pool of their trials (the table's
metadata, ``overlap``, and the report say how much). Every estimator calls the pairs the
reference's way: same class, mem(i) >= the mem threshold (mem from the draw itself), estimated
influence >= the influence threshold, or, for the posterior rules, P(infl >= threshold |
estimate) >= a cut tuned on draw 0 and reported on the others. Estimators:

- ``plain``: Feldman & Zhang's difference of 0/1 accuracies (what the tables call ``infl``);
- ``probit``: the margin probit of :func:`memtool.estimator.pairs.probit_influence`;
- ``regression``: :func:`~memtool.estimator.pairs.regression_influence`, candidates the class's
  high-mem training samples;
- ``X + posterior``: empirical-Bayes posterior of X (:func:`~memtool.estimator.pairs.posterior`);
- ``ash``: the regression under a sparse prior fitted to the pairs
  (:func:`~memtool.estimator.pairs.ash_candidates`): ``ash`` calls its posterior-mean infl >= the
  threshold, ``ash + posterior`` its own P(infl >= threshold) >= the tuned cut;
- ``probit + TRAK prior`` (``trak_models`` K > 0): the probit's posterior under a prior fitted
  within bins of the pairs' TRAK scores (:mod:`memtool.estimator.trak_prior`), TRAK from the
  draw's first K trials trained again (their training and TRAK's seconds count as its compute).

Compute: the draw's trials as a fraction of the reference's, plus the estimator's own seconds
in units of one trial's (the pool's mean wall time per trial). The reference's split-half
pairs Jaccard is the ceiling. Written to OUT: ``pairs_cost.parquet`` (one row per estimator,
T and draw), ``pairs_cost.md`` (means over the reported draws) and ``pairs_cost.png``; from the
command line also OUT/manifest.json and the index OUT/../README.md (figures/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from memtool import manifest
from memtool.compare import high_pairs
from memtool.estimator import load_influence
from memtool.estimator.pairs import ash_candidates, candidate_pairs, posterior, probit_influence, regression_influence
from memtool.estimator.trak_prior import run_trak, trak_posterior
from memtool.estimator.scores import at_least, influence_at, memorization
from memtool.estimator.store import load_labels, load_trials, read_run_json
from memtool.rundir import diff_settings, write_table

CUTS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7)  # posterior-probability cuts tried on draw 0
BASE = ("plain", "probit", "regression")  # each also with the posterior; "ash" brings its own


def candidates(trials, labels, mem_threshold: float):
    """(train_ids, test_ids, high_mem, mem): the pairs the reference's rule can call, by the draw's own mem."""
    mem = memorization(trials.member, trials.train_correct)["mem"]
    tr, te = candidate_pairs(mem, labels["train_label"], labels["test_label"], mem_threshold)
    return tr, te, np.flatnonzero(at_least(mem, mem_threshold)), mem


def estimates(name: str, trials, labels, train_ids, test_ids, high):
    """(infl, se) of every candidate pair by estimator ``name``."""
    if name == "plain":  # the F&Z difference and its Agresti-Caffo SE
        return influence_at(trials.member, trials.test_correct, train_ids, test_ids)
    if name == "probit":
        return probit_influence(trials.member, trials.test_margin, train_ids, test_ids)
    if name == "regression":
        infl, se = np.full(len(train_ids), np.nan), np.full(len(train_ids), np.nan)
        for c in np.unique(labels["train_label"][high]):
            cand = high[labels["train_label"][high] == c]
            tests = np.flatnonzero(labels["test_label"] == c)
            f, s = regression_influence(trials.member, trials.test_margin, cand, tests)
            col = {i: k for k, i in enumerate(cand)}
            row = {j: k for k, j in enumerate(tests)}
            pick = np.flatnonzero(labels["train_label"][train_ids] == c)
            r = np.array([row[j] for j in test_ids[pick]])
            k = np.array([col[i] for i in train_ids[pick]])
            infl[pick], se[pick] = f[r, k], s[r, k]
        return infl, se
    raise ValueError(f"unknown estimator {name!r}; choose from {BASE}")


def draw_rows(pool: int, t: int, d: int) -> np.ndarray:
    """Rows of draw ``d`` of ``t`` trials from a pool of ``pool``: a random subset, seeded by (t, d)."""
    return np.sort(np.random.default_rng([t, d]).choice(pool, t, replace=False))


def mean_overlap(pool: int, t: int, draws: int) -> float:
    """The mean share of trials two draws of ``t`` have in common (about t / pool)."""
    rows = [set(draw_rows(pool, t, d).tolist()) for d in range(draws)]
    pairs = [(a, b) for a in range(draws) for b in range(a + 1, draws)]
    return float(np.mean([len(rows[a] & rows[b]) / t for a, b in pairs])) if pairs else 0.0


def score(called: set, reference: set) -> dict:
    hit = len(called & reference)
    union = len(called | reference)
    return {"n_pairs": len(called), "precision": hit / len(called) if called else np.nan,
            "recall": hit / len(reference) if reference else np.nan, "jaccard": hit / union if union else np.nan}


def cut_rows(name: str, t: int, d: int, prob, seconds: float, tr, te, ref_pairs) -> list[dict]:
    """One row per posterior cut of ``CUTS``: the pairs with P >= the cut."""
    rows = []
    for cut in CUTS:
        keep = prob >= cut
        rows.append({"estimator": name, "trials": t, "draw": d, "rule": f"P >= {cut:g}", "seconds": seconds,
                     "expected_false": float((1 - prob[keep]).sum()), **score(set(zip(tr[keep], te[keep])), ref_pairs)})
    return rows


def run(reference, pool, out, *, sizes=(64, 128, 256), draws: int = 5, estimators=BASE, ash: bool = True,
        trak_models: int = 0, progress: bool = True):
    reference, pool, out = Path(reference), Path(pool), Path(out)
    ref_meta, pool_meta = read_run_json(reference), read_run_json(pool)
    ref_cfg = {k: v for k, v in ref_meta["config"].items() if k != "seed"}
    pool_cfg = {k: v for k, v in pool_meta["config"].items() if k != "seed"}
    diffs = diff_settings(ref_cfg, pool_cfg)
    if diffs:
        raise ValueError(f"{pool} is not an estimate of {reference}'s recipe and data: " + "; ".join(diffs))
    if ref_meta["config"].get("label_noise"):
        raise ValueError(f"{reference} planted label noise, seeded by the plan seed: a pool under another seed has "
                         "other labels; measure on a run without --label-noise")
    if ref_meta["config"]["seed"] == pool_meta["config"]["seed"]:
        raise ValueError(f"{pool} has the reference's plan seed: its trials are the reference's; use another --seed")
    summary = ref_meta["summary"]
    mem_t, infl_t = summary["mem_threshold"], summary["infl_threshold"]
    ref_pairs = high_pairs(load_influence(reference))
    trials, labels = load_trials(pool), load_labels(pool)
    log = [json.loads(line) for line in (pool / "log.jsonl").read_text().splitlines()]
    per_trial = sum(r["seconds"] for r in log) / sum(r["trials"][1] - r["trials"][0] + 1 for r in log)
    n_ref = summary["n_trials"]
    rows = []
    for t in sizes:
        if t > len(trials):
            raise ValueError(f"{pool} has {len(trials)} finished trials, fewer than a draw of {t}")
        for d in range(draws):
            rows_d = draw_rows(len(trials), t, d)
            sub = trials.subset(rows_d)
            start = time.perf_counter()
            tr, te, high, mem = candidates(sub, labels, mem_t)
            base_s = time.perf_counter() - start
            for name in estimators:
                start = time.perf_counter()
                f, s = estimates(name, sub, labels, tr, te, high)
                est_s = base_s + time.perf_counter() - start
                keep = at_least(f, infl_t)
                rows.append({"estimator": name, "trials": t, "draw": d, "rule": f"infl >= {infl_t:g}",
                             "seconds": est_s, **score(set(zip(tr[keep], te[keep])), ref_pairs)})
                start = time.perf_counter()
                prob, _ = posterior(f, s, infl_t)
                rows += cut_rows(f"{name} + posterior", t, d, prob, est_s + time.perf_counter() - start, tr, te, ref_pairs)
            if ash:
                start = time.perf_counter()  # the same candidate pairs, in the same order
                _, _, f, prob = ash_candidates(sub.member, sub.test_margin, mem, labels["train_label"],
                                               labels["test_label"], mem_t, infl_t)
                ash_s = base_s + time.perf_counter() - start
                keep = at_least(f, infl_t)
                rows.append({"estimator": "ash", "trials": t, "draw": d, "rule": f"infl >= {infl_t:g}",
                             "seconds": ash_s, **score(set(zip(tr[keep], te[keep])), ref_pairs)})
                rows += cut_rows("ash + posterior", t, d, prob, ash_s, tr, te, ref_pairs)
            if trak_models:
                start = time.perf_counter()
                scores = run_trak(pool, sub.trial_ids[:trak_models])[tr, te]
                f, s = estimates("probit", sub, labels, tr, te, high)
                prob = trak_posterior(f, s, scores, infl_t)
                rows += cut_rows("probit + TRAK prior", t, d, prob, base_s + time.perf_counter() - start, tr, te,
                                 ref_pairs)
            if progress:
                print(f"pairs_cost: T={t} draw {d} done", flush=True)
    table = pd.DataFrame(rows)
    table["compute_fraction"] = (table["trials"] + table["seconds"] / per_trial) / n_ref
    # the posterior's cut: the one of the best Jaccard on draw 0, per estimator and T; reported on the other draws
    first = table[table["draw"] == 0].sort_values("jaccard", ascending=False)
    tuned = first.groupby(["estimator", "trials"])["rule"].first()
    table["chosen"] = [r.rule == tuned.get((r.estimator, r.trials), r.rule) for r in table.itertuples()]
    info = {"reference": str(reference), "pool": str(pool), "pool_trials": len(trials), "reference_trials": n_ref,
            "seconds_per_trial": per_trial, "ceiling_split_half_jaccard": summary["split_half"]["jaccard_high_pairs"],
            "n_reference_pairs": len(ref_pairs), "sizes": list(sizes), "draws": draws, "trak_models": trak_models,
            "overlap": {t: mean_overlap(len(trials), t, draws) for t in sizes}}
    out.mkdir(parents=True, exist_ok=True)
    write_table(table, out / "pairs_cost.parquet", info)
    (out / "pairs_cost.md").write_text(report(table, info))
    figure(table, info, out / "pairs_cost.png")
    return table


def reported(table: pd.DataFrame) -> pd.DataFrame:
    """Means over the reported draws (draw 0 tuned the posterior's cut, so draws 1.. when there are more)."""
    rows = table[table["chosen"] & ((table["draw"] > 0) | (table["draw"].max() == 0))]
    return rows.groupby(["estimator", "trials"], sort=False).agg(
        rule=("rule", "first"), compute_fraction=("compute_fraction", "mean"), n_pairs=("n_pairs", "mean"),
        expected_false=("expected_false", "mean"), precision=("precision", "mean"), recall=("recall", "mean"),
        jaccard=("jaccard", "mean"), jaccard_sd=("jaccard", "std"), draws=("draw", "nunique")).reset_index()


def report(table: pd.DataFrame, info: dict) -> str:
    r = reported(table)
    lines = [f"# High-influence pairs from few trials ({info['reference']})", "",
             f"Reference: {info['reference_trials']} trials, {info['n_reference_pairs']} pairs; its split-half "
             f"Jaccard (the ceiling): {info['ceiling_split_half_jaccard']:.3f}. Draws from {info['pool']} "
             f"({info['pool_trials']} trials under another plan seed; {info['seconds_per_trial']:.2f} s per trial; two "
             "draws share " + ", ".join(f"{100 * v:.0f} %" for v in info["overlap"].values())
             + " of their trials at T = "
             + ", ".join(map(str, info["overlap"])) + "). "
             "Posterior rules: the cut of the best Jaccard on draw 0, reported on the other draws.", "",
             "| estimator | T | rule | compute | pairs | expected false | precision | recall | Jaccard (sd) | draws |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in r.itertuples():
        ef = "" if pd.isna(x.expected_false) else f"{x.expected_false:.0f}"
        lines.append(f"| {x.estimator} | {x.trials} | {x.rule} | {x.compute_fraction:.3f} | {x.n_pairs:.0f} | {ef} | "
                     f"{x.precision:.3f} | {x.recall:.3f} | {x.jaccard:.3f} ({x.jaccard_sd:.3f}) | {x.draws} |")
    return "\n".join(lines) + "\n"


def figure(table: pd.DataFrame, info: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    r = reported(table)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, g in r.groupby("estimator", sort=False):
        ax.errorbar(g["compute_fraction"], g["jaccard"], yerr=g["jaccard_sd"], marker="o", capsize=2, label=name)
    ax.axhline(info["ceiling_split_half_jaccard"], color="grey", ls="--", lw=1, label="reference split half")
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set(xlabel="compute (fraction of the reference's)", ylabel="pairs Jaccard against the reference",
           title="High-influence pairs from few trials")
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("reference", help="the reference estimate (a run directory with its tables)")
    p.add_argument("--pool", required=True, help="an estimate of the same recipe and data under another plan seed")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--sizes", default="64,128,256", help="trials per draw, comma-separated")
    p.add_argument("--draws", type=int, default=5, help="draws per size")
    p.add_argument("--estimators", default=",".join(BASE), help="of plain, probit, regression (each also with the "
                   "posterior), comma-separated")
    p.add_argument("--no-ash", action="store_true", help="leave out the adaptive-shrinkage regression")
    p.add_argument("--trak-models", type=int, default=0,
                   help="K > 0: also the probit under a TRAK prior from K of each draw's trials (trained again)")
    a = p.parse_args(argv)
    run(a.reference, a.pool, a.out, sizes=tuple(int(s) for s in a.sizes.split(",")), draws=a.draws,
        estimators=tuple(a.estimators.split(",")), ash=not a.no_ash, trak_models=a.trak_models)
    out = Path(a.out)
    m = manifest.load(out, name=out.name, description=f"High-influence pairs from few trials against {a.reference}",
                      command="python -m analyses.pairs_cost " + " ".join(argv if argv is not None else sys.argv[1:]))
    manifest.record(m, out, "pairs_cost", [out / f"pairs_cost.{x}" for x in ("png", "md", "parquet")],
                    f"{a.pool} against {a.reference}", [], {})
    manifest.write_index(out.parent)
    print((out / "pairs_cost.md").read_text())


if __name__ == "__main__":
    main()
