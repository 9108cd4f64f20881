"""Data augmentation on the device: random crop with 4-pixel zero padding plus horizontal
flip, as the official CIFAR recipes do (``RandomCrop(32, padding=4)``,
``RandomHorizontalFlip()``). On by default for cifar10, cifar100 and tiny-imagenet, off for
the MNIST family and digits (a flipped digit is another digit).

Each model draws its offsets and flips from its own generator, so augmentation is
reproducible from the model's seed and does not depend on the other models in a stack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAD = 4
AUGMENTED_DATASETS = ("cifar10", "cifar100", "tiny-imagenet")


def default_augment(dataset: str) -> bool:
    return dataset in AUGMENTED_DATASETS


def _draws(n: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    off = torch.randint(0, 2 * PAD + 1, (2, n), generator=gen, device=device)
    flip = torch.rand(n, generator=gen, device=device) < 0.5
    return off[0], off[1], flip


def crop_flip(x: torch.Tensor, gens: list, stacked: bool) -> torch.Tensor:
    """Randomly crop (after zero padding by 4) and flip every image of ``x``: (B, C, H, W),
    or (K, B, C, H, W) with ``stacked`` (model k's images drawn from ``gens[k]``)."""
    lead = x.shape[:-3]
    c, h, w = x.shape[-3:]
    flat = x.reshape(-1, c, h, w)
    b = flat.shape[0] // len(gens) if stacked else flat.shape[0]
    parts = [_draws(b, g, x.device) for g in (gens if stacked else gens[:1])]
    dy, dx, flip = (torch.cat(t) for t in zip(*parts))
    padded = F.pad(flat, (PAD, PAD, PAD, PAD))
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = torch.arange(w, device=x.device).expand(len(dx), w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + dx[:, None]  # (N, W)
    n = torch.arange(flat.shape[0], device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[n, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).reshape(*lead, c, h, w)
