"""Score formulas (docs/science.md section 1), as pure functions of the trial arrays.

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
Influence is never held as a dense n_train x n_test matrix: :func:`influence_pairs` works on
blocks of test samples and keeps the pairs it reports.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

MEM_THRESHOLD = 0.25  # high memorization: mem >= this (docs/science.md section 1)
INFL_THRESHOLD = 0.15  # high influence: infl >= this


def at_least(x, threshold: float):
    """``x >= threshold`` that also holds for values equal to it up to rounding (the infl
    1/4 - 1/10 computes as 0.15, but 3/5 - 9/20 as 0.14999999999999997 and 7/10 - 11/20 as
    0.1499999999999999); NaN is False. Every threshold on mem and infl goes through it."""
    return np.nan_to_num(np.asarray(x, dtype=np.float64), nan=-np.inf) >= threshold - 1e-9


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.maximum(b, 1), np.nan)


def rate_difference(k_in, n_in, k_out, n_out):
    """k_in / n_in - k_out / n_out as one division of exact integers, so that equal rationals
    are equal floats (ties stay ties); NaN where a side has no trials."""
    k_in, n_in, k_out, n_out = (np.asarray(v, dtype=np.float64) for v in (k_in, n_in, k_out, n_out))
    den = n_in * n_out
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (k_in * n_out - k_out * n_in) / np.where(den > 0, den, 1), np.nan)


def agresti_caffo_se(k_in, n_in, k_out, n_out):
    p1, p2 = (k_in + 1) / (n_in + 2), (k_out + 1) / (n_out + 2)
    se = np.sqrt(p1 * (1 - p1) / (n_in + 2) + p2 * (1 - p2) / (n_out + 2))
    return np.where((n_in > 0) & (n_out > 0), se, np.nan)


def _column_blocks(shape, bytes_per_cell: int = 8, budget: int = 64 << 20):
    """Slices over the columns of a (t, n) array so that a float64 temporary of one block
    stays within ``budget`` bytes: the scores of t = 4000 models on n = 50,000 samples never
    hold a full float copy of the trial matrices."""
    t, n = shape
    step = max(1, budget // (bytes_per_cell * max(t, 1)))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def memorization(member: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """n_in, n_out, acc_in, acc_out, mem, mem_se for every column of (t, n) bool arrays."""
    n_in = member.sum(0, dtype=np.int64)
    n_out = len(member) - n_in
    k_in = np.empty(member.shape[1], np.int64)
    for b in _column_blocks(member.shape, 1):
        k_in[b] = (member[:, b] & correct[:, b]).sum(0, dtype=np.int64)
    k_out = correct.sum(0, dtype=np.int64) - k_in
    acc_in, acc_out = _div(k_in, n_in), _div(k_out, n_out)
    return {"n_in": n_in, "n_out": n_out, "acc_in": acc_in,
            "acc_out": acc_out, "mem": rate_difference(k_in, n_in, k_out, n_out),
            "mem_se": agresti_caffo_se(k_in, n_in, k_out, n_out)}


def margin_memorization(member: np.ndarray, margin: np.ndarray) -> dict[str, np.ndarray]:
    """margin_in, margin_out, margin_mem and its Welch standard error (NaN with < 2 on a side)."""
    n_in = member.sum(0, dtype=np.int64).astype(np.float64)
    n_out = len(member) - n_in
    s_in, s_out, q_in, q_out = (np.empty(member.shape[1]) for _ in range(4))
    for b in _column_blocks(member.shape):
        m, x = member[:, b], margin[:, b].astype(np.float64)
        xin = np.where(m, x, 0.0)
        s_in[b], q_in[b] = xin.sum(0), (xin * xin).sum(0)
        x -= xin  # the held-out margins
        s_out[b], q_out[b] = x.sum(0), (x * x).sum(0)
    mu_in, mu_out = _div(s_in, n_in), _div(s_out, n_out)
    var_in = _div(q_in - n_in * mu_in**2, n_in - 1)
    var_out = _div(q_out - n_out * mu_out**2, n_out - 1)
    se = np.sqrt(np.maximum(var_in, 0) / n_in + np.maximum(var_out, 0) / n_out)
    return {"margin_in": mu_in, "margin_out": mu_out, "margin_mem": mu_in - mu_out,
            "margin_mem_se": np.where((n_in > 1) & (n_out > 1), se, np.nan)}


def influence_at(member, correct, i, j, chunk=4096):
    """infl(i, j) and its standard error for explicit pairs (arrays i, j)."""
    if len(i) == 0:
        return np.zeros(0), np.zeros(0)
    n_in, col, t = member.sum(0), correct.sum(0), len(member)
    infl, se = [], []
    for s in range(0, len(i), chunk):
        a, b = i[s:s + chunk], j[s:s + chunk]
        k_in = (member[:, a] & correct[:, b]).sum(0)
        k_out = col[b] - k_in
        infl.append(rate_difference(k_in, n_in[a], k_out, t - n_in[a]))
        se.append(agresti_caffo_se(k_in, n_in[a], k_out, t - n_in[a]))
    return np.concatenate(infl), np.concatenate(se)


def _top_k(score: np.ndarray, k: int) -> np.ndarray:
    """(rows, k) column indices of each row's k largest scores, largest first; ties go to the
    lower index, so the result does not depend on the sort algorithm."""
    n = score.shape[1]
    kth = np.partition(score, n - k, axis=1)[:, n - k, None]
    above, tied = score > kth, score == kth
    need = k - above.sum(1, keepdims=True)
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= need))
    cols = np.nonzero(chosen)[1].reshape(len(score), k)  # row-major: ascending index per row
    order = np.argsort(-np.take_along_axis(score, cols, 1), axis=1, kind="stable")
    return np.take_along_axis(cols, order, 1)


def influence_pairs(member, test_correct, train_label, test_label, mem, mem_threshold=MEM_THRESHOLD,
                    infl_threshold=INFL_THRESHOLD, top_k=10, chunk=None, max_bytes: int = 256 << 20):
    """High-influence pairs and each test sample's top-k most influential training samples.

    Returns a dict of 1-d arrays (one entry per pair, ordered by test_id, then train_id), the
    union of
    - ``high``: same class, mem(i) >= mem_threshold and infl(i, j) >= infl_threshold;
    - ``rank`` in 0..top_k-1: position among test sample j's top-k by influence (-1: not in it;
      ties go to the lower train_id).
    Works on blocks of test samples; with ``top_k = 0`` only the high-mem training samples'
    columns are computed."""
    t, n_train = member.shape
    n_in = member.sum(0, dtype=np.int64)
    high_mem = np.flatnonzero(at_least(mem, mem_threshold))
    cand = np.arange(n_train) if top_k else high_mem  # training samples that need scores
    m_cand = (member if top_k else member[:, cand]).astype(np.float32)
    n_in_c = n_in[cand].astype(np.float64)
    n_out_c = t - n_in_c
    den = n_in_c * n_out_c
    invalid = np.flatnonzero(den == 0)  # never held out or never included: no estimate
    den[invalid] = 1
    high_cols = np.flatnonzero(np.isin(cand, high_mem))  # positions in cand
    n_test = test_correct.shape[1]
    chunk = chunk or max(1, min(n_test, max_bytes // (8 * 4 * max(len(cand), 1))))
    keys, high_flags, ranks = [], [], []
    for start in range(0, n_test, chunk):
        tc = test_correct[:, start:start + chunk].astype(np.float32)
        k_in = (tc.T @ m_cand).astype(np.float64)  # (tests, candidates); exact counts
        # rate_difference(k_in, n_in, k_out, n_out) without its NaN handling (done by `invalid`)
        score = (k_in * n_out_c - (tc.sum(0)[:, None] - k_in) * n_in_c) / den
        score[:, invalid] = -np.inf
        same = test_label[start:start + chunk, None] == train_label[cand[high_cols]][None, :]
        hj, hh = np.nonzero(same & (score[:, high_cols] >= infl_threshold - 1e-9))  # = at_least
        hi = high_cols[hh]
        parts = [(hj, hi, np.ones(len(hj), bool), np.full(len(hj), -1))]
        if top_k:
            k = min(top_k, len(cand))
            top = _top_k(score, k)
            parts.append((np.repeat(np.arange(len(top)), k), top.ravel(), np.zeros(top.size, bool),
                          np.tile(np.arange(k), len(top))))
        j = np.concatenate([p[0] for p in parts]) + start
        i = cand[np.concatenate([p[1] for p in parts])]
        keys.append(j.astype(np.int64) * n_train + i)
        high_flags.append(np.concatenate([p[2] for p in parts]))
        ranks.append(np.concatenate([p[3] for p in parts]))
    keys, high_flags, ranks = map(np.concatenate, (keys, high_flags, ranks))
    uniq, inv = np.unique(keys, return_inverse=True)
    high = np.zeros(len(uniq), bool)
    np.logical_or.at(high, inv, high_flags)
    rank = np.full(len(uniq), -1, np.int64)
    np.maximum.at(rank, inv, ranks)
    test_id, train_id = np.divmod(uniq, n_train)
    infl, se = influence_at(member, test_correct, train_id, test_id)
    return {"train_id": train_id, "test_id": test_id, "infl": infl, "infl_se": se, "high": high, "rank": rank}


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
