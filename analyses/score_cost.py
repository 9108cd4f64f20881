"""Quality against compute: how close do cheap scores come to a subsampling reference?

    python -m analyses.score_cost runs/mnist/estimate --out runs/mnist/score_cost
    (the `score_cost` stage of `memtool figures --config configs/reference-mnist.yaml`)

Against the reference RUN (its scores and high-influence pairs), on the same data and recipe:

- subsampling with T = 16, 64, 256 trials: the first T trials of one independent run (plan
  seed + 1, ``--record-proxies``), and the reference's own split half (its first target);
- every proxy of :mod:`memtool.proxies` from 1, 4 and 16 ordinary runs (whole training set);
- TracIn pairs, ``mem_hat(i) * cos(i, j)``, with mem_hat calibrated as below;
- hybrids (:mod:`memtool.hybrid`): T = 16 or 64 trials calibrating the 16-run proxies
  (cross-fitted regression), their pairs from TracIn, alone and regressed on the T trials'
  noisy infl.

Compute is counted in model-epochs over training samples (models x epochs x samples each
trains on), also as a fraction of the reference's. Quality: Spearman with the reference's
mem, AUROC and precision at k of the reference's high-memorization set (k = its size), and
for methods with pairs, precision / recall / Jaccard of the high-influence pairs and the
Jaccard of the atypical test sets. The target (issue: ~1/10 of the compute): precision >= 0.9
and pairs Jaccard >= 0.5. Downstream: ``memtool validate`` on the cheapest method that has
pairs and on the reference, same seeds: do the cheap pairs' training sides hurt their test
samples as much when removed?

Writes OUT/score_cost.{parquet,md,png}; the runs it trains go to OUT/runs/ (resumable).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from memtool import estimate, load_influence, load_scores, validate
from memtool.config import setting
from memtool.compare import agreement, high_pairs, pair_agreement
from memtool.estimator import Thresholds, load_trials, read_run_json
from memtool.estimator.scores import at_least, memorization
from memtool.estimator.store import load_labels
from memtool.estimator.tables import high_pair_set
from memtool.hybrid import cheap_influence, hybrid_tables, load_tracin, write_hybrid_run
from memtool.proxies import PROXIES, proxies
from memtool.recipe import Recipe, flat_recipe
from memtool.rundir import write_table

from .study import main as study_main

TRIALS = (16, 64, 256)
SEEDS = (1, 4, 16)
HYBRID_TRIALS = (16, 64)


def _split_half_row(reference, meta, labels, cost, ref_compute, mem_threshold, infl_threshold, pairs) -> dict:
    """The reference's own split half, odd trials against even ones (its first target); from the
    run's summary when its trials are not here (a committed reference)."""
    n = meta["summary"]["n_trials"]
    name = f"reference split half ({n // 2} vs {n - n // 2} trials)"
    try:
        trials = load_trials(reference)
    except FileNotFoundError:
        sh = meta["summary"]["split_half"]
        return {"method": name, "model_epochs": n // 2 * cost, "compute_fraction": (n // 2) / n,
                "spearman": sh["spearman_mem"], "pairs_jaccard": sh["jaccard_high_pairs"]}
    halves = [trials.subset(slice(0, None, 2)), trials.subset(slice(1, None, 2))]
    mems = [memorization(h.member, h.train_correct)["mem"] for h in halves]
    hp = [high_pair_set(h, labels, mm, mem_threshold, infl_threshold, pairs=pairs) for h, mm in zip(halves, mems)]
    return _row(name, len(halves[1]) * cost, ref_compute, mems[0], at_least(mems[0], mem_threshold), mems[1],
                hp[1], hp[0])


def _row(method, compute, ref_compute, ref_mem, high, score, pairs=None, ref_pairs=None, **extra) -> dict:
    r = {"method": method, "model_epochs": compute, "compute_fraction": compute / ref_compute,
         **agreement(ref_mem, score, high), **extra}
    if pairs is not None:
        r.update(pair_agreement(ref_pairs, pairs))
    return r


