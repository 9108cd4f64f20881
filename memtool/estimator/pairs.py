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
- :func:`regression_influence`: all candidate pairs of a class at once (datamodels / AME style):
  each test sample's margin regressed (ridge, intercept free) on the membership of the
  candidate training samples of its class, so the other candidates' effects leave the
  residual: a less noisy coefficient, turned into a probability difference by the same probit.
- :func:`ash_influence`: the regression under a sparse prior fitted to the pairs (adaptive
  shrinkage), most of its mass at exactly 0, so each test sample's variation goes to the
  candidate that has it; its own posterior gives each pair P(infl >= threshold).
- :func:`posterior`: empirical Bayes over the pairs. The prior of the true influence is the
  grid distribution that maximizes the likelihood of every candidate's (estimate, SE) (the
  NPMLE, fitted by EM); each pair gets P(infl >= threshold | its estimate), and a set of pairs
  its expected number of false ones, sum(1 - P).

The tables carry the plain difference (:func:`memtool.estimator.scores.influence_at`) as
``infl``, the probit as ``infl_probit`` and the adaptive shrinkage as ``infl_ash``; ``--pairs``
chooses which one calls ``high`` (``ash`` by default, after analyses/pairs_cost.py measured all
of them against the references).
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


def probit_influence(member: np.ndarray, test_margin: np.ndarray, train_ids, test_ids,
                     max_bytes: int = 256 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(infl, se) of the given pairs (train_ids[p], test_ids[p]) from the margins (t, n_test)
    of test samples under the trials (``member``: (t, n_train) bool), by the probit model of
    the module docstring. NaN where i was never in or never out, or the margin never varied.
    Works on blocks of pairs of about ``max_bytes`` each."""
    train_ids, test_ids = np.asarray(train_ids, dtype=np.int64), np.asarray(test_ids, dtype=np.int64)
    chunk = max(1, max_bytes // (8 * 4 * max(member.shape[0], 1)))
    parts = [_probit_block(member, test_margin, train_ids[s:s + chunk], test_ids[s:s + chunk])
             for s in range(0, len(train_ids), chunk)]
    if not parts:
        return np.zeros(0), np.zeros(0)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _probit_block(member, test_margin, train_ids, test_ids):
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


def _probit_difference(mean, beta, r, sd):
    """P(correct | i in) - P(correct | i out) and d/d beta for a margin ~ N(mean + beta (m - r), sd)."""
    z_in, z_out = (mean + beta * (1 - r)) / sd, (mean - beta * r) / sd
    infl = stats.norm.cdf(z_in) - stats.norm.cdf(z_out)
    return infl, (stats.norm.pdf(z_in) * (1 - r) + stats.norm.pdf(z_out) * r) / sd


def regression_influence(member: np.ndarray, test_margin: np.ndarray, candidates: np.ndarray, test_ids,
                         ridge: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(infl, se), each (len(test_ids), len(candidates)): test sample j's margin over the trials
    regressed on the membership of every candidate training sample at once,
    margin_j = c_j + sum_i beta_ij (m_i - r_i) + noise (ridge penalty ``ridge`` on beta, none on
    c_j), and beta_ij turned into a probability difference by the probit at the spread of the
    margin without i's own effect (residual and other candidates); SE by the delta method
    from the coefficients' covariance. One solve serves every test sample (the candidates are
    the same: e.g. the high-mem training samples of the test samples' class). It pays for
    every candidate's coefficient: on simulated margins with two sources per test sample its
    mean squared error is 0.93x the pairwise probit's with 4 candidates over 128 trials, but
    1.10x with 30 (1.44x over 64 trials)."""
    candidates, test_ids = np.asarray(candidates), np.asarray(test_ids)
    t, c = member.shape[0], len(candidates)
    m = member[:, candidates].astype(np.float64)
    r = m.mean(0)
    x = m - r  # centred: the intercept is each test sample's mean margin
    y = test_margin[:, test_ids].astype(np.float64)
    mean = y.mean(0)
    gram = x.T @ x + ridge * np.eye(c)
    inv = np.linalg.inv(gram)
    beta = inv @ (x.T @ (y - mean))  # (c, tests)
    resid = (y - mean) - x @ beta
    shrunk = inv @ (x.T @ x)  # the ridge's shrinkage of the least-squares coefficients
    sd = np.sqrt((resid**2).sum(0) / max(t - 1 - np.trace(shrunk), 1.0))  # trace: effective parameters; (tests,)
    cov_diag = np.diag(shrunk @ inv)  # Var(beta) / sigma^2 of the ridge estimator
    # the probit's scale: the margin's spread over the trials with i's own effect taken out (the residual and
    # the other candidates'), as P(correct | i in / out) averages over the other candidates' memberships
    # (beta^2 less its noise, Var(beta) = sd^2 cov_diag: an unbiased square)
    spread = (np.maximum(beta**2 - np.outer(cov_diag, sd**2), 0) * (r * (1 - r))[:, None]).T  # (tests, c)
    scale = np.sqrt(sd[:, None] ** 2 + spread.sum(1, keepdims=True) - spread)
    with np.errstate(divide="ignore", invalid="ignore"):
        infl, grad = _probit_difference(mean[:, None], beta.T, r[None, :], scale)
        se = np.abs(grad) * sd[:, None] * np.sqrt(cov_diag)[None, :]
    bad = ~(sd > 0)[:, None] | ((r <= 0) | (r >= 1))[None, :]
    infl, se = np.where(bad, np.nan, infl), np.where(bad, np.nan, se)
    return infl, se


ASH_SCALES = np.r_[0.0, 2.0 ** np.arange(-8, 3)]  # the prior's sds of a coefficient, in units of the residual's
ASH_CUT = 0.3  # the tables call a pair when P(infl >= threshold) >= ASH_CUT (analyses/pairs_cost.py chose it)


def ash_influence(member: np.ndarray, test_margin: np.ndarray, candidates: np.ndarray, test_ids, threshold: float,
                  scales=ASH_SCALES, iters: int = 100, tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """(infl, p_high), each (len(test_ids), len(candidates)): the regression of
    :func:`regression_influence` under a sparse prior learnt from the pairs themselves (adaptive
    shrinkage, "mr.ash": Kim, Wang, Carbonetto & Stephens 2024). Test sample j's standardized
    margin y_j = sum_i b_ij (m_i - r_i) + e_j, e_j ~ N(0, s_j^2), and b_ij ~ sum_l pi_l N(0, s_j^2
    scales_l^2) with scales_0 = 0 (no effect); the weights pi are shared by every pair and fitted
    with the coefficients by variational EM (coordinate ascent over the candidates, every test
    sample at once). The candidates compete for each test sample's variation, so an effect goes
    to the candidate that has it and the others' coefficients shrink to 0, where the ridge's one
    Gaussian prior spreads it (measured by analyses/pairs_cost.py). ``infl``: the posterior-mean
    coefficient through the probit of :func:`regression_influence`; ``p_high``: the posterior
    P(infl >= threshold) (infl increases with b_ij, so it is P(b_ij >= the b that reaches the
    threshold) under the posterior mixture). NaN where i was never in or never out, or j's margin
    never varied."""
    candidates, test_ids = np.asarray(candidates), np.asarray(test_ids)
    m = member[:, candidates].astype(np.float64)
    r = m.mean(0)
    y = test_margin[:, test_ids].astype(np.float64)
    mean, sd = y.mean(0), y.std(0)
    cols, rows = np.flatnonzero((r > 0) & (r < 1)), np.flatnonzero(sd > 0)
    infl, p_high = np.full((len(test_ids), len(candidates)), np.nan), np.full((len(test_ids), len(candidates)), np.nan)
    if not len(cols) or not len(rows):
        return infl, p_high
    x, r = m[:, cols] - r[cols], r[cols]
    y, z0 = (y[:, rows] - mean[rows]) / sd[rows], (mean[rows] / sd[rows])[None, :]
    b, phi, mu, var, sigma2 = _ash_fit(x, y, np.asarray(scales, dtype=np.float64) ** 2, iters, tol)
    # the probit's scale: the residual and the other candidates' effects (as in regression_influence)
    spread = b**2 * (r * (1 - r))[:, None]  # (c, n)
    scale = np.sqrt(sigma2[None, :] + spread.sum(0, keepdims=True) - spread)

    def probit(beta):
        return (stats.norm.cdf((z0 + beta * (1 - r)[:, None]) / scale)
                - stats.norm.cdf((z0 - beta * r[:, None]) / scale))

    lo, hi = np.zeros_like(b), np.ones_like(b)  # the b that reaches the threshold: bracket, then bisect
    for _ in range(60):
        short = probit(hi) < threshold
        if not short.any():
            break
        lo, hi = np.where(short, hi, lo), np.where(short, 2 * hi, hi)
    for _ in range(50):
        mid = (lo + hi) / 2
        above = probit(mid) >= threshold
        lo, hi = np.where(above, lo, mid), np.where(above, mid, hi)
    sdev = np.sqrt(var)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(sdev > 0, stats.norm.sf((hi[..., None] - mu) / sdev), mu >= hi[..., None])
    infl[np.ix_(rows, cols)] = probit(b).T
    p_high[np.ix_(rows, cols)] = np.minimum((phi * tail).sum(2), 1.0).T
    return infl, p_high


def _ash_fit(x, y, s2, iters, tol):
    """Variational EM of the adaptive-shrinkage regression of every column of ``y`` on ``x`` (both
    centred): (b, phi, mu, var, sigma2), the posterior means (c, n), the mixture's weights, means
    and variances per component (c, n, L), and the residual variances (n,). Works on X^T X and
    X^T y, so a sweep costs c^2 n, not the trials' t c n."""
    t, c = x.shape
    gram, xty, yy = x.T @ x, x.T @ y, (y * y).sum(0)
    d = np.diag(gram).copy()
    pi = np.full(len(s2), 1 / len(s2))
    b, sigma2 = np.zeros((c, y.shape[1])), yy / t
    phi, mu, var = (np.zeros((c, y.shape[1], len(s2))) for _ in range(3))
    for _ in range(iters):
        before = b.copy()
        for k in range(c):
            bhat = (xty[k] - gram[k] @ b) / d[k] + b[k]  # x_k' (y minus the other candidates' fit) / d_k
            mu[k] = bhat[:, None] * (d[k] * s2 / (1 + d[k] * s2))
            var[k] = sigma2[:, None] * (s2 / (1 + d[k] * s2))
            marginal = sigma2[:, None] * (1 / d[k] + s2)  # of bhat under component l
            logw = np.log(np.maximum(pi, 1e-300)) - 0.5 * (np.log(marginal) + bhat[:, None] ** 2 / marginal)
            w = np.exp(logw - logw.max(1, keepdims=True))
            phi[k] = w / w.sum(1, keepdims=True)
            b[k] = (phi[k] * mu[k]).sum(1)
        pi = phi.reshape(-1, len(s2)).mean(0)
        spread = (phi * (var + mu**2)).sum(2) - b**2  # the coefficients' posterior variances
        rss = yy - 2 * (b * xty).sum(0) + (b * (gram @ b)).sum(0)
        sigma2 = (np.maximum(rss, 0) + (d[:, None] * spread).sum(0)) / t
        if np.abs(b - before).max() < tol:
            break
    return b, phi, mu, var, sigma2


def prior_grid(estimate: np.ndarray, se: np.ndarray, grid=None, iters: int = 300, tol: float = 1e-7,
               fit_on: int = 100_000, seed: int = 0):
    """(grid, weights): the NPMLE of the distribution of the true values behind ``estimate`` ~
    N(true, se^2), on ``grid`` (default: 201 points on [-1, 1]), by EM from uniform weights, on
    at most ``fit_on`` of the pairs (drawn with ``seed``)."""
    grid = np.linspace(-1, 1, 201) if grid is None else np.asarray(grid, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(estimate) & np.isfinite(se) & (se > 0))
    if len(ok) > fit_on:
        ok = np.sort(np.random.default_rng(seed).choice(ok, fit_on, replace=False))
    lik = _likelihood(estimate[ok], se[ok], grid)
    w = np.full(len(grid), 1 / len(grid))
    for _ in range(iters):
        mix = lik @ w
        new = w * (lik.T @ (1 / mix)) / len(mix)
        done = np.abs(new - w).max() < tol
        w = new
        if done:
            break
    return grid, w


def _likelihood(estimate, se, grid):
    # an SE below half the grid's step is one the grid cannot resolve (and one of 1e-200, from a
    # probit whose margins never come near 0, would put no grid point within reach): floor it there
    se = np.maximum(se, np.diff(grid).min() / 2 if len(grid) > 1 else 0)
    z = (estimate[:, None] - grid[None, :]) / se[:, None]
    return (np.exp(-0.5 * z * z) / se[:, None]).astype(np.float64)


def posterior(estimate: np.ndarray, se: np.ndarray, threshold: float, prior=None, chunk: int = 1 << 16):
    """(prob, mean): P(true >= threshold | estimate) and the posterior mean of every pair, under
    ``prior`` ((grid, weights), default :func:`prior_grid` of these very pairs). NaN where the
    pair has no estimate."""
    grid, w = prior_grid(estimate, se) if prior is None else prior
    prob, mean = np.full(len(estimate), np.nan), np.full(len(estimate), np.nan)
    ok = np.flatnonzero(np.isfinite(estimate) & np.isfinite(se) & (se > 0))
    above = grid >= threshold - 1e-12
    for s in range(0, len(ok), chunk):
        idx = ok[s : s + chunk]
        post = _likelihood(estimate[idx], se[idx], grid) * w
        post /= post.sum(1, keepdims=True)
        prob[idx], mean[idx] = np.minimum(post[:, above].sum(1), 1.0), post @ grid  # no 1 + 1e-16
    return prob, mean


def candidate_pairs(mem: np.ndarray, train_label: np.ndarray, test_label: np.ndarray,
                    mem_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(train_ids, test_ids): every same-class pair of a training sample with mem >= the
    threshold and a test sample: the pairs the high-influence rule can call."""
    from .scores import at_least

    high = np.flatnonzero(at_least(mem, mem_threshold))
    by_class = {c: np.flatnonzero(test_label == c) for c in np.unique(train_label[high])}
    tests = [by_class[c] for c in train_label[high]]
    return (np.repeat(high, [len(t) for t in tests]).astype(np.int64),
            np.concatenate(tests).astype(np.int64) if tests else np.zeros(0, np.int64))


def ash_candidates(member, test_margin, mem, train_label, test_label, mem_threshold: float, threshold: float):
    """(train_ids, test_ids, infl, p_high) of every pair the high-influence rule can call
    (:func:`candidate_pairs`), by :func:`ash_influence`, one regression per class: its test
    samples on its training samples with mem >= ``mem_threshold``."""
    ci, cj = candidate_pairs(mem, train_label, test_label, mem_threshold)
    infl, p_high = np.full(len(ci), np.nan), np.full(len(ci), np.nan)
    for c in np.unique(train_label[ci]):
        pick = np.flatnonzero(train_label[ci] == c)
        cand, tests = np.unique(ci[pick]), np.flatnonzero(test_label == c)
        f, p = ash_influence(member, test_margin, cand, tests, threshold)
        rows, cols = np.searchsorted(tests, cj[pick]), np.searchsorted(cand, ci[pick])
        infl[pick], p_high[pick] = f[rows, cols], p[rows, cols]
    return ci, cj, infl, p_high


def plain_posterior(member, test_correct, mem, train_label, test_label, mem_threshold: float, infl_threshold: float,
                    train_ids, test_ids) -> np.ndarray:
    """P(infl >= infl_threshold | the plain estimate) of the pairs (train_ids, test_ids): the
    prior is the NPMLE over every candidate pair's plain estimate and Agresti-Caffo SE
    (:func:`candidate_pairs`, :func:`prior_grid`). How far to trust the plain pairs: their sum
    of 1 - P is the expected number of false ones."""
    from .scores import influence_at

    ci, cj = candidate_pairs(mem, train_label, test_label, mem_threshold)
    if not len(ci):
        return np.full(len(train_ids), np.nan)
    prior = prior_grid(*influence_at(member, test_correct, ci, cj))
    return posterior(*influence_at(member, test_correct, np.asarray(train_ids), np.asarray(test_ids)),
                     infl_threshold, prior=prior)[0]
