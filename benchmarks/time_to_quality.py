"""CPU seconds until the memorization scores are good enough, naive loop vs memtool.

    python benchmarks/time_to_quality.py                 # about 2 minutes on 2 cores
    python benchmarks/time_to_quality.py --max-trials 96

Setting: MNIST's first 5,000 training samples with 2 % planted label noise, ratio 0.7, the
MLP 784-256-10 and the reference recipe (20 epochs, batch 128, SGD lr 0.1, momentum 0.9).
Quality is reached when both hold: AUROC of `mem` for the flipped labels >= 0.95, and the
split-half (even vs. odd trials) Spearman of `mem` >= 0.8. Each method adds trials in steps
of 8 and is checked after every step; seconds are process CPU seconds (all threads) spent
producing the trials, not scoring them. memtool's trials come from `memtool.estimate`
extending one run directory; the naive loop's from ``common.naive_trial``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import naive_trial  # noqa: E402

import memtool  # noqa: E402
from memtool.estimator import plan, scores as S  # noqa: E402
from memtool.recipe import Recipe  # noqa: E402

SETTING = dict(dataset="mnist", limit=5000, label_noise=0.02, ratio=0.7, seed=0)
RECIPE = Recipe(model="mlp", hidden=256, epochs=20, batch_size=128, lr=0.1, schedule="constant")
STEP = 8


def quality(member, correct, noisy, margin=None) -> dict:
    mem = S.memorization(member, correct)["mem"]
    halves = [S.memorization(member[i::2], correct[i::2])["mem"] for i in (0, 1)]
    q = {"auroc": S.auroc(mem, noisy), "spearman": S.spearman(*halves)}
    if margin is not None:  # memtool also records margins; the naive reference does not
        q["auroc_margin"] = S.auroc(S.margin_memorization(member, margin)["margin_mem"], noisy)
    return q


def reached(q) -> bool:
    return q["auroc"] >= 0.95 and q["spearman"] >= 0.8


def naive(ds, max_trials):
    n = len(ds.y_train)
    member, correct, cpu, t = [], [], 0.0, 0
    while t < max_trials:
        for idx in plan.subset_indices(n, SETTING["ratio"], SETTING["seed"], range(t, t + STEP)):
            c0 = time.process_time()
            tr, _ = naive_trial(ds, idx, RECIPE, seed=t)
            cpu += time.process_time() - c0
            m = np.zeros(n, bool)
            m[idx] = True
            member.append(m)
            correct.append(tr)
            t += 1
        q = quality(np.array(member), np.array(correct), ds.label_corrupted)
        yield t, cpu, q


def with_memtool(ds, max_trials):
    with tempfile.TemporaryDirectory() as tmp:
        out, cpu, t = Path(tmp) / "run", 0.0, 0
        while t < max_trials:
            t += STEP
            c0 = time.process_time()
            memtool.estimate(out, trials=t, progress=False, tables=False, recipe=RECIPE, **SETTING)
            cpu += time.process_time() - c0
            tr = memtool.load_trials(out)
            yield t, cpu, quality(tr.member, tr.train_correct, ds.label_corrupted, tr.train_margin)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-trials", type=int, default=96)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (all cores)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ds = memtool.load_dataset(SETTING["dataset"], limit=SETTING["limit"], label_noise=SETTING["label_noise"],
                              seed=SETTING["seed"])
    result, margin_auroc = {}, None
    for name, method in (("naive", naive), ("memtool", with_memtool)):
        for t, cpu, q in method(ds, a.max_trials):
            extra = f"  AUROC(margin_mem) {q['auroc_margin']:.3f}" if "auroc_margin" in q else ""
            print(f"{name:<8} trials {t:>4}  cpu {cpu:7.1f} s  AUROC(mem) {q['auroc']:.3f}  "
                  f"split-half Spearman(mem) {q['spearman']:.3f}{extra}", flush=True)
            if margin_auroc is None and q.get("auroc_margin", 0) >= 0.95:
                margin_auroc = (t, cpu)
            if reached(q):
                result[name] = (t, cpu)
                break
        else:
            result[name] = None
    for name, r in result.items():
        print(f"{name}: " + (f"quality reached at {r[0]} trials, {r[1]:.1f} CPU s" if r else "not reached"))
    if margin_auroc:
        print(f"memtool: AUROC(margin_mem) >= 0.95 (noise detection alone) at {margin_auroc[0]} trials, "
              f"{margin_auroc[1]:.1f} CPU s")
    if all(result.values()):
        print(f"time-to-quality ratio (naive / memtool): {result['naive'][1] / result['memtool'][1]:.2f}")


if __name__ == "__main__":
    main()
