"""Throughput of `memtool estimate` against the naive one-model-at-a-time loop.

    python benchmarks/estimate_speed.py            # all three settings, about 4 minutes
    python benchmarks/estimate_speed.py --only digits-mlp --repeat 3

Same data, model, recipe and number of SGD steps for both; both evaluate every train and
test sample after training. memtool's time is the whole `estimate` call (training,
evaluation, trial files, score tables). Prints models per minute, their ratio, and
memtool's achieved GFLOP/s against the fp32 matmul peak measured in the same process.
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
from common import matmul_peak, model_flops, naive_trial  # noqa: E402

import memtool  # noqa: E402
from memtool.estimator import plan  # noqa: E402
from memtool.recipe import Recipe  # noqa: E402

SETTINGS = {
    # name: dataset kwargs, recipe, naive trials, memtool trials
    "digits-mlp": (dict(name="digits"), Recipe(model="mlp", hidden=128, epochs=20, batch_size=32, lr=0.1, schedule="constant"), 32, 128),
    "mnist-mlp": (dict(name="mnist", limit=5000), Recipe(model="mlp", hidden=256, epochs=20, batch_size=128, lr=0.1, schedule="constant"), 8, 32),
    "mnist-cnn": (dict(name="mnist", limit=5000), Recipe(model="cnn", hidden=128, epochs=2, batch_size=128, lr=0.05, schedule="constant"), 4, 16),
}


def _naive_s(ds, recipe, trials) -> float:
    n = len(ds.y_train)
    t0 = time.perf_counter()
    for t, idx in enumerate(plan.subset_indices(n, 0.7, 0, range(trials))):
        naive_trial(ds, idx, recipe, seed=t)
    return (time.perf_counter() - t0) / trials


def _memtool_s(ds, dkw, recipe, trials, k=None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        memtool.estimate(Path(tmp) / "run", trials=trials, dataset=ds.name, limit=dkw.get("limit"),
                         progress=False, recipe=recipe, ensemble_size=k)
        return (time.perf_counter() - t0) / trials


def run(name: str, peak: float, repeat: int = 1, k: int | None = None) -> dict:
    """Seconds per model of each method: the median of ``repeat`` alternating measurements."""
    dkw, recipe, t_naive, t_mem = SETTINGS[name]
    ds = memtool.load_dataset(**dkw)
    times = [(_naive_s(ds, recipe, t_naive), _memtool_s(ds, dkw, recipe, t_mem, k)) for _ in range(repeat)]
    naive_s, mem_s = np.median(times, axis=0)
    flops = model_flops(ds, recipe, plan.subset_size(len(ds.y_train), 0.7))
    return {"setting": name, "naive_models_per_min": 60 / naive_s, "memtool_models_per_min": 60 / mem_s,
            "ratio": naive_s / mem_s, "memtool_gflops": flops / mem_s / 1e9, "naive_gflops": flops / naive_s / 1e9,
            "peak_gflops": peak, "memtool_pct_peak": 100 * flops / mem_s / 1e9 / peak}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=list(SETTINGS), action="append")
    p.add_argument("--repeat", type=int, default=1, help="median of this many alternating measurements")
    p.add_argument("--ensemble-size", type=int, help="models per step (default: memtool's choice)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (all cores)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    peak = matmul_peak()
    print(f"fp32 matmul peak (2048^3, this process): {peak:.0f} GFLOP/s on {torch.get_num_threads()} threads")
    print(f"{'setting':<12} {'naive/min':>10} {'memtool/min':>12} {'ratio':>6} {'naive GF/s':>11} "
          f"{'memtool GF/s':>13} {'% of peak':>9}")
    for name in a.only or SETTINGS:
        r = run(name, peak, a.repeat, a.ensemble_size)
        print(f"{name:<12} {r['naive_models_per_min']:>10.1f} {r['memtool_models_per_min']:>12.1f} "
              f"{r['ratio']:>6.2f} {r['naive_gflops']:>11.1f} {r['memtool_gflops']:>13.1f} {r['memtool_pct_peak']:>8.0f}%")


if __name__ == "__main__":
    main()
