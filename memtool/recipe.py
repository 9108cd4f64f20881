"""The training recipe: everything that decides how one model is trained, with units."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .attacks.pgd import default_step_size

SCHEDULES = ("constant", "linear", "onecycle", "multistep")
OPTIMIZERS = ("sgd", "adam")
TRAIN_METHODS = ("standard", "pgd-at")


@dataclass(frozen=True)
class TrainRecipe:
    model: str = "mlp"  # see memtool.models.MODELS
    hidden: int = 256  # hidden width of the MLP / the CNN's fully connected layer
    epochs: int = 20  # passes over the model's own training subset
    batch_size: int = 128  # samples per SGD step, per model
    optimizer: str = "sgd"  # sgd (Nesterov momentum) | adam
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # SGD (Nesterov) momentum; ignored by adam
    weight_decay: float = 0.0  # L2 coefficient; 0 lets rare samples be memorized
    schedule: str = "constant"  # one of SCHEDULES; see lr_at
    precision: str = "fp32"  # fp32 | bf16 (autocast; for GPUs)
    train: str = "standard"  # standard | pgd-at (every model trained adversarially)
    eps: float = 0.3  # L-inf radius for pgd-at and for robust correctness, on the [0, 1] scale
    pgd_steps: int = 10  # PGD steps in training
    pgd_step_size: float | None = None  # default 2.5 * eps / pgd_steps

    def __post_init__(self):
        for name in ("epochs", "batch_size", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.train not in TRAIN_METHODS:
            raise ValueError(f"train must be one of {TRAIN_METHODS}, got {self.train!r}")

    @property
    def step_size(self) -> float:
        return self.pgd_step_size if self.pgd_step_size is not None else default_step_size(self.eps, self.pgd_steps)

    def to_dict(self) -> dict:
        return asdict(self)

    def lr_at(self, step: int, total: int) -> float:
        return lr_at(self.schedule, self.lr, step, total)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """The optimizer over ``params``; elementwise, so over stacked tensors it is exactly
        one optimizer per model."""
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, fused=True)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                               nesterov=self.momentum > 0, fused=True)

    def steps(self, n_train: int) -> int:
        return self.epochs * math.ceil(n_train / self.batch_size)


def lr_at(schedule: str, lr: float, step: int, total: int) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of ``total``: constant; linear decay
    to 0; onecycle (linear warm-up over the first 20 %, then linear decay to 0); multistep
    (x0.1 at 50 % and again at 75 %)."""
    frac = step / max(total, 1)
    if schedule == "linear":
        return lr * (1.0 - frac)
    if schedule == "onecycle":
        return lr * (frac / 0.2 if frac < 0.2 else (1.0 - frac) / 0.8)
    if schedule == "multistep":
        return lr * (0.01 if frac >= 0.75 else 0.1 if frac >= 0.5 else 1.0)
    return lr


def trial_seed(seed: int, trial_id: int) -> int:
    """The seed of one trial's model init and minibatch order (independent of the batch it runs in)."""
    return int(np.random.SeedSequence([seed, trial_id]).generate_state(1)[0])


def init_model(build, seed: int) -> torch.nn.Module:
    """Build a model with the global torch RNG seeded, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def epoch_orders(n: int, seed: int, epochs: int) -> torch.Tensor:
    """(epochs, n) permutations: the minibatch order of one model, from its own generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) for _ in range(epochs)])
