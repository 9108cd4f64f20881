"""Estimators of pair influence on the trials already stored (issue 30): what the plain
Feldman & Zhang difference throws away.

- :func:`feasible`: the pairs that can reach an influence threshold at all. With r_i =
  n_in(i) / t and a_j test sample j's accuracy over all t trials, the empirical difference is
  infl(i, j) = (p_in - a_j) / (1 - r_i) with p_in <= 1 and p_out >= 0, so
  infl(i, j) <= min((1 - a_j) / (1 - r_i), a_j / r_i) exactly: the filter never drops a pair
  the plain estimator keeps (tested as a property).
- :func:`probit_influence`: the same difference from the float margins the trials record,
  under a Gaussian model of test sample j's margin with one variance whether i is in or out:
  infl = Phi(mu_in / s) - Phi(mu_out / s), standard error by the delta method
  sqrt(phi(z_in)^2 / n_in + phi(z_out)^2 / n_out). Where the model holds its variance is
  phi(z)^2 / (p (1 - p)) of the 0/1 difference's (0.64 at p = 0.5): more pairs per trial.

The plain difference (:func:`memtool.estimator.scores.influence_at`) stays what the tables
call ``infl``; these are measured against it before any becomes a default.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def feasible(member: np.ndarray, test_correct: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(bound, ok): the largest plain influence each (test j, train i) pair can have given
    test j's accuracy over all trials and i's inclusion rate, (n_test, n_train), and whether it
    reaches ``threshold``. Pairs with no estimate (i never in or never out) get -inf."""
    t = member.shape[0]
    r = member.sum(0) / t  # (n_train,)
    a = test_correct.mean(0)  # (n_test,)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.minimum((1 - a)[:, None] / (1 - r)[None, :], a[:, None] / r[None, :])
    bound[:, (r <= 0) | (r >= 1)] = -np.inf
    return bound, bound >= threshold - 1e-9


def probit_influence(member: np.ndarray, test_margin: np.ndarray, train_ids, test_ids) -> tuple[np.ndarray, np.ndarray]:
    """(infl, se) of the given pairs (train_ids[p], test_ids[p]) from the margins (t, n_test)
    of test samples under the trials (``member``: (t, n_train) bool), by the probit model of
    the module docstring. NaN where i was never in or never out, or the margin never varied."""
    train_ids, test_ids = np.asarray(train_ids), np.asarray(test_ids)
    m = member[:, train_ids].astype(np.float64)  # (t, pairs)
    y = test_margin[:, test_ids].astype(np.float64)  # (t, pairs)
    t = m.shape[0]
    n_in = m.sum(0)
    n_out = t - n_in
    s_in, s_all = (m * y).sum(0), y.sum(0)
    q_in, q_all = (m * y * y).sum(0), (y * y).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu_in, mu_out = s_in / n_in, (s_all - s_in) / n_out
        ss = (q_in - n_in * mu_in**2) + ((q_all - q_in) - n_out * mu_out**2)
        sd = np.sqrt(np.maximum(ss, 0) / (t - 2))
        z_in, z_out = mu_in / sd, mu_out / sd
        infl = stats.norm.cdf(z_in) - stats.norm.cdf(z_out)
        se = np.sqrt(stats.norm.pdf(z_in) ** 2 / n_in + stats.norm.pdf(z_out) ** 2 / n_out)
    bad = (n_in == 0) | (n_out == 0) | ~(sd > 0)
    infl[bad], se[bad] = np.nan, np.nan
    return infl, se
