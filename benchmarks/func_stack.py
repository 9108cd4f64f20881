"""Stacked against one at a time, for any module: the hand-written ensemble (MLP, CNN), the
torch.func stack (the same MLP and CNN, and a user's BatchNorm + residual CNN), and a loop over
plain modules, in one run (issue 32).

    python benchmarks/func_stack.py                  # CPU, about 2 minutes
    python benchmarks/func_stack.py --device cuda --k 16 32 64

Each side trains K models on MNIST samples for ``--steps`` SGD steps of batch 128 (standard
training) through the engine (:func:`memtool.fit`); only how the K models are put together
differs. Prints seconds per model and the ratio one-at-a-time / stacked (> 1: stacking wins),
the median of ``--repeat`` alternating measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import memtool
from memtool import engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import mynets  # noqa: E402

MODELS = {"mlp": "mlp", "cnn": "cnn", "bn-resnet": mynets.bn_cnn}


def _seconds(recipe, x, y, subsets, k: int, func: bool, device) -> float:
    """Seconds per model; ``func``: force the torch.func stack even where the hand-written one applies."""
    with mock.patch.object(engine, "stackable", lambda m: False) if func else contextlib.nullcontext():
        t0 = time.perf_counter()
        memtool.fit(recipe, x, y, subsets, list(range(len(subsets))), num_classes=10, ensemble_size=k, device=device)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(subsets)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--k", type=int, nargs="+", default=[8])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", nargs="+", default=list(MODELS))
    a = p.parse_args(argv)
    ds = memtool.load_dataset("mnist", limit=128 * a.steps)
    x, y = torch.from_numpy(ds.x_train).float().div(255).to(a.device), torch.from_numpy(ds.y_train).to(a.device)
    print(f"device {a.device}, {torch.get_num_threads()} threads, {a.steps} steps of batch 128 per model")
    print("| model | K | one at a time (s/model) | hand-written stack | torch.func stack | ratio hand | ratio func |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in a.only:
        recipe = memtool.Recipe(model=MODELS[name], epochs=1, batch_size=128, lr=0.05)
        hand_ok = name in ("mlp", "cnn")
        for k in a.k:
            subsets = [np.arange(len(y))] * k
            runs = []
            for _ in range(a.repeat):
                single = _seconds(recipe, x, y, subsets, 1, False, a.device)
                hand = _seconds(recipe, x, y, subsets, k, False, a.device) if hand_ok else float("nan")
                func = _seconds(recipe, x, y, subsets, k, True, a.device)
                runs.append((single, hand, func))
            single, hand, func = np.median(runs, axis=0)
            print(f"| {name} | {k} | {single:.3f} | {hand:.3f} | {func:.3f} | {single / hand:.2f} | {single / func:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
