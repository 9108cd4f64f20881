"""Scores at a fraction of the compute: a few subsampling trials calibrate the one-run proxies.

A subsampling estimate from T trials is unbiased but noisy (mem_se ~ 0.1 at T = 64); the
proxies (:mod:`memtool.proxies`) are precise but on no absolute scale. Regressing the noisy
estimate on the proxies estimates the prior E[mem | proxies], on mem's own scale (cross-fitted:
each sample's prior comes from a model fitted without it). The hybrid is the empirical-Bayes
combination of the two: ``prior + tau^2 / (tau^2 + se^2) * (noisy - prior)``, where se is the
noisy estimate's standard error and tau^2 the spread of the truth around the prior (the
residual variance minus the mean se^2, per decile of the prior). A sample whose own trials
say little keeps the prior; one they pin down keeps its own estimate.

Pairs: TracIn's cosine between a training and a test sample (``tracin.npz`` of
``memtool proxies``) says how much training on i moves j's loss, relative to i's move of its
own; ``infl_hat(i, j) = mem_hat(i) * cos(i, j)``, and where trials are given, their noisy
infl(i, j) of the candidate pairs is shrunk the same way towards a prior regressed on
(infl_hat, cos, the cosine's rank among the test sample's candidates, mem_hat). High pairs are then called with the run's thresholds, like the estimator's.

    memtool proxies ... --calibrate RUN     # RUN: a few-trial `memtool estimate` run of the same data
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.model_selection import KFold

from .estimator.scores import INFL_THRESHOLD, MEM_THRESHOLD, at_least, influence_at, memorization
from .recorder import PROXIES
from .rundir import read_json, write_json, write_table

FOLDS = 5


def cross_fit(features: np.ndarray, target: np.ndarray, seed: int = 0) -> np.ndarray:
    """E[target | features] by gradient-boosted trees, each row predicted by the model fitted
    on the other folds (rows with a NaN target are predicted, never fitted on)."""
    features = np.asarray(features, dtype=np.float64).reshape(len(target), -1)
    known = np.flatnonzero(np.isfinite(target))
    pred = np.empty(len(target))
    unknown = np.flatnonzero(~np.isfinite(target))
    folds = KFold(FOLDS, shuffle=True, random_state=seed).split(known)
    models = []
    for fit_rows, held in folds:
        m = HistGradientBoostingRegressor(max_iter=200, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=40,
                                          random_state=seed)
        m.fit(features[known[fit_rows]], target[known[fit_rows]])
        pred[known[held]] = m.predict(features[known[held]])
        models.append(m)
    if len(unknown):
        pred[unknown] = np.mean([m.predict(features[unknown]) for m in models], axis=0)
    return pred


def shrink(noisy: np.ndarray, se: np.ndarray, prior: np.ndarray, bins: int = 10) -> np.ndarray:
    """The empirical-Bayes posterior mean of each value given its noisy estimate (standard
    error ``se``) and its prior mean; the prior's spread tau^2 is estimated per quantile bin of
    the prior. Where there is no estimate (NaN) the prior stands."""
    noisy, se, prior = (np.asarray(v, dtype=np.float64) for v in (noisy, se, prior))
    ok = np.isfinite(noisy) & np.isfinite(se)
    out = prior.copy()
    edges = np.unique(np.quantile(prior[ok], np.linspace(0, 1, bins + 1))) if ok.any() else np.array([0.0])
    which = np.clip(np.searchsorted(edges, prior, side="right") - 1, 0, max(len(edges) - 2, 0))
    for b in np.unique(which[ok]):
        rows = ok & (which == b)
        tau2 = max(float(np.mean((noisy[rows] - prior[rows]) ** 2) - np.mean(se[rows] ** 2)), 1e-6)
        out[rows] = prior[rows] + tau2 / (tau2 + se[rows] ** 2) * (noisy[rows] - prior[rows])
    return out


def calibrated_mem(noisy_mem: np.ndarray, mem_se: np.ndarray, proxies: pd.DataFrame) -> np.ndarray:
    """mem from a noisy subsampling estimate (and its standard error) and the proxies: the
    proxies' cross-fitted prior, shrunk towards the estimate as far as its precision allows."""
    noisy = np.asarray(noisy_mem, dtype=np.float64)
    return shrink(noisy, mem_se, cross_fit(proxies.to_numpy(dtype=np.float64), noisy))


