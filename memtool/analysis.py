"""Typical and atypical samples (PAPER.md section 2), and accuracy per group with intervals.

    scores, infl = memtool.load_scores(run), memtool.load_influence(run)
    atypical = atypical_test(scores, infl)                 # bool Series over test sample ids
    accuracy_by_group(pd.read_parquet("eval/per_sample.parquet"), atypical)

- Atypical training sample: mem >= ``mem_threshold`` (0.25; ties up to rounding count, see
  ``at_least``). No estimate (NaN) is typical.
- Atypical test sample: in a high-influence pair with an atypical training sample of its
  class (infl >= ``infl_threshold``, 0.15). The influence table keeps only pairs above the
  thresholds the run's tables were computed with, so stricter thresholds filter it and looser
  ones are refused (recompute the tables with ``memtool scores RUN --mem-threshold ...``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from .estimator.scores import at_least


def _split(scores: pd.DataFrame, split: str) -> pd.DataFrame:
    return scores[scores["split"] == split].set_index("sample_id")


def atypical_train(scores: pd.DataFrame, mem_threshold: float = 0.25) -> pd.Series:
    """Whether each training sample is atypical (mem >= ``mem_threshold``), by sample_id."""
    from .bat import require_mem

    require_mem(scores, "given")
    mem = _split(scores, "train")["mem"]
    return pd.Series(at_least(mem, mem_threshold), index=mem.index, name="atypical")  # NaN: typical


def atypical_test(scores: pd.DataFrame, influence: pd.DataFrame, mem_threshold: float = 0.25,
                  infl_threshold: float = 0.15) -> pd.Series:
    """Whether each test sample is atypical: in a same-class pair (i, j) with mem(i) >=
    ``mem_threshold`` and infl(i, j) >= ``infl_threshold``. By sample_id."""
    stored = influence.attrs.get("memtool", {}).get("thresholds")
    if stored and (mem_threshold < stored["mem"] or infl_threshold < stored["infl"]):
        raise ValueError(
            f"the influence table holds the pairs with mem >= {stored['mem']} and infl >= {stored['infl']}; "
            f"for mem_threshold={mem_threshold}, infl_threshold={infl_threshold} recompute it: "
            f"memtool scores RUN --mem-threshold {mem_threshold} --infl-threshold {infl_threshold}")
    pairs = influence[at_least(influence["mem"], mem_threshold) & at_least(influence["infl"], infl_threshold)
                      & (influence["train_label"] == influence["test_label"])]
    test_ids = _split(scores, "test").index
    return pd.Series(test_ids.isin(pairs["test_id"].unique()), index=test_ids, name="atypical")


def wilson_interval(k, n, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of the proportion k / n (NaN where n = 0)."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    z = stats.norm.ppf(0.5 + confidence / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = k / n
        center = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return center - half, center + half


def accuracy_by_group(per_sample: pd.DataFrame, atypical: pd.Series, columns=None,
                      confidence: float = 0.95) -> pd.DataFrame:
    """Accuracy of every correctness column of ``per_sample`` (an evaluation's per_sample
    table: sample_id and bool columns) on the atypical and the typical samples, with Wilson
    intervals. One row per (column, group): n, n_correct, accuracy, ci_low, ci_high."""
    columns = columns or [c for c in per_sample.columns if per_sample[c].dtype == bool]
    unknown = ~per_sample["sample_id"].isin(atypical.index)
    if unknown.any():
        raise ValueError(f"{int(unknown.sum())} sample ids of the per-sample table (first: "
                         f"{int(per_sample.loc[unknown, 'sample_id'].iloc[0])}) have no typical/atypical label; "
                         "are both from the same dataset and split?")
    group = np.where(atypical.loc[per_sample["sample_id"]].to_numpy(), "atypical", "typical")
    rows = []
    for col in columns:
        for name in ("atypical", "typical"):
            ok = per_sample.loc[group == name, col].to_numpy()
            k, n = int(ok.sum()), len(ok)
            lo, hi = wilson_interval(k, n, confidence)
            rows.append({"column": col, "group": name, "n": n, "n_correct": k,
                         "accuracy": k / n if n else float("nan"), "ci_low": float(lo), "ci_high": float(hi)})
    return pd.DataFrame(rows)
