"""Retraining experiments: train variants of a training set (the full set, the set without
some samples, ...) with several seeds on the engine, record every model's per-sample
correctness, and summarize accuracy per group of samples with confidence intervals over
the seeds and the samples. `memtool validate` and the findings' analyses are such experiments.

    records = retrain(OUT, data, recipe, {"full": [], "without atypical": ids}, seeds=3)
    table = summarize(records, {"atypical test": mask, "typical test": ~mask})

Each (variant, seed) model's records are written to ``OUT/models/VARIANT-sSEED.npz`` as soon
as its stack finishes (atomically), and an interrupted experiment trains only what is
missing; several processes may run the same experiment at once (``memtool figures
--processes N``): each variant's stack is claimed by one of them (OUT/claims/).
``OUT/experiment.json`` holds its settings and a reopen with others is refused.
The models of one variant share seeds with the other variants' (a paired design), and the
seeds stack where the architecture allows.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from .config import device_name
from .engine import default_ensemble_size, fit
from .recipe import Recipe, stream
from .rundir import atomic_write, open_settings, read_json, write_json
from .sharing import shared

EXPERIMENT = 0xE1  # the stream of experiment seeds


@dataclass(frozen=True)
class Data:
    """The tensors an experiment trains and tests on (pixels uint8, on the device)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @classmethod
    def of(cls, ds, device="cpu") -> "Data":
        t = lambda a: torch.tensor(a, device=device)  # noqa: E731  (copies: arrays may be read-only)
        return cls(t(ds.x_train), t(ds.y_train), t(ds.x_test), t(ds.y_test), ds.num_classes)


def experiment_seeds(seed: int, n: int) -> list[int]:
    return [stream(seed, EXPERIMENT, s) for s in range(n)]


