"""Training checkpoints: one dict of tensors and plain values per run, no pickled objects.

``OUT/checkpoint.pt`` holds ``model`` (state_dict), ``optimizer`` (state_dict), ``epoch``
(finished epochs), ``config`` (the TrainConfig as a dict), ``dataset`` (name, fingerprint,
sizes, image shape, classes), ``weights_sha`` and ``log``. It is written to a temporary name
and renamed, and read with ``torch.load(..., weights_only=True)``; the model is rebuilt from
the stored config with :func:`memtool.models.build_model`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .models import build_model

CHECKPOINT = "checkpoint.pt"


def checkpoint_path(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/checkpoint.pt`` when ``path`` is a directory."""
    p = Path(path)
    return p / CHECKPOINT if p.is_dir() else p


def save_checkpoint(ck: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(ck, tmp)
    os.replace(tmp, path)


def write_log(out: Path, log: list[dict]) -> None:
    """``out/log.jsonl``: one line per finished epoch, rewritten from the checkpoint's log."""
    tmp = out / f".log.jsonl.{os.getpid()}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in log))
    os.replace(tmp, out / "log.jsonl")


def load_checkpoint(path: str | os.PathLike, device="cpu") -> dict:
    """The checkpoint dict of a training run (``path``: its directory or the .pt file)."""
    p = checkpoint_path(path)
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p} (expected a `memtool train` output directory or .pt file)")
    return torch.load(p, map_location=device, weights_only=True)


def model_from_checkpoint(ck: dict, device="cpu") -> torch.nn.Module:
    cfg, ds = ck["config"], ck["dataset"]
    model = build_model(cfg["model"], ds["image_shape"], ds["num_classes"], cfg["hidden"])
    model.load_state_dict(ck["model"])
    return model.to(device).eval()


def load_model(path: str | os.PathLike, device="cpu") -> torch.nn.Module:
    """The trained nn.Module (eval mode; takes images in [0, 1]) from ``path``, a `memtool
    train` output directory or its checkpoint.pt; loaded with ``weights_only=True``."""
    return model_from_checkpoint(load_checkpoint(path, device), device)
