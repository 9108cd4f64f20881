"""Which recipe, and which estimator, reaches the time-to-quality criteria with fewer trials?

    python benchmarks/recipe_sweep.py                       # about 4 minutes on 2 cores
    python benchmarks/recipe_sweep.py --recipes 20,constant,0.1 40,constant,0.1 --trials 8,16

The setting and the quality criteria of `time_to_quality.py` (MNIST first 5,000, 2 % planted
label noise, MLP 784-256-10, batch 128, SGD momentum 0.9): for each recipe
(``epochs,schedule,lr``) memtool adds trials and prints, after each step, the CPU seconds so
far, how well the models fit their own noisy labels, AUROC and split-half Spearman of `mem`.

It also prints the same two numbers for ``mem_gauss``, an experiment that is not part of
memtool: the same estimand P(correct | in) - P(correct | out) computed from the margins under
a Gaussian model per sample (as LiRA does for membership inference, Carlini et al. 2022):
Phi(mean_in / sd_in) - Phi(mean_out / sd_out), each variance shrunk towards the median of
all samples' variances with the weight of 4 trials (limma-style moderation).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm

import memtool
from memtool.estimator import scores as S
from memtool.recipe import Recipe

SETTING = dict(dataset="mnist", limit=5000, label_noise=0.02, ratio=0.7, seed=0)
RECIPES = ["10,constant,0.1", "15,constant,0.1", "20,constant,0.1", "30,constant,0.1", "40,constant,0.1",
           "30,linear,0.2"]


def mem_gauss(member: np.ndarray, margin: np.ndarray, prior_trials: float = 4.0) -> np.ndarray:
    m, x = member.astype(np.float64), margin.astype(np.float64)
    parts = []
    for w in (m, 1 - m):
        n = w.sum(0)
        mu = (w * x).sum(0) / np.maximum(n, 1)
        ss = (w * (x - mu) ** 2).sum(0)
        v0 = np.median(ss[n > 1] / (n[n > 1] - 1))
        sd = np.sqrt((prior_trials * v0 + ss) / (prior_trials + np.maximum(n - 1, 0)))
        parts.append((norm.cdf(mu / sd), n))
    (p_in, n_in), (p_out, n_out) = parts
    return np.where((n_in > 0) & (n_out > 0), p_in - p_out, np.nan)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=RECIPES, help="epochs,schedule,lr")
    p.add_argument("--trials", default="8,16,24,32", help="comma-separated, increasing")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ds = memtool.load_dataset(SETTING["dataset"], limit=SETTING["limit"], label_noise=SETTING["label_noise"],
                              seed=SETTING["seed"])
    noisy = ds.label_corrupted
    print(f"{'recipe':<18} {'trials':>6} {'CPU s':>7} {'fit':>6} {'noisy fit':>9} {'AUROC':>6} {'SH rho':>6}"
          f" {'AUROC(gauss)':>12} {'SH rho(gauss)':>13}")
    for spec in a.recipes:
        epochs, schedule, lr = spec.split(",")
        recipe = Recipe(model="mlp", hidden=256, epochs=int(epochs), batch_size=128, lr=float(lr), schedule=schedule)
        with tempfile.TemporaryDirectory() as tmp:
            cpu = 0.0
            for t in map(int, a.trials.split(",")):
                c0 = time.process_time()
                memtool.estimate(Path(tmp) / "run", trials=t, progress=False, tables=False, recipe=recipe, **SETTING)
                cpu += time.process_time() - c0
                tr = memtool.load_trials(Path(tmp) / "run")
                mb, c, mg = tr.member, tr.train_correct, tr.train_margin
                row = [S.memorization(mb, c)["mem"], *(S.memorization(mb[i::2], c[i::2])["mem"] for i in (0, 1)),
                       mem_gauss(mb, mg), *(mem_gauss(mb[i::2], mg[i::2]) for i in (0, 1))]
                print(f"{spec:<18} {t:>6} {cpu:>7.1f} {c[mb].mean():>6.4f} {c[:, noisy][mb[:, noisy]].mean():>9.3f} "
                      f"{S.auroc(row[0], noisy):>6.3f} {S.spearman(row[1], row[2]):>6.3f} "
                      f"{S.auroc(row[3], noisy):>12.3f} {S.spearman(row[4], row[5]):>13.3f}", flush=True)


if __name__ == "__main__":
    main()