def slug(name: str) -> str:
    """``name`` as a file name: runs of other characters than letters, digits, ``_.-`` -> ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _file(out: Path, variant: str, s: int) -> Path:
    return out / "models" / f"{slug(variant)}-s{s}.npz"


def retrain(out, data: Data, recipe: Recipe, variants: dict, seeds: int = 3, *, seed: int = 0,
            robust_eps: float | None = None, robust_steps: int | None = None, robust_splits=("train", "test"),
            settings: dict | None = None, progress: bool = True, reuse: Path | None = None) -> pd.DataFrame:
    """Train ``seeds`` models per variant (``variants``: name -> training sample ids to leave
    out) and return their per-sample records: one row per (variant, seed, split, sample_id)
    with ``correct`` and, with ``robust_eps``, ``robust_correct`` (PGD at that eps) on the
    ``robust_splits``, or per variant with a dict variant -> splits (<NA> on the others: a split
    nobody reads robustly costs no attack). ``reuse``: another experiment's folder; a model it
    trained with the same settings, seed and left-out samples, attacked on at least these
    splits, is copied from it instead of trained (finding (b)'s full set is finding (a)'s)."""
    out = Path(out)
    n = len(data.y_train)
    per_variant = robust_splits if isinstance(robust_splits, dict) else dict.fromkeys(variants, robust_splits)
    splits = {v: list(per_variant.get(v, ())) for v in variants}
    excluded = {v: np.unique(np.asarray(ids, dtype=np.int64)) for v, ids in variants.items()}
    if (out / "experiment.json").exists() and "run" in (old := read_json(out / "experiment.json")):
        write_json(out / "experiment.json", {k: v for k, v in old.items() if k != "run"})  # the path: no setting
    mine = open_settings(out / "experiment.json", {
        **(settings or {}), "recipe": recipe.to_dict(), "seeds": seeds, "seed": seed, "robust_eps": robust_eps,
        "robust_steps": robust_steps, **({"robust_splits": splits} if robust_eps is not None else {}),
        "variants": {v: {"n_excluded": len(ids), "excluded": ids.tolist()} for v, ids in excluded.items()}},
        "experiment settings")
    (out / "models").mkdir(parents=True, exist_ok=True)
    model_seeds = experiment_seeds(seed, seeds)

    def stack(job):  # a variant's missing seeds of one chunk, trained as one stack
        v, chunk = job
        pending = [s for s in chunk if not _file(out, v, s).exists() and not _copied(reuse, mine, out, v, s)]
        if not pending:
            return
        subset = np.setdiff1d(np.arange(n), excluded[v])
        models = fit(recipe, data.x_train, data.y_train, [subset] * len(pending), [model_seeds[s] for s in pending],
                     num_classes=data.num_classes)
        rec = {"train_correct": models.margins(data.x_train, data.y_train) > 0,
               "test_correct": models.margins(data.x_test, data.y_test) > 0}
        if robust_eps is not None:
            for key, split in enumerate(("train", "test")):  # key: the split's attack seed, fixed
                if split not in splits[v]:
                    continue
                x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
                rec[f"{split}_robust_correct"] = models.margins(x, y, robust=robust_eps, steps=robust_steps,
                                                                key=key) > 0
        where = np.array(device_name(data.x_train.device))  # kept with the records: where they were trained
        for j, s in enumerate(pending):
            atomic_write(_file(out, v, s), lambda f, j=j: np.savez_compressed(
                f, device=where, **{k: r[j].cpu().numpy() for k, r in rec.items()}))

    # seed-major chunks of as many models as train at once on this device: every finished chunk is saved,
    # and an interrupted experiment holds whole seeds (every variant), so its differences pair
    k = default_ensemble_size(recipe, data.x_train.device, int(np.prod(data.x_train.shape[1:])))
    chunks = [tuple(range(i, min(i + k, seeds))) for i in range(0, seeds, k)]
    todo = [(v, c) for c in chunks for v in variants if any(not _file(out, v, s).exists() for s in c)]
    shared(todo, "retrain", stack, out / "claims", desc="retraining",
           name=lambda job: slug(job[0]) if len(chunks) == 1 else f"{slug(job[0])}-s{job[1][0]}",
           progress=progress and bool(todo), unit="stack")
    return load_records(out, variants, seeds)


def _copied(src: Path | None, mine: dict, out: Path, variant: str, s: int) -> bool:
    """Copy (``variant``, seed ``s``)'s records from the experiment in ``src`` if it trained
    that very model (data, recipe, seed, left-out samples, attack) and attacked at least the
    splits read here; whether it did."""
    if src is None or not (Path(src) / "experiment.json").exists():
        return False
    other = read_json(Path(src) / "experiment.json")

    def model(e):  # what makes the model: a model's seed depends on ``seed`` and s alone (experiment_seeds)
        return json.dumps([e.get(k) for k in ("fingerprint", "recipe", "seed", "robust_eps", "robust_steps")],
                          sort_keys=True)

    if mine.get("fingerprint") is None or s >= other["seeds"] or model(other) != model(mine):
        return False
    wanted = mine.get("robust_splits", {}).get(variant, [])
    keep = {"train_correct", "test_correct", "device"} | {f"{split}_robust_correct" for split in wanted}
    for w, info in other["variants"].items():
        f = _file(Path(src), w, s)
        if info["excluded"] == mine["variants"][variant]["excluded"] and f.exists() and \
                set(wanted) <= set(other.get("robust_splits", {}).get(w, [])):
            with np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k in keep}
            atomic_write(_file(out, variant, s), lambda fh: np.savez_compressed(fh, **arrays))
            return True
    return False


def load_records(out, variants, seeds: int) -> pd.DataFrame:
    parts = []
    for v in variants:
        for s in range(seeds):
            with np.load(_file(Path(out), v, s), allow_pickle=False) as z:
                for split in ("train", "test"):
                    cols = {"correct": z[f"{split}_correct"]}
                    if f"{split}_robust_correct" in z.files:
                        cols["robust_correct"] = z[f"{split}_robust_correct"]
                    parts.append(pd.DataFrame({"variant": v, "seed": s, "split": split,
                                               "sample_id": np.arange(len(cols["correct"])), **cols}))
    records = pd.concat(parts, ignore_index=True)
    if records.get("robust_correct", pd.Series(dtype=bool)).isna().any():  # a split not attacked: <NA> there
        records["robust_correct"] = records["robust_correct"].astype("boolean")
    return records


COLLAPSED = 0.15  # a model this far below the median model's clean training accuracy did not train


def model_accuracy(records: pd.DataFrame) -> str:
    """Each model's clean (and robust) accuracy on the training set (all of it, the samples a
    variant leaves out included) and on the test set, as a markdown table, and a line naming
    the models more than :data:`COLLAPSED` below the median model on the training set: a model
    that did not train stands out here, where the intervals over seeds only widen."""
    rec = records.copy()
    if "robust_correct" in rec.columns:
        rec["robust_correct"] = rec["robust_correct"].astype("Float64")  # <NA> where a split was not attacked
    cols = [c for c in ("correct", "robust_correct") if c in rec.columns]
    acc = rec.groupby(["variant", "seed", "split"], sort=False)[cols].mean().unstack("split")
    head = "| variant | seed | " + " | ".join(f"{'clean' if c == 'correct' else 'robust'} {split} %"
                                              for c, split in acc.columns) + " |"
    lines = [head, "|---|---|" + "---:|" * len(acc.columns)]
    for (v, seed), row in acc.iterrows():
        lines.append(f"| {v} | {seed} | " + " | ".join("-" if pd.isna(x) else f"{100 * x:.1f}" for x in row) + " |")
    fit = acc[("correct", "train")]
    low = fit[fit < fit.median() - COLLAPSED]
    if len(low):
        lines += ["", f"**Did not train** (clean training accuracy more than {100 * COLLAPSED:.0f} points below the "
                      f"median model's {100 * fit.median():.1f} %): "
                      + ", ".join(f"{v} seed {s} ({100 * a:.1f} %)" for (v, s), a in low.items()) + "."]
    return "\n".join(lines) + "\n"


def t_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean of ``values`` (NaN bounds for one value)."""
    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return m, m - half, m + half


