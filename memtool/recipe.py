"""The training recipe: everything that decides how one model is trained, with units.

One :class:`Recipe` serves every job (an estimator trial, `memtool train`, the findings'
retraining, BAT): model, optimizer, schedule, epochs, batch size, learning rate, weight
decay, augmentation, precision and the method (:mod:`memtool.methods`, with its own
hyper-parameters). The seeding rule (:func:`stream`) is here too: everything random about a
model derives from its own seed alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch

from .config import check_choice, check_int, check_number, setting
from .methods import METHODS, Method, build_method, method_fields, method_from_dict
from .models import check_model_name

SCHEDULES = ("constant", "linear", "onecycle", "multistep")
OPTIMIZERS = ("sgd", "adam")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Recipe:
    model: str = setting("mlp", "mlp | cnn | preact-resnet18 | wrn-D-W (e.g. wrn-28-10)")
    hidden: int = setting(256, "hidden width of the MLP / of the CNN's fully connected layer")
    epochs: int = setting(20, "passes over the model's own training subset")
    batch_size: int = setting(128, "samples per SGD step, per model")
    optimizer: str = setting("sgd", "sgd (Nesterov momentum) | adam", choices=OPTIMIZERS)
    lr: float = setting(0.1, "peak learning rate")
    momentum: float = setting(0.9, "SGD Nesterov momentum (ignored by adam)")
    weight_decay: float = setting(0.0, "L2 coefficient (0 lets rare samples be memorized)")
    schedule: str | None = setting(None, "learning-rate schedule: constant | linear (decay to 0) | onecycle (20 %% "
                                         "warm-up, linear decay) | multistep (x0.1 at 50 %% and 75 %%); default: "
                                         "constant for standard training (its models must fit their subsets to "
                                         "memorize), onecycle for the adversarial methods (PGD-AT at a constant "
                                         "lr 0.1 does not train reliably)", choices=SCHEDULES)
    augment: bool | None = setting(None, "random crop (4-pixel padding) + horizontal flip; default: on for "
                                         "cifar10 / cifar100 / tiny-imagenet, off otherwise")
    precision: str = setting("fp32", "fp32 | bf16 (autocast, for GPUs)", choices=PRECISIONS)
    method: Method = setting(None, "training method", cli=False, factory=Method)

    def __post_init__(self):
        if not isinstance(self.method, Method):
            object.__setattr__(self, "method", method_from_dict(self.method))
        if self.schedule is None:
            object.__setattr__(self, "schedule", default_schedule(self.method))
        check_model_name(self.model)
        for name in ("hidden", "epochs", "batch_size"):
            check_int(name, getattr(self, name), 1)
        check_number("lr", self.lr, 0, low_open=True)
        check_number("momentum", self.momentum, 0, 1, high_open=True)
        check_number("weight_decay", self.weight_decay, 0)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("precision", self.precision, PRECISIONS)
        if self.augment is not None and not isinstance(self.augment, bool):
            raise ValueError(f"augment must be true, false or None (dataset default), got {self.augment!r}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_flat(cls, **kw) -> "Recipe":
        """From flat settings: the recipe's fields, ``method`` (a name) and the method's own
        fields (``eps``, ``beta``, ...); a setting the method does not take is an error."""
        own = {f.name for f in fields(cls)} - {"method"}
        method = kw.pop("method", "standard")
        params = {k: kw.pop(k) for k in list(kw) if k not in own}
        if isinstance(method, Method):
            method = replace(method, **params) if params else method
        else:
            method = build_method(method, **params)
        return cls(method=method, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        d = dict(d)
        return cls(method=method_from_dict(d.pop("method", "standard")), **d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["method"] = self.method.to_dict()
        return d

    def for_dataset(self, dataset: str) -> "Recipe":
        """The recipe with its dataset defaults resolved where unset: ``augment`` and the
        method's eps (:func:`memtool.datasets.standard_eps`)."""
        from .augment import default_augment

        augment = default_augment(dataset) if self.augment is None else self.augment
        return replace(self, augment=augment, method=self.method.for_dataset(dataset))

    # ------------------------------------------------------------------ use

    def lr_at(self, step: int, total: int) -> float:
        return lr_at(self.schedule, self.lr, step, total)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """The optimizer over ``params``; elementwise, so over stacked tensors it is exactly
        one optimizer per model."""
        fused = True
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, fused=fused)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                               nesterov=self.momentum > 0, fused=fused)

    def steps(self, n_train: int) -> int:
        return self.epochs * math.ceil(n_train / self.batch_size)


