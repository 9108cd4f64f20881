"""Compare the two AutoAttack packages on one small trained model.

    python benchmarks/autoattack_compare.py [--model DIR] [--n 200] [--eps 0.3] [--threads 2]

Without --model it first trains a small PGD-AT model on MNIST (mlp, 2000 training samples)
into runs/bench-aa-model. Runs AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square) from
``pyautoattack`` (the authors' fra31/auto-attack code on PyPI) and from ``torchattacks``
(a re-implementation) on the first N test samples, and prints robust accuracy, time and
per-sample agreement, with PGD-20 as the reference point. Last result: see
benchmarks/adversarial_results.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import memtool
from memtool.attacks import build_attack


def robust_flags(model, attack, x, y) -> tuple[np.ndarray, float]:
    t0 = time.time()
    torch.manual_seed(0)
    x_adv = attack(model, x, y)
    with torch.no_grad():
        ok = (model(x_adv).argmax(1) == y).numpy()
    return ok, time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a `memtool train` output directory")
    p.add_argument("--n", type=int, default=200, help="test samples")
    p.add_argument("--eps", type=float, default=None, help="default: the model's training eps")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.model is None:
        a.model = "runs/bench-aa-model"
        memtool.train(out=a.model, method="pgd-at", dataset="mnist", model="mlp", limit=2000, epochs=5, batch_size=32,
                      eps=0.1, eval_samples=500, progress=False)
    model = memtool.load_model(a.model)
    for q in model.parameters():
        q.requires_grad_(False)
    ck = torch.load(f"{a.model}/checkpoint.pt", weights_only=True)
    cfg = ck["settings"]["config"]
    eps = a.eps if a.eps is not None else cfg["recipe"]["method"]["eps"]
    ds = memtool.load_dataset(cfg["dataset"])
    x = torch.from_numpy(ds.x_test[: a.n]).float() / 255
    y = torch.from_numpy(ds.y_test[: a.n])
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).numpy()
    print(f"model {a.model} ({cfg['recipe']['method']['name']}, {cfg['recipe']['model']}), {cfg['dataset']}, "
          f"eps {eps:g}, n {a.n}, torch threads {a.threads}")
    print(f"{'attack':<26} {'robust acc':>10} {'time (s)':>9}")
    print(f"{'clean':<26} {clean.mean():>10.3f} {0:>9.1f}")
    rows = {}
    for label, attack in [("pgd20", build_attack("pgd20", eps)),
                          ("autoattack / pyautoattack", build_attack("autoattack", eps, backend="pyautoattack")),
                          ("autoattack / torchattacks", build_attack("autoattack", eps, backend="torchattacks"))]:
        ok, t = robust_flags(model, attack, x, y)
        rows[label] = ok
        print(f"{label:<26} {ok.mean():>10.3f} {t:>9.1f}")
    pa, ta = rows["autoattack / pyautoattack"], rows["autoattack / torchattacks"]
    print(f"per-sample agreement of the two AutoAttacks: {(pa == ta).mean():.3f} "
          f"(robust only under pyautoattack: {int((pa & ~ta).sum())}, only under torchattacks: "
          f"{int((ta & ~pa).sum())})")


if __name__ == "__main__":
    main()