def sample_matrix(records: pd.DataFrame, variant: str, column: str, ids, split: str = "test") -> pd.DataFrame:
    """``variant``'s ``column`` (e.g. ``correct``) per seed (rows) and sample (columns, the
    ``ids`` of ``split``): what :func:`contrasts` pairs by seed and sample."""
    r = records[(records["split"] == split) & (records["variant"] == variant) & records["sample_id"].isin(ids)]
    return r.pivot(index="seed", columns="sample_id", values=column).astype(float)


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (monotone, capped at 1)."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.maximum.accumulate(np.minimum(1.0, p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adjusted
    return out


def contrasts(named: dict, confidence: float = 0.95, adjust: bool = False) -> pd.DataFrame:
    """Paired contrasts: ``named`` maps a contrast's name to its per-sample values, (seeds,
    samples) (e.g. correct without minus with some training samples, paired by seed and test
    sample), or to one value per seed (the samples held fixed). Mean, interval over the seeds and
    the samples (:func:`crossed_interval`) and its p-value (:func:`crossed_p`) of each; with
    ``adjust``, Holm-adjusted p-values over the contrasts and intervals at the level of each
    one's Holm step (the i-th smallest p-value of m at 1 - alpha / (m - i + 1))."""
    keys = ("diff", "diff_low", "diff_high")
    values = {name: _per_sample(d) for name, d in named.items()}
    rows = [{"contrast": name, "seeds": len(d), **_interval(d, confidence, keys),
             "p": crossed_p(d) if d.size else float("nan")} for name, d in values.items()]
    table = pd.DataFrame(rows)
    if adjust and len(table):
        alpha, m = 1 - confidence, len(table)
        table["p_holm"] = holm(table["p"].fillna(1.0))
        rank = table["p"].fillna(1.0).rank(method="first").astype(int).to_numpy()
        for i, (name, step) in enumerate(zip(table["contrast"], rank)):
            held = _interval(values[name], 1 - alpha / (m - step + 1), keys)
            table.loc[i, ["diff_low", "diff_high"]] = held["diff_low"], held["diff_high"]
    return table


def _per_sample(d) -> np.ndarray:
    """(seeds, samples) values: a 2-D array as it is, one value per seed as (seeds, 1); seeds
    with no value dropped."""
    d = np.asarray(d, dtype=float)
    d = d[:, None] if d.ndim == 1 else d
    return d[~np.isnan(d).all(1)] if d.size else d.reshape(0, 0)


def _errors(per_seed, each_var, mean_var: float) -> list[tuple[float, float]]:
    """(standard error, degrees of freedom) of the mean of ``per_seed``, by the rule of
    :func:`seeds_and_samples_interval`: seeds and shared samples (Welch-Satterthwaite), and
    with several seeds the seeds alone (its floor)."""
    x = np.asarray(per_seed, dtype=float)
    s = len(x)
    seeds = x.var(ddof=1) / s if s > 1 else 0.0
    shared = max(0.0, mean_var - (np.mean(each_var) - mean_var) / (s - 1)) if s > 1 else mean_var
    total = seeds + shared
    df = total ** 2 / (seeds ** 2 / (s - 1)) if seeds > 0 else np.inf
    return [(np.sqrt(total), df)] + ([(np.sqrt(seeds), s - 1)] if s > 1 else [])