class WithRecipe:
    """Mixin of the job configs that hold a ``recipe`` (through :class:`DataJob`): the
    recipe coerced from a dict and its augmentation resolved for ``self.dataset``; flat
    construction (``from_kwargs``) and dict round trips."""

    def _resolve_recipe(self) -> None:
        recipe = self.recipe if isinstance(self.recipe, Recipe) else Recipe.from_dict(self.recipe)
        object.__setattr__(self, "recipe", recipe.for_dataset(self.dataset))

    @classmethod
    def from_kwargs(cls, **kw):
        """From flat settings: the config's own fields plus the recipe's and its method's
        (``recipe=`` may give a base recipe that the flat ones override)."""
        own = {f.name for f in fields(cls)} - {"recipe"}
        unknown = set(kw) - own - flat_fields() - {"recipe"}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} setting(s) {sorted(unknown)}; valid: {sorted(own | flat_fields())}")
        base = kw.pop("recipe", None)
        flat = {k: kw.pop(k) for k in list(kw) if k not in own}
        if base is not None:
            flat = {**base.to_dict(), **flat, "method": flat.get("method", base.method)}
        return cls(recipe=Recipe.from_flat(**flat), **kw)

    @classmethod
    def from_dict(cls, d: dict):
        d = dict(d)
        return cls(recipe=Recipe.from_dict(d.pop("recipe", {})), **d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recipe"] = self.recipe.to_dict()
        return d


@dataclass(frozen=True)
class DataJob(WithRecipe):
    """The data a job trains on: the first fields of EstimateConfig, TrainConfig and
    ProxiesConfig (each subclass's ``__post_init__`` calls :meth:`_check_data`)."""

    dataset: str = setting("mnist", "dataset name (`memtool datasets` lists them)")
    limit: int | None = setting(None, "keep the first N training samples")
    label_noise: float = setting(0.0, "fraction of training labels flipped (seeded by --seed)")

    def _check_data(self) -> None:
        check_int("limit", self.limit, 2, optional=True)
        check_number("label_noise", self.label_noise, 0, 1, high_open=True)


def flat_recipe(recipe: Recipe) -> dict:
    """The recipe as flat settings (:meth:`Recipe.from_flat` takes them back): its fields,
    ``method`` by name and the method's parameters."""
    d = recipe.to_dict()
    method = d.pop("method")
    return {**d, "method": method.pop("name"), **method}


def default_schedule(method: Method) -> str:
    """constant for standard training, where memorization needs models that fit their subsets
    (the one-cycle schedule left MNIST MLPs at 0.983 own-subset accuracy and the planted-noise
    AUROC at 0.66, against 0.998 and 0.94 at a constant lr); onecycle for the adversarial
    methods (benchmarks/eps_warmup.py)."""
    return "onecycle" if method.adversarial else "constant"


def flat_fields() -> set[str]:
    """Every name :meth:`Recipe.from_flat` understands."""
    return {f.name for f in fields(Recipe)} | {p for m in METHODS for p in method_fields(m)}


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


# ----------------------------------------------------------------------------- seeding

# Streams of one model's randomness: each (seed, stream, epoch) gives an independent seed.
INIT, ORDER, NOISE, EVAL = 0, 1, 2, 3


def stream(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(2, np.uint64)[0] >> 1)


def trial_seed(seed: int, trial_id: int) -> int:
    """The model seed of estimator trial ``trial_id`` of a run with plan seed ``seed``."""
    return int(np.random.SeedSequence([seed, trial_id]).generate_state(1)[0])


def init_model(build, seed: int) -> torch.nn.Module:
    """Build a model with the global torch RNG seeded, leaving the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream(seed, INIT))
        return build()


def epoch_order(m: int, seed: int, epoch: int) -> torch.Tensor:
    """The minibatch order (a permutation of the model's m subset positions) of one epoch."""
    return torch.randperm(m, generator=torch.Generator().manual_seed(stream(seed, ORDER, epoch)))


def noise_generator(seed: int, epoch: int, device) -> torch.Generator:
    """The generator of one model's augmentation and attack noise in one epoch."""
    return torch.Generator(device=device).manual_seed(stream(seed, NOISE, epoch))
