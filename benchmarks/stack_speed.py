"""K adversarially trained models at once (one stacked Ensemble) against one at a time.

    python benchmarks/stack_speed.py                  # both settings, about 3 minutes on 2 cores
    python benchmarks/stack_speed.py --only mnist-mlp --repeat 3 --threads 2

Both sides call the same engine (:func:`memtool.fit`) with the same recipe, subsets and
seeds, so they do the same SGD and PGD steps and train the same models (to float
tolerance); the only difference is ``ensemble_size``: K (one stacked forward/backward pass
per step for all models) or 1 (a loop over models, each a plain ``nn.Module``, which is what
a competent user writes: data on the device, index minibatches, no DataLoader). Prints
models per minute and the ratio (median of ``--repeat`` alternating measurements).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import memtool
from memtool.estimator import plan

SETTINGS = {
    # name: dataset kwargs, recipe, models
    "mnist-mlp": (dict(name="mnist", limit=5000),
                  dict(model="mlp", hidden=256, epochs=2, batch_size=128, lr=0.1, method="pgd-at", eps=0.3,
                       pgd_steps=10), 16),
    "mnist-cnn": (dict(name="mnist", limit=1000),  # the robust study's CNN (the findings train 3 seeds stacked)
                  dict(model="cnn", hidden=256, epochs=1, batch_size=128, lr=0.05, method="pgd-at", eps=0.3,
                       pgd_steps=10), 3),
    "digits-mlp": (dict(name="digits"),
                   dict(model="mlp", hidden=128, epochs=10, batch_size=32, lr=0.1, method="pgd-at", eps=0.1,
                        pgd_steps=10), 64),
}


def _seconds_per_model(recipe, x, y, subsets, seeds, k) -> float:
    t0 = time.perf_counter()
    memtool.fit(recipe, x, y, subsets, seeds, num_classes=10, ensemble_size=k)
    return (time.perf_counter() - t0) / len(seeds)


def run(name: str, repeat: int) -> dict:
    dkw, rkw, k = SETTINGS[name]
    ds = memtool.load_dataset(**dkw)
    x, y = torch.from_numpy(ds.x_train).float() / 255, torch.from_numpy(ds.y_train)
    subsets = plan.subset_indices(len(y), 0.7, 0, range(k))
    recipe = memtool.Recipe.from_flat(**rkw)
    seeds = list(range(k))
    times = [(_seconds_per_model(recipe, x, y, subsets, seeds, 1), _seconds_per_model(recipe, x, y, subsets, seeds, k))
             for _ in range(repeat)]
    single, stacked = np.median(times, axis=0)
    return {"setting": name, "k": k, "single_per_min": 60 / single, "stacked_per_min": 60 / stacked,
            "ratio": single / stacked}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=list(SETTINGS), action="append")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch threads {torch.get_num_threads()}")
    print(f"{'setting':<12} {'K':>3} {'one at a time/min':>18} {'stacked/min':>12} {'ratio':>6}")
    for name in a.only or SETTINGS:
        r = run(name, a.repeat)
        print(f"{name:<12} {r['k']:>3} {r['single_per_min']:>18.1f} {r['stacked_per_min']:>12.1f} {r['ratio']:>6.2f}",
              flush=True)


if __name__ == "__main__":
    main()
