"""One training loop for standard training, PGD-AT, TRADES and MART (and later BAT).

    train(TrainConfig(method="pgd-at", dataset="mnist", model="cnn", eps=0.3), out="runs/at")

The training set lives on the device as one uint8 tensor; a minibatch is an index tensor.
The method is a per-sample loss from :data:`memtool.losses.LOSSES`; the loop reduces it with
the per-sample ``weights`` it was given (``sum w_i l_i / sum w_i``) and passes the batch's
sample ids to the loss.

The output directory::

    OUT/checkpoint.pt   model and optimizer state, epoch, config and log (written atomically
                        after every epoch; see memtool.checkpoints; memtool.load_model(OUT))
    OUT/config.json     the TrainConfig
    OUT/log.jsonl       one line per epoch: loss, clean and PGD accuracy on the first
                        eval_samples test samples, wall and CPU time

Calling :func:`train` again with the same ``out`` resumes after the last finished epoch (and
gives the same model as an uninterrupted run: minibatch orders and attack noise are seeded
per epoch); a different config is refused, naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .attacks import PGD
from .attacks.pgd import default_step_size
from .checkpoints import CHECKPOINT, load_checkpoint, load_model, save_checkpoint, write_log  # noqa: F401
from .datasets import load_dataset
from .estimator.config import diff_configs
from .estimator.store import RunMismatchError, write_json
from .losses import LOSSES, Step, weighted_mean
from .models import build_model
from .recipe import SCHEDULES, init_model, lr_at

DEFAULT_BETA = 6.0  # TRADES and MART (PAPER.md section 4; MART's official default)
_NOT_COMPARED = ("data_root",)  # where the files are does not change the results


@dataclass(frozen=True)
class TrainConfig:
    method: str = "standard"  # one of memtool.losses.LOSSES: standard | pgd-at | trades | mart
    dataset: str = "mnist"
    model: str = "cnn"  # see memtool.models.MODELS
    hidden: int = 256  # hidden width of the MLP / the CNN's fully connected layer
    eps: float = 0.3  # L-inf radius on the [0, 1] scale (training attack and per-epoch check)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05  # peak learning rate (SGD)
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "onecycle"  # constant | linear | onecycle (20 % warm-up) | multistep (x0.1 at 50 %, 75 %)
    eps_warmup: float = 0.0  # epochs over which the training eps ramps linearly from 0 to eps
    pgd_steps: int = 10  # steps of the training attack
    step_size: float | None = None  # of the training attack; None: 2.5 * eps / pgd_steps
    beta: float | None = None  # TRADES / MART trade-off; None: 6.0 for those methods
    seed: int = 0  # model init, minibatch orders, attack noise, label noise
    limit: int | None = None  # keep the first N training samples
    label_noise: float = 0.0  # fraction of training labels flipped (seeded by `seed`)
    data_root: str | None = None  # where CIFAR / Tiny ImageNet live ($MEMTOOL_DATA_ROOT)
    eval_samples: int = 1000  # first N test samples for the per-epoch clean / PGD accuracy
    eval_steps: int = 20  # PGD steps of the per-epoch robust accuracy (at eps)

    def __post_init__(self):
        if self.method not in LOSSES:
            raise ValueError(f"method must be one of {tuple(LOSSES)}, got {self.method!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("hidden", "epochs", "batch_size", "pgd_steps", "eval_samples", "eval_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("eps", "momentum", "weight_decay", "eps_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.step_size is not None and self.step_size <= 0:
            raise ValueError(f"step_size must be > 0 (or None for 2.5 * eps / pgd_steps), got {self.step_size!r}")
        if self.beta is None and self.method in ("trades", "mart"):
            object.__setattr__(self, "beta", DEFAULT_BETA)
        if self.beta is not None and self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")

    @property
    def alpha(self) -> float:
        """The training attack's step size."""
        return self.step_size if self.step_size is not None else default_step_size(self.eps, self.pgd_steps)

    def eps_at(self, epoch_frac: float) -> float:
        """The training attack's radius after ``epoch_frac`` epochs (the eps warm-up)."""
        if self.eps_warmup <= 0:
            return self.eps
        return self.eps * min(1.0, epoch_frac / self.eps_warmup)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown train setting(s) {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**d)


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 0x7EA1]).generate_state(1)[0])


def _dataset_info(ds) -> dict:
    return {"name": ds.name, "fingerprint": ds.fingerprint, "n_train": len(ds.y_train), "n_test": len(ds.y_test),
            "num_classes": ds.num_classes, "image_shape": list(ds.image_shape)}


def _weights_sha(w: np.ndarray | None) -> str | None:
    return None if w is None else hashlib.sha256(np.ascontiguousarray(w, dtype=np.float64)).hexdigest()[:16]


def _check_weights(weights, n: int) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights.detach().cpu() if torch.is_tensor(weights) else weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"weights must have one entry per training sample, shape ({n},), got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights must be finite and >= 0")
    return w


def to_float(x_u8: torch.Tensor) -> torch.Tensor:
    return x_u8.float().div_(255)


def epoch_check(model, x_u8, y, cfg: TrainConfig, batch: int = 500) -> dict:
    """Clean and PGD-``eval_steps`` accuracy (eps = cfg.eps) on the given test samples."""
    attack = PGD(eps=cfg.eps, steps=cfg.eval_steps)
    clean = rob = 0
    for i in range(0, len(y), batch):
        xb, yb = to_float(x_u8[i : i + batch]), y[i : i + batch]
        with torch.no_grad():
            clean += int((model(xb).argmax(1) == yb).sum())
        x_adv = attack(model, xb, yb)
        with torch.no_grad():
            rob += int((model(x_adv).argmax(1) == yb).sum())
    return {"clean_acc": clean / len(y), "robust_acc": rob / len(y), "eval_attack": f"pgd{cfg.eval_steps}",
            "eval_n": len(y)}