def tracin_pairs(tracin: dict, mem_hat: np.ndarray, mem_threshold: float = MEM_THRESHOLD, min_cos: float = 0.0) -> pd.DataFrame:
    """The candidate pairs: same class, mem_hat(i) >= ``mem_threshold``, cos(i, j) > ``min_cos``;
    with ``infl_hat = mem_hat(i) * cos(i, j)``."""
    ytr, yte = tracin["train_label"], tracin["test_label"]
    parts = []
    for c in range(int(max(ytr.max(), yte.max())) + 1):
        a, b = np.flatnonzero(ytr == c), np.flatnonzero(yte == c)
        rows = np.flatnonzero(at_least(mem_hat[a], mem_threshold))
        if f"cos_{c}" not in tracin or not len(rows):
            continue
        cos = tracin[f"cos_{c}"][rows].astype(np.float64)
        r, col = np.nonzero(cos > min_cos)
        parts.append(pd.DataFrame({"train_id": a[rows[r]], "test_id": b[col], "cos": cos[r, col]}))
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"train_id": [], "test_id": [], "cos": []})
    df["mem"] = mem_hat[df["train_id"].to_numpy(dtype=np.int64)]
    df["infl_hat"] = df["mem"] * df["cos"]
    return df


def cheap_influence(tracin: dict, mem_hat: np.ndarray, trials=None, mem_threshold: float = MEM_THRESHOLD,
                    infl_threshold: float = INFL_THRESHOLD) -> pd.DataFrame:
    """An influence table (train_id, test_id, train_label, test_label, mem, infl, high, ...) from
    TracIn and mem_hat; with ``trials`` (:class:`memtool.estimator.Trials` of the same data), infl
    is the trials' noisy infl shrunk towards its prior from (infl_hat, cos, cos rank among the
    test sample's candidates, mem_hat), as :func:`calibrated_mem` does for mem."""
    df = tracin_pairs(tracin, mem_hat, mem_threshold)
    i, j = df["train_id"].to_numpy(dtype=np.int64), df["test_id"].to_numpy(dtype=np.int64)
    if trials is not None and len(df):
        noisy, se = influence_at(trials.member, trials.test_correct, i, j)
        df["infl_subsampled"] = noisy
        df["cos_rank"] = df.groupby("test_id")["cos"].rank(ascending=False, method="first")
        prior = cross_fit(df[["infl_hat", "cos", "cos_rank", "mem"]].to_numpy(), noisy)
        df["infl"] = shrink(noisy, se, prior)
    else:
        df["infl"] = df["infl_hat"]
    df.insert(2, "train_label", tracin["train_label"][i])
    df.insert(3, "test_label", tracin["test_label"][j])
    df["high"] = at_least(df["infl"].to_numpy(), infl_threshold)
    return df.sort_values(["test_id", "train_id"], ignore_index=True)


def hybrid_tables(trials, proxy_table: pd.DataFrame, tracin: dict | None, mem_threshold: float = MEM_THRESHOLD,
                  infl_threshold: float = INFL_THRESHOLD) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(score table, influence table) of the hybrid: ``proxy_table``'s columns plus ``mem``
    calibrated on ``trials`` (kept as ``mem_subsampled``), and the pairs of
    :func:`cheap_influence` when ``tracin`` is given."""
    m = memorization(trials.member, trials.train_correct)
    noisy = m["mem"]
    table = proxy_table.copy()
    train = (table["split"] == "train").to_numpy()
    feats = table.loc[train, list(PROXIES)].reset_index(drop=True)
    mem_hat = calibrated_mem(noisy, m["mem_se"], feats)
    table["mem_subsampled"], table["mem"] = np.nan, np.nan
    table.loc[train, "mem_subsampled"], table.loc[train, "mem"] = noisy, mem_hat
    infl = None if tracin is None else cheap_influence(tracin, mem_hat, trials, mem_threshold, infl_threshold)
    return table, infl


def write_hybrid_run(dest, calibration_run, table: pd.DataFrame, infl: pd.DataFrame | None, info: dict,
                     mem_threshold: float = MEM_THRESHOLD, infl_threshold: float = INFL_THRESHOLD) -> Path:
    """``dest`` as a run directory that every stage reads like an estimator run: the
    calibration run's run.json (its config and recipe: what `memtool validate` retrains) and
    labels, and the hybrid tables."""
    dest, calibration_run = Path(dest), Path(calibration_run)
    dest.mkdir(parents=True, exist_ok=True)
    meta = read_json(calibration_run / "run.json")
    shutil.copyfile(calibration_run / "labels.npz", dest / "labels.npz")
    tr = table[table["split"] == "train"]
    summary = {"kind": "hybrid", **info, "n_train": int(len(tr)), "n_high_mem": int(at_least(tr["mem"], mem_threshold).sum()),
               "n_high_pairs": 0 if infl is None else int(infl["high"].sum())}
    write_json(dest / "run.json", {**meta, "summary": summary, "hybrid": info})
    table_meta = {"config": meta["config"], "dataset": meta["dataset"], "summary": summary,
                  "thresholds": {"mem": mem_threshold, "infl": infl_threshold, "top_k": 0}}
    write_table(table, dest / "scores.parquet", table_meta)
    if infl is not None:
        write_table(infl, dest / "influence.parquet", table_meta)
    return dest


def load_tracin(path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "tracin.npz"
    if not path.exists():
        raise FileNotFoundError(f"no TracIn similarities at {path}: run `memtool proxies` with --pairs")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
