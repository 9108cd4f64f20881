"""Peak memory and time of `memtool scores` at CIFAR-100 scale, from synthetic trial files.

    python benchmarks/scores_memory.py                       # t = 4000, n = 50,000, n_test = 10,000
    python benchmarks/scores_memory.py --trials 400 --n-train 5000 --n-test 1000   # a quick look

Writes a run directory in the real format (run.json, labels.npz, trial files of 100 trials
written by the estimator's own `write_trials`) with planted structure: 5 % of the training
samples are memorized (correct only when trained on), 2,000 test samples each depend on one
same-class memorized training sample (a high-influence pair), the rest are right with a
per-sample probability. Then a fresh process computes everything `memtool scores` computes
(memorization and margin scores, influence pairs with top-10 per test sample, split halves)
and reports its peak RSS (ru_maxrss) and wall time; the target is at most 4 GiB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from memtool.estimator.store import init_run, write_trials

CHILD = """
import json, resource, sys, time
from memtool.estimator.tables import compute_tables
t0 = time.time()
s = compute_tables(sys.argv[1])
print(json.dumps({"wall_s": round(time.time() - t0, 1),
                  "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  "n_trials": s["n_trials"], "n_high_pairs": s["n_high_pairs"], "n_high_mem": s["n_high_mem"],
                  "split_half_jaccard_pairs": s["split_half"]["jaccard_high_pairs"]}))
"""


def synthetic_run(run: Path, t: int, n: int, n_test: int, classes: int = 100, seed: int = 0, batch: int = 100):
    rng = np.random.default_rng(seed)
    y_tr, y_te = rng.integers(0, classes, n), rng.integers(0, classes, n_test)
    memorized = rng.choice(n, n // 20, replace=False)
    pairs = min(2000, n_test)
    src = memorized[rng.integers(0, len(memorized), pairs)]
    y_te[:pairs] = y_tr[src]  # test j < pairs: same class as its training sample src[j]
    p_tr, p_te = rng.beta(8, 2, n), rng.beta(8, 2, n_test)
    ds = SimpleNamespace(name="synthetic", fingerprint="synthetic", y_train=y_tr, y_test=y_te, original_label=y_tr,
                         num_classes=classes)
    init_run(run, {"synthetic": True, "trials": t, "n_train": n, "n_test": n_test}, ds)
    for first in range(0, t, batch):
        k = min(batch, t - first)
        member = rng.random((k, n)) < 0.7
        train_c = (rng.random((k, n)) < p_tr) | member  # trained on: right
        train_c[:, memorized] = member[:, memorized] | (rng.random((k, len(memorized))) < 0.2)
        test_c = rng.random((k, n_test)) < p_te
        test_c[:, :pairs] = np.where(member[:, src], rng.random((k, pairs)) < 0.9, rng.random((k, pairs)) < 0.3)
        margins = {"train_margin": np.where(train_c, 1.0, -1.0) * rng.random((k, n)).astype(np.float32),
                   "test_margin": np.where(test_c, 1.0, -1.0) * rng.random((k, n_test)).astype(np.float32)}
        write_trials(run, np.arange(first, first + k), member, margins)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4000)
    p.add_argument("--n-train", type=int, default=50000)
    p.add_argument("--n-test", type=int, default=10000)
    p.add_argument("--dir", default=None, help="where to write the synthetic run (default: a temporary folder)")
    a = p.parse_args(argv)
    base = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="memtool-scores-memory-"))
    run = base / "run"
    try:
        if not (run / "trials").exists() or len(list((run / "trials").glob("*.npz"))) * 100 < a.trials:
            t0 = time.time()
            shutil.rmtree(run, ignore_errors=True)
            synthetic_run(run, a.trials, a.n_train, a.n_test)
            size = sum(f.stat().st_size for f in (run / "trials").iterdir()) / 2**30
            print(f"wrote {a.trials} synthetic trials ({size:.2f} GiB) in {time.time() - t0:.0f} s", flush=True)
        out = subprocess.run([sys.executable, "-c", CHILD, str(run)], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result.update(trials=a.trials, n_train=a.n_train, n_test=a.n_test,
                      within_4_gib=result["peak_rss_gib"] <= 4.0)
        print(json.dumps(result, indent=1))
        return result
    finally:
        if not a.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
