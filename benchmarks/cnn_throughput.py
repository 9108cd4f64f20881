"""Where the robust study's CPU time goes, per sample: the small CNN's input-gradient step (what
every PGD / CW / APGD iteration costs) and its forward pass (what a Square query costs), by batch
size and memory format, on one torch thread.

    OMP_NUM_THREADS=1 python benchmarks/cnn_throughput.py

Prints samples per second and the ratio to batch 128 (the training batch) in the default
(contiguous) format. Results: benchmarks/README.md (robust study).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from memtool.models import build_model


def rate(model, bs: int, grad: bool, channels_last: bool = False, n: int = 4000) -> float:
    """Samples per second of ``model`` on batches of ``bs`` random MNIST-sized inputs: the input
    gradient of the cross-entropy (``grad``) or a forward pass without autograd."""
    x, y = torch.rand(bs, 1, 28, 28), torch.randint(0, 10, (bs,))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    done, t0 = 0, time.perf_counter()
    while done < n:
        if grad:
            xx = x.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xx), y), xx)
        else:
            with torch.no_grad():
                model(x)
        done += bs
    return done / (time.perf_counter() - t0)


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), 10, 256).eval().requires_grad_(False)
    base = {g: rate(model, 128, g) for g in (True, False)}
    print("| batch | format | input-gradient samples/s | ratio | forward samples/s | ratio |")
    print("|---:|---|---:|---:|---:|---:|")
    for bs, cl in ((128, False), (256, False), (500, False), (1000, False), (128, True), (500, True)):
        g, f = (base[True], base[False]) if (bs, cl) == (128, False) else (rate(model, bs, True, cl),
                                                                            rate(model, bs, False, cl))
        fmt = "channels-last" if cl else "contiguous"
        print(f"| {bs} | {fmt} | {g:.0f} | {g / base[True]:.2f} | {f:.0f} | {f / base[False]:.2f} |")


if __name__ == "__main__":
    main()
