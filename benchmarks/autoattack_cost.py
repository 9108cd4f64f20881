"""Where standard AutoAttack's CPU time goes: APGD-CE, APGD-T, FAB-T and Square on one trained
model, each attack's time and the robust accuracy after it (pyautoattack's own log).

    OMP_NUM_THREADS=1 python benchmarks/autoattack_cost.py runs/mnist/bat_comparison/models/pgd-at-s0 --n 100

Each later attack runs only on the samples the earlier ones did not fool, so on a robust model
the cheap-looking Square (forward passes only, 5,000 queries) runs on most samples. Results:
benchmarks/README.md (robust study).
"""

from __future__ import annotations

import argparse
import logging
import re
import time

import torch

from memtool.checkpoints import load_checkpoint, model_from_checkpoint
from memtool.datasets import load_dataset


class _Marks(logging.Handler):
    """Collects (attack, robust accuracy, CPU seconds) from pyautoattack's 'robust accuracy after' lines."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.rows = []

    def emit(self, record):
        m = re.match(r"robust accuracy after (\S+): ([\d.]+)%", record.getMessage())
        if m:
            self.rows.append((m[1], float(m[2]), time.process_time()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a memtool train output directory")
    p.add_argument("--n", type=int, default=100, help="first N test samples")
    p.add_argument("--eps", type=float, default=None, help="default: the model's training eps")
    a = p.parse_args(argv)
    from pyautoattack import AutoAttack

    ck = load_checkpoint(a.model)
    model = model_from_checkpoint(ck)
    cfg = ck["settings"]["config"]
    eps = a.eps if a.eps is not None else cfg["recipe"]["method"]["eps"]
    ds = load_dataset(cfg["dataset"])
    x = torch.from_numpy(ds.x_test[: a.n]).float().div(255)  # (N, C, H, W), as memtool evaluate feeds it
    y = torch.as_tensor(ds.y_test[: a.n]).long()
    log = logging.getLogger("auto-attack")
    marks = _Marks()
    log.addHandler(marks)
    log.setLevel(logging.DEBUG)
    t0 = time.process_time()
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    AutoAttack(model, eps=eps, norm="Linf", version="standard", seed=0).run_standard_evaluation(x, y, batch_size=len(x))
    print(f"{a.model}, first {a.n} test samples, eps {eps:g}, one torch thread: clean {100 * clean:.1f} %\n")
    print("| attack | robust accuracy after it | CPU s | share |\n|---|---:|---:|---:|")
    total, prev = marks.rows[-1][2] - t0, t0
    for name, acc, t in marks.rows:
        print(f"| {name} | {acc:.1f} % | {t - prev:.1f} | {100 * (t - prev) / total:.0f} % |")
        prev = t
    print(f"| all | | {total:.1f} | |")


if __name__ == "__main__":
    main()