def seeds_and_samples_interval(per_seed, each_var, mean_var: float, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high) around the mean of ``per_seed`` statistics (one per seed) whose uncertainty
    has two sources: which seeds were trained and which test samples were drawn, the same
    samples for every seed. ``each_var``: each seed's statistic's variance over the test samples;
    ``mean_var``: that of their mean over seeds (the samples resampled together). The seeds'
    spread (variance / S, S - 1 degrees of freedom) holds the seeds' own share of the samples'
    noise; ``mean_var`` holds it too, so that share, (mean(each_var) - mean_var) / (S - 1), is
    taken out of ``mean_var`` (as a two-way random-effects ANOVA does), and what is left, the
    samples' shared part, is added: t with Welch-Satterthwaite degrees of freedom, never narrower
    than the t-interval over the seeds alone (Satterthwaite's estimated degrees of freedom alone
    cover 92.7 % with 3 seeds that differ much, with the floor 94.3 %; a hierarchical bootstrap
    73-84 %: ``python benchmarks/interval_coverage.py``). With one seed: the normal interval
    over the samples."""
    mean = float(np.mean(per_seed))
    half = max(float(stats.t.ppf(0.5 + confidence / 2, df) * se) for se, df in _errors(per_seed, each_var, mean_var))
    return mean - half, mean + half


def _sample_vars(d: np.ndarray) -> tuple[list, float]:
    n = d.shape[1]
    var = (lambda v: v.var(ddof=1) / n) if n > 1 else (lambda v: 0.0)
    return [var(r) for r in d], var(d.mean(0))


def crossed_p(values: np.ndarray) -> float:
    """Two-sided p-value of a mean of 0 for ``values`` (seeds, samples), by the rule of
    :func:`crossed_interval` (its interval excludes 0 exactly when p < 1 - confidence); NaN
    where there is no spread at all to test against."""
    d = _per_sample(values)
    errors = [(se, df) for se, df in _errors(d.mean(1), *_sample_vars(d)) if se > 0]
    if not errors:
        return float("nan")
    return max(float(2 * stats.t.sf(abs(d.mean()) / se, df)) for se, df in errors)


def crossed_interval(values: np.ndarray, confidence: float = 0.95, bounds=None) -> tuple[float, float, float]:
    """(mean, low, high) of per-sample values (correct or not, or a paired difference such as
    correct under A minus under B), ``values`` of shape (seeds, samples): every seed scored on
    the same test samples, a crossed design (:func:`seeds_and_samples_interval`, its variances
    analytic). A hierarchical bootstrap (seeds, then each seed's own draw of samples) takes the
    shared samples for independent ones and, with 3-5 seeds, under-covers (``python
    benchmarks/interval_coverage.py`` simulates both). ``bounds``: (low, high) the values'
    mean cannot leave (an accuracy: 0 and 1), where the interval is cut."""
    d = np.asarray(values, dtype=float)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"values must be a non-empty (seeds, samples) array, got shape {d.shape}")
    lo, hi = seeds_and_samples_interval(d.mean(1), *_sample_vars(d), confidence)
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return float(d.mean()), lo, hi


def contrast_markdown(table: pd.DataFrame, note: str = "") -> str:
    cols = "| contrast | seeds | difference (points) | p |" + (" Holm p |" if "p_holm" in table else "")
    lines = [cols, "|---|---:|---|---:|" + ("---:|" if "p_holm" in table else "")]
    for r in table.itertuples(index=False):
        lines.append(f"| {r.contrast} | {r.seeds} | {100 * r.diff:+.2f} ({100 * r.diff_low:+.2f} to {100 * r.diff_high:+.2f}) "
                     f"| {r.p:.3f} |" + (f" {r.p_holm:.3f} |" if "p_holm" in table else ""))
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def summarize(records: pd.DataFrame, groups: dict, split: str = "test", baseline: str | None = None,
              confidence: float = 0.95, metrics: dict | None = None) -> pd.DataFrame:
    """Accuracy per (variant, group, metric): the mean over seeds, and its interval over the
    seeds and the group's samples (:func:`crossed_interval`; one seed: none); with ``baseline``,
    also the difference to that variant, paired by seed and sample (on the seeds both have).
    ``groups``: name -> bool array over the split's sample ids (those a model has no record of
    are left out); ``metrics``: column of ``records`` -> metric name (default: correct -> clean,
    robust_correct -> robust)."""
    rec = records[records["split"] == split]
    metrics = {c: name for c, name in (metrics or {"correct": "clean", "robust_correct": "robust"}).items()
               if c in rec.columns}
    wide = {c: rec.set_index(["variant", "seed", "sample_id"])[c].astype(float).unstack("sample_id") for c in metrics}
    out = []
    for variant in dict.fromkeys(rec["variant"]):
        for group, mask in groups.items():
            ids = np.flatnonzero(np.asarray(mask))
            for column, metric in metrics.items():
                w = wide[column]
                acc = w.loc[variant, np.intersect1d(ids, w.columns)].dropna(axis=1)
                row = {"variant": variant, "group": group, "metric": metric, "n": len(ids), "seeds": len(acc),
                       **_interval(acc.to_numpy(), confidence, ("accuracy", "ci_low", "ci_high"), (0, 1))}
                if baseline is not None:
                    base = w.loc[baseline, acc.columns] if baseline in w.index.get_level_values(0) else acc.iloc[:0]
                    both = acc.index.intersection(base.index)
                    row.update(_interval(acc.loc[both].to_numpy() - base.loc[both].to_numpy(), confidence,
                                         ("diff", "diff_low", "diff_high"), (-1, 1)))
                out.append(row)
    return pd.DataFrame(out)


def _interval(d: np.ndarray, confidence: float, keys, bounds=None) -> dict:
    """{mean, low, high} of :func:`crossed_interval` under ``keys``; one seed: no interval; none: NaN."""
    if not d.size:
        return dict.fromkeys(keys, np.nan)
    mean, lo, hi = crossed_interval(d, confidence, bounds) if len(d) > 1 else (float(d.mean()), np.nan, np.nan)
    return dict(zip(keys, (mean, lo, hi)))


def markdown(table: pd.DataFrame, percent: bool = True) -> str:
    """The summary as a markdown table: accuracy (and difference) with their intervals."""
    f = (lambda v: f"{100 * v:.1f}") if percent else (lambda v: f"{v:.3f}")  # noqa: E731
    has_diff = "diff" in table.columns
    head = "| variant | group | metric | n | seeds | accuracy % (95 % CI) |" + (" vs baseline, points (95 % CI) |"
                                                                             if has_diff else "")
    lines = [head, "|" + "---|" * (7 if has_diff else 6)]
    for r in table.itertuples():
        ci = f"{f(r.accuracy)} ({f(r.ci_low)} to {f(r.ci_high)})"
        line = f"| {r.variant} | {r.group} | {r.metric} | {r.n} | {r.seeds} | {ci} |"
        if has_diff:  # rows without a baseline (the training-set ones) have no difference
            line += " - |" if pd.isna(r.diff) else f" {f(r.diff):>5} ({f(r.diff_low)} to {f(r.diff_high)}) |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def bar_panels(table: pd.DataFrame, path, title: str, panels: dict, ylabel: str = "accuracy (%)") -> Path:
    """One panel per entry of ``panels`` (panel title -> the rows of ``table`` it shows):
    accuracy per group (x) and variant (bars) with the confidence intervals."""
    import matplotlib.pyplot as plt

    most = max(p["group"].nunique() for p in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.0, 0.6 + 1.1 * most * len(panels)), 3.6), sharey=True,
                             squeeze=False)
    for ax, (name, p) in zip(axes[0], panels.items()):
        groups, variants = list(dict.fromkeys(p["group"])), list(dict.fromkeys(p["variant"]))
        width = 0.8 / max(1, len(variants))
        for i, v in enumerate(variants):
            r = p[p["variant"] == v].set_index("group").reindex(groups)
            xs = np.arange(len(groups)) + (i - (len(variants) - 1) / 2) * width
            err = np.nan_to_num(np.vstack([r["accuracy"] - r["ci_low"], r["ci_high"] - r["accuracy"]]) * 100)
            ax.bar(xs, 100 * r["accuracy"], width, yerr=err, capsize=2, label=v)
        ax.set_xticks(np.arange(len(groups)), [textwrap.fill(g, 14) for g in groups], fontsize=8)
        ax.set_title(name, fontsize=9)
    axes[0, 0].set_ylabel(ylabel)
    axes[0, 0].set_ylim(0, 100)  # an interval over 3 seeds may run past 0 or 100 %: it is cut at the frame
    axes[0, 0].legend(frameon=False, fontsize=7)
    fig.suptitle(textwrap.fill(title, int(14 * fig.get_figwidth())), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