@dataclass(frozen=True)
class ScoreCost:
    trials: tuple[int, ...] = setting(TRIALS, "subsampling points: the first T trials of one independent run")
    seeds: tuple[int, ...] = setting(SEEDS, "proxy points: the mean over this many single training runs")
    hybrid_trials: tuple[int, ...] = setting(HYBRID_TRIALS, "the hybrids' calibration trials (each among --trials)")
    validate_seeds: int = setting(3, "seeds of the downstream validate of the cheapest hybrid")


def run(reference, out, *, trials=TRIALS, seeds=SEEDS, hybrid_trials=HYBRID_TRIALS, validate_seeds: int = 3,
        thresholds: Thresholds = Thresholds(), device: str = "cpu", data_root=None,
        progress: bool = True) -> pd.DataFrame:
    reference, out = Path(reference), Path(out)
    mem_threshold, infl_threshold = thresholds.mem_threshold, thresholds.infl_threshold
    meta = read_run_json(reference)
    cfg = meta["config"]
    recipe = cfg["recipe"]
    ref, labels = load_scores(reference), load_labels(reference)
    ref_tr = ref[ref["split"] == "train"]
    ref_mem = ref_tr["mem"].to_numpy()
    high = at_least(ref_mem, mem_threshold)
    ref_pairs = high_pairs(load_influence(reference))
    n = len(ref_mem)
    m = int(round(cfg["ratio"] * n))
    epochs = recipe["epochs"]
    n_ref = meta["summary"]["n_trials"]
    ref_compute = n_ref * epochs * m
    pairs = meta["summary"].get("pairs", "fz")  # the reference's own estimator: fewer trials of the same estimate
    rows = [_split_half_row(reference, meta, labels, epochs * m, ref_compute, mem_threshold, infl_threshold, pairs)]

    # subsampling: one independent run, its first T trials
    flat = {**{k: v for k, v in cfg.items() if k not in ("recipe",)}, **flat_recipe(Recipe.from_dict(recipe))}
    sub = out / "runs" / "subsampling"
    estimate(sub, trials=max(trials), progress=progress, device=device, data_root=data_root, record_proxies=True,
             **{**flat, "seed": cfg["seed"] + 1})
    sub_trials = load_trials(sub)
    for t in trials:
        st = sub_trials.subset(slice(0, t))
        mem_t = memorization(st.member, st.train_correct)["mem"]
        rows.append(_row(f"subsampling, {t} trials", t * epochs * m, ref_compute, ref_mem, high, mem_t,
                         high_pair_set(st, labels, mem_t, mem_threshold, infl_threshold, pairs=pairs), ref_pairs))

    # one-run proxies, 1 / 4 / 16 runs
    px_flat = {k: v for k, v in flat.items() if k not in ("ratio", "robust", "robust_eps")}
    px = {}
    for s in seeds:
        px[s] = proxies(out / "runs" / f"proxies-{s}", seeds=s, progress=progress, device=device,
                        data_root=data_root, **px_flat)
        tr = px[s][px[s]["split"] == "train"]
        for name in PROXIES:
            rows.append(_row(f"{name}, {s} run{'s' * (s > 1)}", s * epochs * n, ref_compute, ref_mem, high,
                             tr[name].to_numpy()))
    best = max(seeds)
    tracin = load_tracin(out / "runs" / f"proxies-{best}")
    px_compute = best * epochs * n

    # hybrids: T trials calibrate the proxies; pairs from TracIn (alone, and regressed on the T trials' infl)
    cheap = {}
    for t in hybrid_trials:
        st = sub_trials.subset(slice(0, t))
        scores, fused = hybrid_tables(st, px[best], tracin, mem_threshold, infl_threshold)
        mem_hat = scores.loc[scores["split"] == "train", "mem"].to_numpy()
        compute = t * epochs * m + px_compute
        alone = cheap_influence(tracin, mem_hat, None, mem_threshold, infl_threshold)
        for label, infl in (("TracIn pairs", alone), ("TracIn pairs + trial infl", fused)):
            rows.append(_row(f"hybrid: {t} trials + {best}-run proxies, {label}", compute, ref_compute, ref_mem,
                             high, mem_hat, high_pairs(infl), ref_pairs))
        cheap[t] = (scores, fused)
    table = pd.DataFrame(rows)

    # downstream: validate the cheapest hybrid's pairs against the reference's, same seeds
    t = min(hybrid_trials)
    cheap_run = write_hybrid_run(out / "runs" / f"hybrid-{t}", sub, *cheap[t],
                                 {"calibration_trials": t, "proxy_models": best}, mem_threshold, infl_threshold)
    downstream = pd.concat([validate(cheap_run, out / "runs" / "validate-hybrid", validate_seeds, progress=progress,
                                     device=device, data_root=data_root).assign(scores=f"hybrid {t} trials"),
                            validate(reference, out / "runs" / "validate-reference", validate_seeds, progress=progress,
                                     device=device, data_root=data_root).assign(scores="reference")])
    info = {"reference": str(reference), "reference_trials": n_ref, "reference_model_epochs": ref_compute,
            "dataset": meta["dataset"], "recipe": recipe, "thresholds": {"mem": mem_threshold, "infl": infl_threshold}}
    write_table(table, out / "score_cost.parquet", info)
    write_table(downstream, out / "score_cost_validate.parquet", info)
    _markdown(table, downstream, info, out / "score_cost.md")
    _figure(table, out / "score_cost.png", meta["dataset"]["name"])
    return table


