"""Training checkpoints: one dict of tensors and plain values per run, no pickled objects.

``OUT/checkpoint.pt`` holds ``model`` (state_dict), ``optimizer`` (state_dict), ``epoch``
(finished epochs), ``settings`` (the run's config with its recipe, dataset facts, digests of
the excluded ids and weights: see :mod:`memtool.training`) and ``log``. It is written
atomically (:func:`memtool.rundir.atomic_write`) and read with ``torch.load(...,
weights_only=True)``; the model is rebuilt from the stored recipe with
:func:`memtool.models.build_model`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .models import build_model
from .rundir import atomic_write

CHECKPOINT = "checkpoint.pt"


def checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/checkpoint.pt`` when ``path`` is a directory."""
    p = Path(path)
    return p / CHECKPOINT if p.is_dir() else p


def save_checkpoint(ck: dict, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(ck, f))


def load_checkpoint(path: str | os.PathLike, device="cpu") -> dict:
    """The checkpoint dict of a training run (``path``: its directory or the .pt file)."""
    p = checkpoint_path(path)
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p} (expected a `memtool train` output directory or .pt file)")
    ck = torch.load(p, map_location=device, weights_only=True)
    if "settings" not in ck:
        raise ValueError(f"{p} is a checkpoint of an older memtool (format {ck.get('format')!r}); "
                         "train it again with this version")
    return ck


def _best(ck: dict) -> bool:
    return ck["settings"]["config"].get("select", "last") == "best-pgd" and "best_model" in ck


def selected_epoch(ck: dict, last: bool = False) -> tuple[int, str]:
    """The epoch whose weights :func:`model_from_checkpoint` returns, and the rule that chose it:
    the last epoch, or with ``select: best-pgd`` the best on the held-out validation samples
    (``last``: the last epoch whatever the rule)."""
    cfg = ck["settings"]["config"]
    if _best(ck) and not last:
        return int(ck["best_epoch"]), (f"best PGD-{cfg['eval_steps']} accuracy on {cfg['val_samples']} held-out "
                                        f"training samples (epoch {ck['best_epoch']} of {ck['epoch']})")
    return int(ck["epoch"]), f"last epoch ({ck['epoch']})"


def model_from_checkpoint(ck: dict, device="cpu", last: bool = False) -> torch.nn.Module:
    """The model of the selected epoch (:func:`selected_epoch`; ``last``: of the last epoch)."""
    recipe, ds = ck["settings"]["config"]["recipe"], ck["settings"]["dataset"]
    model = build_model(recipe["model"], ds["image_shape"], ds["num_classes"], recipe["hidden"])
    model.load_state_dict(ck["best_model"] if _best(ck) and not last else ck["model"])
    return model.to(device).eval()


def load_model(path: str | os.PathLike, device="cpu") -> torch.nn.Module:
    """The trained nn.Module (eval mode; takes images in [0, 1]) from ``path``, a `memtool
    train` output directory or its checkpoint.pt; loaded with ``weights_only=True``."""
    return model_from_checkpoint(load_checkpoint(path, device), device)
