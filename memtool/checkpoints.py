"""Training checkpoints: one dict of tensors and plain values per run, no pickled objects.

``OUT/checkpoint.pt`` holds ``model`` (state_dict), ``optimizer`` (state_dict), ``epoch``
(finished epochs), ``settings`` (the run's config with its recipe, dataset facts, digests of
the excluded ids and weights: see :mod:`memtool.training`) and ``log``. It is written
atomically (:func:`memtool.rundir.atomic_write`) and read with ``torch.load(...,
weights_only=True)``; the model is rebuilt from the stored recipe's model spec (a
registered name; user code only when the caller names its factory, ``model=``) and checked
against the stored ``model_record`` (structural digest).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .models import check_model_record, model_record
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
    try:
        ck = torch.load(p, map_location=device, weights_only=True)
    except Exception as e:  # weights_only refused a pickled object, or the file is not a checkpoint
        raise ValueError(f"{p} cannot be loaded as a checkpoint of tensors and plain values ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); memtool never unpickles other objects") from None
    if not isinstance(ck, dict) or "settings" not in ck:
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


def model_from_checkpoint(ck: dict, device="cpu", last: bool = False, model=None, where="the checkpoint") -> torch.nn.Module:
    """The model of the selected epoch (:func:`selected_epoch`; ``last``: of the last epoch).
    ``model``: the factory of a user's model (the checkpoint names it, memtool does not import it)."""
    from .recipe import Recipe

    recipe, ds = ck["settings"]["config"]["recipe"], ck["settings"]["dataset"]
    r = Recipe(**{k: recipe[k] for k in ("model", "model_kwargs", "hidden") if k in recipe}).with_factory(model)
    net = r.build(ds["image_shape"], ds["num_classes"])
    check_model_record(ck.get("model_record"), model_record(net, r.model), where)
    net.load_state_dict(ck["best_model"] if _best(ck) and not last else ck["model"])
    return net.to(device).eval()


def load_model(path: str | os.PathLike, device="cpu", model=None) -> torch.nn.Module:
    """The trained nn.Module (eval mode) from ``path``, a `memtool train` output directory or
    its checkpoint.pt; loaded with ``weights_only=True``. ``model``: your factory (or
    MODULE:FUNCTION), when the checkpoint was trained with your own model."""
    from .models import resolve_model

    return model_from_checkpoint(load_checkpoint(path, device), device, model=None if model is None else
                                 resolve_model(model), where=checkpoint_path(path))
