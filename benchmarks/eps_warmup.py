"""Which default eps warm-up lets PGD-AT leave chance level? (issue: `memtool train --method
pgd-at --dataset mnist --model cnn --eps 0.3` stayed at 25 % clean accuracy without one.)

    python benchmarks/eps_warmup.py                       # about 40 minutes on one core
    python benchmarks/eps_warmup.py --warmups 0 0.3 --epochs 3 --limit 10000

Trains the README's command (default recipe: SGD Nesterov lr 0.1 constant, batch 128,
PGD-10 at eps 0.3 in training) on the first ``--limit`` MNIST training samples for
``--epochs`` epochs, once per eps warm-up (fraction of the training over which eps ramps
linearly from 0), and prints the last epoch's clean and PGD-20 accuracy on the first 1000
test samples. Runs go to runs/bench-eps-warmup/ and resume if interrupted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import memtool


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmups", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit", type=int, default=10000)
    p.add_argument("--model", default="cnn")
    p.add_argument("--lr", type=float, default=memtool.Recipe.lr)
    p.add_argument("--schedule", default=memtool.Recipe.schedule)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench-eps-warmup")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for w in a.warmups:
        out = Path(a.out) / f"{a.model}-e{a.epochs}-n{a.limit}-{a.schedule}-lr{a.lr:g}-s{a.seed}-w{w:g}"
        memtool.train(out=out, dataset="mnist", model=a.model, method="pgd-at", eps=0.3, eps_warmup=w,
                      epochs=a.epochs, limit=a.limit, lr=a.lr, schedule=a.schedule, seed=a.seed, progress=False)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        rows.append((w, log))
        print(f"{a.schedule} lr {a.lr:g} seed {a.seed} eps_warmup {w:4.2f}: " + "  ".join(f"ep{r['epoch']} clean {r['clean_acc']:.3f} pgd20 {r['robust_acc']:.3f}"
                                                   for r in log) + f"  ({sum(r['cpu_s'] for r in log):.0f} CPU s)",
              flush=True)
    return rows


if __name__ == "__main__":
    main()
