"""Score formulas (PAPER.md section 1), as pure functions of the trial arrays.

For training sample i, with ``member[t, i]`` saying whether trial t trained on it:

    acc_in(i)  = mean of correct[t, i] over trials containing i        (n_in of them)
    acc_out(i) = mean of correct[t, i] over trials not containing i    (n_out of them)
    mem(i)     = acc_in(i) - acc_out(i)
    infl(i, j) = the same difference of test sample j's correctness

A sample never held out (n_out = 0) or never included (n_in = 0) has no estimate: NaN.
Standard errors of a difference of two proportions use the Agresti-Caffo adjustment
(one success and one failure added to each side), so a sample that is always right still
gets a non-zero error:  se = sqrt(p1(1-p1)/(n1+2) + p2(1-p2)/(n2+2)),  p = (k+1)/(n+2).
Margin-based memorization is the same difference of mean margins, with the Welch error.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.maximum(b, 1), np.nan)


def agresti_caffo_se(k_in, n_in, k_out, n_out):
    p1, p2 = (k_in + 1) / (n_in + 2), (k_out + 1) / (n_out + 2)
    se = np.sqrt(p1 * (1 - p1) / (n_in + 2) + p2 * (1 - p2) / (n_out + 2))
    return np.where((n_in > 0) & (n_out > 0), se, np.nan)


def memorization(member: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """n_in, n_out, acc_in, acc_out, mem, mem_se for every column of (t, n) arrays."""
    m = member.astype(np.float64)
    c = correct.astype(np.float64)
    n_in = m.sum(0)
    n_out = len(m) - n_in
    k_in = (m * c).sum(0)
    k_out = c.sum(0) - k_in
    acc_in, acc_out = _div(k_in, n_in), _div(k_out, n_out)
    return {"n_in": n_in.astype(np.int64), "n_out": n_out.astype(np.int64), "acc_in": acc_in,
            "acc_out": acc_out, "mem": acc_in - acc_out, "mem_se": agresti_caffo_se(k_in, n_in, k_out, n_out)}


def margin_memorization(member: np.ndarray, margin: np.ndarray) -> dict[str, np.ndarray]:
    """margin_in, margin_out, margin_mem and its Welch standard error (NaN with < 2 on a side)."""
    m = member.astype(np.float64)
    x = margin.astype(np.float64)
    n_in = m.sum(0)
    n_out = len(m) - n_in
    s_in, s_out = (m * x).sum(0), ((1 - m) * x).sum(0)
    q_in, q_out = (m * x * x).sum(0), ((1 - m) * x * x).sum(0)
    mu_in, mu_out = _div(s_in, n_in), _div(s_out, n_out)
    var_in = _div(q_in - n_in * mu_in**2, n_in - 1)
    var_out = _div(q_out - n_out * mu_out**2, n_out - 1)
    se = np.sqrt(np.maximum(var_in, 0) / n_in + np.maximum(var_out, 0) / n_out)
    return {"margin_in": mu_in, "margin_out": mu_out, "margin_mem": mu_in - mu_out,
            "margin_mem_se": np.where((n_in > 1) & (n_out > 1), se, np.nan)}


def influence_chunks(member: np.ndarray, test_correct: np.ndarray, chunk: int | None = None,
                     max_bytes: int = 256 << 20):
    """Yield (test column slice, k_in (n_train, c)) chunk by chunk: k_in[i, j] counts the
    trials that contain i and classify j correctly. One matrix product of the (t, n_train)
    mask with (t, c) test columns; the dense n_train x n_test matrix is never held at once
    (each chunk stays under ``max_bytes``). :func:`influence_from_counts` turns it into infl."""
    m = member.astype(np.float32)
    n_test = test_correct.shape[1]
    chunk = chunk or max(1, min(n_test, max_bytes // (4 * 4 * max(member.shape[1], 1))))
    for start in range(0, n_test, chunk):
        sl = slice(start, min(start + chunk, n_test))
        yield sl, m.T @ test_correct[:, sl].astype(np.float32)


def influence_from_counts(k_in, n_in, col_correct, n_trials, with_se=False):
    """infl (and its Agresti-Caffo se) from k_in and the column totals of correct test samples.

    Broadcasts: k_in (..., c) with n_in (...,1 or matching) and col_correct (c or matching)."""
    n_out = n_trials - n_in
    k_out = col_correct - k_in
    infl = _div(k_in, n_in) - _div(k_out, n_out)
    return (infl, agresti_caffo_se(k_in, n_in, k_out, n_out)) if with_se else infl


def influence_pairs(member, test_correct, train_label, test_label, mem, mem_threshold=0.25,
                    infl_threshold=0.15, top_k=10, chunk=None):
    """High-influence pairs and each test sample's top-k most influential training samples.

    Returns a dict of 1-d arrays (one entry per pair), the union of
    - ``high``: same class, mem(i) >= mem_threshold and infl(i, j) >= infl_threshold;
    - ``rank`` in 0..top_k-1: position among test sample j's top-k by influence (-1: not in it).
    """
    cols = {k: [] for k in ("train_id", "test_id", "infl", "infl_se", "high", "rank")}
    high_mem = np.nan_to_num(mem, nan=-np.inf) >= mem_threshold
    n_in = member.sum(0).astype(np.float32)[:, None]
    col_correct = test_correct.sum(0).astype(np.float32)
    t = np.float32(len(member))
    for sl, k_in in influence_chunks(member, test_correct, chunk):
        test_ids = np.arange(sl.start, sl.stop)
        score = np.nan_to_num(influence_from_counts(k_in, n_in, col_correct[sl], t), nan=-np.inf)
        same = train_label[:, None] == test_label[None, sl]
        high = same & high_mem[:, None] & (score >= infl_threshold)
        rank = np.full(score.shape, -1, dtype=np.int64)
        if top_k:
            k = min(top_k, score.shape[0])
            top = np.argpartition(-score, k - 1, axis=0)[:k]
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(score, top, 0), axis=0, kind="stable"), 0)
            np.put_along_axis(rank, top, np.arange(k)[:, None].repeat(len(test_ids), 1), axis=0)
        i, j = np.nonzero(high | (rank >= 0))
        infl, se = influence_from_counts(k_in[i, j].astype(np.float64), n_in[i, 0].astype(np.float64),
                                         col_correct[sl][j].astype(np.float64), len(member), with_se=True)
        cols["train_id"].append(i)
        cols["test_id"].append(test_ids[j])
        cols["infl"].append(infl)
        cols["infl_se"].append(se)
        cols["high"].append(high[i, j])
        cols["rank"].append(rank[i, j])
    return {k: np.concatenate(v) for k, v in cols.items()}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if (a or b) else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(stats.spearmanr(a[ok], b[ok]).statistic) if ok.sum() > 2 else float("nan")


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (NaN scores left out)."""
    ok = np.isfinite(score)
    s, y = score[ok], positive[ok].astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s))