def _markdown(table, downstream, info, path: Path) -> None:
    cols = ["method", "compute_fraction", "spearman", "auroc_high", "precision_at_k", "pairs_precision",
            "pairs_recall", "pairs_jaccard", "atypical_test_jaccard"]
    t = table[[c for c in cols if c in table]].copy()
    lines = [f"# Scores at a fraction of the compute ({info['dataset']['name']})", "",
             f"Reference: {info['reference']} ({info['reference_trials']} trials, "
             f"{info['reference_model_epochs']:,} model-epoch-samples). Compute is a fraction of the reference's; "
             f"k = {int(table['k'].iloc[1])} (the reference's high-memorization set). Target at <= 0.1 of the "
             "compute: precision at k >= 0.9, pairs Jaccard >= 0.5.", "",
             "| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    for r in t.to_dict("records"):
        lines.append("| " + " | ".join(r["method"] if c == "method" else
                                       ("" if pd.isna(r[c]) else f"{r[c]:.3f}") for c in t.columns) + " |")
    lines += ["", "## Downstream: memtool validate with the cheap pairs and with the reference's", ""]
    d = downstream[downstream["group"] == "influenced test samples"]
    for r in d.to_dict("records"):
        diff = "" if r["variant"] == "full" else f", {100 * r['diff']:+.1f} points ({100 * r['diff_low']:+.1f} to {100 * r['diff_high']:+.1f})"
        lines.append(f"- {r['scores']}, {r['variant']}: {100 * r['accuracy']:.1f} % on its influenced test samples{diff}")
    path.write_text("\n".join(lines) + "\n")


def _figure(table, path: Path, dataset: str) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    kinds = {"subsampling": "o-", "reference": "k*", "hybrid": "s", "run": "."}  # reference: its split half
    for ax, col, target, title in ((axes[0], "precision_at_k", 0.9, "high-memorization set: precision at k"),
                                   (axes[1], "pairs_jaccard", 0.5, "high-influence pairs: Jaccard")):
        for kind, style in kinds.items():
            t = table[table["method"].str.contains(kind) & table[col].notna()]
            if kind == "run":
                t = t[~t["method"].str.contains("hybrid")]
            if len(t):
                label = {"run": "one-run proxies", "reference": "reference split half"}.get(kind, kind)
                ax.plot(t["compute_fraction"], t[col], style, label=label, alpha=0.8)
        ax.axhline(target, color="gray", ls="--", lw=0.8)
        ax.axvline(0.1, color="gray", ls=":", lw=0.8)
        ax.set(xscale="log", xlabel="compute (fraction of the reference)", ylabel=col, title=title, ylim=(0, 1),
               xlim=(5e-4, 1))
    axes[0].legend(frameon=False, fontsize=8)
    fig.suptitle(f"Quality against compute ({dataset}): dashed = target, dotted = 1/10 of the reference", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    table = study_main(__doc__, run, ScoreCost, argv, what="the reference `memtool estimate` run")
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