def _compare(old: dict, new: dict, what: str, out: Path) -> None:
    strip = lambda d: {k: v for k, v in d.items() if k not in _NOT_COMPARED}  # noqa: E731
    diffs = diff_configs(strip(old), strip(new))
    if diffs:
        raise RunMismatchError(f"{out} holds a training run with another {what}:\n  " + "\n  ".join(diffs)
                               + "\nUse a new --out directory, or repeat the run's settings to resume it.")


def _resume(out: Path, config: TrainConfig, info: dict, w_np, model, opt, device) -> tuple[list, int]:
    """Check that ``out`` holds this run (or nothing) and load its last state: (log, finished epochs)."""
    if (out / "config.json").exists():
        _compare(json.loads((out / "config.json").read_text()), config.to_dict(), "config", out)
    if not (out / CHECKPOINT).exists():
        return [], 0
    ck = load_checkpoint(out / CHECKPOINT, device)
    _compare(ck["config"], config.to_dict(), "config", out)
    _compare(ck["dataset"], info, "dataset", out)
    _compare({"weights": ck["weights_sha"]}, {"weights": _weights_sha(w_np)}, "set of per-sample weights", out)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    return list(ck["log"]), int(ck["epoch"])


def _train_epoch(model, opt, x, y, w, config: TrainConfig, epoch: int, progress: bool) -> float:
    """One pass over the training set in this epoch's seeded order; returns the mean batch loss."""
    loss_fn = LOSSES[config.method]
    per_epoch = math.ceil(len(y) / config.batch_size)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch_seed(config.seed, epoch)))
    order = order.to(x.device)
    model.train()
    bar = tqdm(range(per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False,
               unit="batch")
    loss_sum = torch.zeros((), device=x.device)
    for s in bar:
        ids = order[s * config.batch_size : (s + 1) * config.batch_size]
        eps = config.eps_at(epoch + s / per_epoch)
        alpha = config.alpha * (eps / config.eps if config.eps > 0 else 1.0)
        res = loss_fn(model, to_float(x[ids]), y[ids], Step(ids, epoch, eps, alpha, config))
        wb = None if w is None else w[ids]
        if res.weight is not None:
            wb = res.weight.detach() if wb is None else wb * res.weight.detach()
        loss = weighted_mean(res.per_sample, wb)
        if res.extra is not None:
            loss = loss + res.extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr_at(config.schedule, config.lr, epoch * per_epoch + s, config.epochs * per_epoch)
        opt.step()
        loss_sum += loss.detach()
        if s % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss_sum.item() / per_epoch


def train(config: TrainConfig, out: str | os.PathLike, weights=None, progress: bool = True,
          device: str = "cpu") -> torch.nn.Module:
    """Train (or resume training) the model described by ``config`` into ``out``.

    ``weights``: optional per-sample weights, one per training sample (the loss of a batch
    is ``sum w_i l_i / sum w_i``). Returns the model in eval mode."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    out, device = Path(out), torch.device(device)
    ds = load_dataset(config.dataset, config.data_root, config.limit, config.label_noise, config.seed)
    info = _dataset_info(ds)
    w_np = _check_weights(weights, info["n_train"])
    model = init_model(partial(build_model, config.model, ds.image_shape, ds.num_classes, config.hidden),
                       config.seed).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    log, start = _resume(out, config, info, w_np, model, opt, device)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config.to_dict())
    if start >= config.epochs:
        if progress:
            print(f"{out}: already trained for {start} epochs")
        return model.eval()

    # torch.tensor copies: the dataset's arrays may be read-only views of its files
    x, y = torch.tensor(ds.x_train, device=device), torch.tensor(ds.y_train, device=device)
    w = None if w_np is None else torch.as_tensor(w_np, dtype=torch.float32, device=device)
    n_eval = min(config.eval_samples, len(ds.y_test))
    xt, yt = torch.tensor(ds.x_test[:n_eval], device=device), torch.tensor(ds.y_test[:n_eval], device=device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    for epoch in range(start, config.epochs):
        t0, cpu0 = time.time(), time.process_time()
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(epoch_seed(config.seed, epoch))  # the attack noise of this epoch
            loss = _train_epoch(model, opt, x, y, w, config, epoch, progress)
            record = {"epoch": epoch + 1, "loss": loss, "train_time_s": time.time() - t0,
                      **epoch_check(model, xt, yt, config)}
        record["time_s"], record["cpu_s"] = time.time() - t0, time.process_time() - cpu0
        log.append(record)
        save_checkpoint({"format": "memtool-train/1", "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "epoch": epoch + 1, "config": config.to_dict(), "dataset": info,
                         "weights_sha": _weights_sha(w_np), "log": log,
                         "versions": {"memtool": __version__, "torch": str(torch.__version__)}}, out / CHECKPOINT)
        write_log(out, log)
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}  loss {record['loss']:.4f}  clean {record['clean_acc']:.3f}"
                       f"  {record['eval_attack']}@{config.eps:g} {record['robust_acc']:.3f}  "
                       f"(n={record['eval_n']}, {record['time_s']:.1f} s)")
    if progress:
        print(f"wrote {out / CHECKPOINT}")
    return model.eval()
