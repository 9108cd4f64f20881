"""How often each 95 % interval of an accuracy measured by S seeds on the same test samples covers
the population accuracy, by simulation (issue 31: the robust evaluation's intervals).

    OMP_NUM_THREADS=1 python benchmarks/interval_coverage.py [--reps 2000]

A threshold model: sample i is classified right by seed s's model when z_i + u_s + e_si > c, with
the samples' difficulty z_i ~ N(0, 3^2) (most samples right, or wrong, under every seed, as in the
comparison's records), the seeds' effect u_s ~ N(0, tau^2), tau 0, 0.1 or 0.3, and noise e_si ~
N(0, 1); c puts the population accuracy at 0.6. Each repetition draws 500 test samples and S
seeds. Compared, on the same draws:

- ``t over seeds``: the t-interval of the seeds' accuracies (the test samples held fixed);
- ``hierarchical bootstrap``: seeds drawn with replacement, then each drawn seed's own draw of
  the test samples, percentile interval (``--boot`` draws);
- ``Satterthwaite``: :func:`memtool.experiments.seeds_and_samples_interval` without its floor;
- ``crossed`` (memtool's): :func:`memtool.experiments.crossed_interval`, with the floor.

Prints a markdown table: coverage and mean width (points) per (seeds, tau).
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats

from memtool.experiments import _errors, crossed_interval, t_interval


def hierarchical_bootstrap(d: np.ndarray, n_boot: int, rng) -> tuple[float, float]:
    s, n = d.shape
    rows = rng.integers(0, s, (n_boot, s))
    cols = rng.integers(0, n, (n_boot, s, n))
    means = d[rows[:, :, None], cols].mean((1, 2))
    return tuple(np.quantile(means, [0.025, 0.975]))


def satterthwaite(d: np.ndarray) -> tuple[float, float]:
    """memtool's rule without its floor: the first (standard error, degrees of freedom) of ``_errors``."""
    (se, df), *_ = _errors(d.mean(1), d.var(1, ddof=1) / d.shape[1], d.mean(0).var(ddof=1) / d.shape[1])
    half = stats.t.ppf(0.975, df) * se
    return d.mean() - half, d.mean() + half


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--boot", type=int, default=400)
    ap.add_argument("--samples", type=int, default=500)
    args = ap.parse_args(argv)
    rules = {"t over seeds": lambda d, rng: t_interval(d.mean(1))[1:],
             "hierarchical bootstrap": lambda d, rng: hierarchical_bootstrap(d, args.boot, rng),
             "Satterthwaite": lambda d, rng: satterthwaite(d),
             "crossed (memtool)": lambda d, rng: crossed_interval(d)[1:]}
    print(f"{args.reps} repetitions, {args.samples} test samples, population accuracy 0.6\n")
    print("| seeds | tau | " + " | ".join(rules) + " |")
    print("|---:|---:|" + "---|" * len(rules))
    for s in (3, 5):
        for tau in (0.0, 0.1, 0.3):
            rng = np.random.default_rng(1000 * s + int(100 * tau))
            c = -stats.norm.ppf(0.6) * np.sqrt(9 + tau ** 2 + 1)
            hit, width = dict.fromkeys(rules, 0), dict.fromkeys(rules, 0.0)
            for _ in range(args.reps):
                z, u = rng.normal(0, 3, args.samples), rng.normal(0, tau, s)
                d = (z[None] + u[:, None] + rng.normal(0, 1, (s, args.samples)) > c).astype(float)
                for name, rule in rules.items():
                    lo, hi = rule(d, rng)
                    hit[name] += lo <= 0.6 <= hi
                    width[name] += hi - lo
            print(f"| {s} | {tau:g} | " + " | ".join(
                f"{100 * hit[k] / args.reps:.1f} % ({100 * width[k] / args.reps:.1f})" for k in rules) + " |")


if __name__ == "__main__":
    main()
