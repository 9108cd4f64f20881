"""`memtool compare A B`: how well score table B agrees with score table A on the same data.

    compare("runs/mnist/estimate", "runs/px", column_b="csl")

A and B are run directories (their scores.parquet, and influence.parquet where there is one)
or score-table files. Over the training samples where both columns are finite it reports
Spearman and Pearson; for A's high-memorization set (``column_a`` >= ``mem_threshold``, k
samples) the AUROC of B's column and its precision at k (the share of B's k highest that are
in A's set); with planted label noise, each column's AUROC for the flipped samples; and where
both have an influence table, the precision and recall of B's high-influence pairs against
A's and the Jaccard of the two sets of atypical test samples (test samples in a pair).
Tables of other data are refused, naming the difference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .estimator.scores import MEM_THRESHOLD, at_least, auroc, jaccard
from .rundir import read_table


def _open(source) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    path = Path(source)
    if path.is_dir():
        scores, infl = path / "scores.parquet", path / "influence.parquet"
    else:
        scores, infl = path, path.with_name("influence.parquet")
    if not scores.exists():
        hint = (f": its trials are there, run `memtool scores {path}` first" if path.is_dir() and (path / "trials").is_dir()
                else " (give a run directory or a scores .parquet file)")
        raise FileNotFoundError(f"no score table at {scores}{hint}")
    return read_table(scores), (read_table(infl) if infl.exists() else None), str(source)


def _train(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["split"] == "train"].sort_values("sample_id")


def check_same_data(a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str) -> None:
    """Refuse two score tables of different data: dataset fingerprint where both record one,
    else the training samples' count and labels."""
    fa, fb = ((t.attrs.get("memtool", {}).get("dataset") or {}).get("fingerprint") for t in (a, b))
    if fa and fb and fa != fb:
        raise ValueError(f"{name_a} and {name_b} belong to other data: dataset fingerprints {fa} and {fb} "
                         "(dataset, limit or label noise differ)")
    ta, tb = _train(a), _train(b)
    if len(ta) != len(tb):
        raise ValueError(f"{name_a} has {len(ta)} training samples, {name_b} has {len(tb)}: other data")
    wrong = np.flatnonzero(ta["label"].to_numpy() != tb["label"].to_numpy())
    if len(wrong):
        raise ValueError(f"{name_a} and {name_b}: {len(wrong)} training labels differ (first at sample "
                         f"{ta['sample_id'].iloc[wrong[0]]}): other data")


def _column(table, column, name) -> np.ndarray:
    if column not in table.columns:
        raise ValueError(f"{name} has no column {column!r} (score columns: "
                         f"{[c for c in table.columns if table[c].dtype.kind == 'f']})")
    return _train(table)[column].to_numpy(dtype=np.float64)


def high_pairs(infl: pd.DataFrame) -> set:
    """The (train_id, test_id) pairs an influence table calls high."""
    h = infl[infl["high"]]
    return set(zip(h["train_id"].tolist(), h["test_id"].tolist()))


def agreement(a: np.ndarray, b: np.ndarray, high: np.ndarray) -> dict:
    """Spearman, Pearson, and how well ``b`` finds the samples ``high`` (a bool mask):
    AUROC and precision at k = high.sum() (NaN values of ``b`` rank last)."""
    ok = np.isfinite(a) & np.isfinite(b)
    k = int(high.sum())
    order = np.argsort(-np.nan_to_num(b, nan=-np.inf), kind="stable")
    return {"n": int(ok.sum()), "spearman": float(stats.spearmanr(a[ok], b[ok]).statistic),
            "pearson": float(stats.pearsonr(a[ok], b[ok]).statistic), "k": k,
            "auroc_high": auroc(np.nan_to_num(b, nan=-np.inf), high) if 0 < k < len(b) else float("nan"),
            "precision_at_k": float(high[order[:k]].mean()) if k else float("nan")}


def pair_agreement(pairs_a: set, pairs_b: set) -> dict:
    """Precision and recall of B's pairs against A's, their Jaccard, and the Jaccard of the
    test samples they name (the atypical test sets)."""
    both = len(pairs_a & pairs_b)
    tests_a, tests_b = {j for _, j in pairs_a}, {j for _, j in pairs_b}
    return {"n_pairs_a": len(pairs_a), "n_pairs_b": len(pairs_b),
            "pairs_precision": both / len(pairs_b) if pairs_b else float("nan"),
            "pairs_recall": both / len(pairs_a) if pairs_a else float("nan"),
            "pairs_jaccard": jaccard(pairs_a, pairs_b), "atypical_test_jaccard": jaccard(tests_a, tests_b)}


def compare(a, b, column_a: str = "mem", column_b: str | None = None, mem_threshold: float = MEM_THRESHOLD) -> dict:
    """Agreement of B (``column_b``, default ``column_a``) with A (see the module docstring)."""
    (ta, ia, na), (tb, ib, nb) = _open(a), _open(b)
    check_same_data(ta, tb, na, nb)
    column_b = column_b or column_a
    xa, xb = _column(ta, column_a, na), _column(tb, column_b, nb)
    out = {"a": na, "b": nb, "column_a": column_a, "column_b": column_b, "mem_threshold": mem_threshold,
           **agreement(xa, xb, at_least(xa, mem_threshold))}
    flipped = _train(ta)["label_corrupted"].to_numpy(dtype=bool)
    if flipped.any():
        out["noise_auroc_a"], out["noise_auroc_b"] = auroc(xa, flipped), auroc(xb, flipped)
    if ia is not None and ib is not None:
        out.update(pair_agreement(high_pairs(ia), high_pairs(ib)))
    return out


def format_comparison(r: dict) -> str:
    lines = [f"A: {r['a']} [{r['column_a']}]   B: {r['b']} [{r['column_b']}]   ({r['n']} training samples)",
             f"Spearman {r['spearman']:.3f}   Pearson {r['pearson']:.3f}",
             f"A's high set ({r['column_a']} >= {r['mem_threshold']}: {r['k']} samples): AUROC of B "
             f"{r['auroc_high']:.3f}, precision at {r['k']} {r['precision_at_k']:.3f}"]
    if "noise_auroc_a" in r:
        lines.append(f"planted label noise: AUROC of A {r['noise_auroc_a']:.3f}, of B {r['noise_auroc_b']:.3f}")
    if "pairs_jaccard" in r:
        lines.append(f"high-influence pairs: A {r['n_pairs_a']}, B {r['n_pairs_b']}; B's precision "
                     f"{r['pairs_precision']:.3f}, recall {r['pairs_recall']:.3f}, Jaccard {r['pairs_jaccard']:.3f}; "
                     f"atypical test samples Jaccard {r['atypical_test_jaccard']:.3f}")
    return "\n".join(lines)
