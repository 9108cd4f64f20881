"""The training recipe: everything that decides how one model is trained, with units.

One :class:`Recipe` serves every job (an estimator trial, `memtool train`, the findings'
retraining, BAT): model, optimizer, schedule, epochs, batch size, learning rate, weight
decay, augmentation, precision and the method (:mod:`memtool.methods`, with its own
hyper-parameters). The seeding rule (:func:`stream`) is here too: everything random about a
model derives from its own seed alone.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch

from .config import check_choice, check_int, check_number, setting
from .methods import METHODS, Method, build_method, method_fields, method_from_dict
from .models import (HIDDEN_TAKERS, ModelSpecError, check_factory, check_model_spec, check_output, create_model,
                     model_record, parse_model_kwargs, registered_factory, resolve_model, spec_of, SPEC)

SCHEDULES = ("constant", "linear", "onecycle", "multistep", "cosine")
OPTIMIZERS = ("sgd", "adam", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Recipe:
    model: str = setting("mlp", "a registered model (mlp | cnn | preact-resnet18 | wrn-D-W, e.g. wrn-28-10) or your "
                                "own factory MODULE:FUNCTION, build(in_shape, num_classes) -> nn.Module")
    model_kwargs: dict = setting(None, "JSON object of keyword arguments for the model factory", factory=dict)
    hidden: int = setting(256, "hidden width of the MLP / of the CNN's fully connected layer")
    epochs: int = setting(20, "passes over the model's own training subset")
    batch_size: int = setting(128, "samples per SGD step, per model")
    optimizer: str = setting("sgd", "sgd (Nesterov momentum) | adam | adamw (decoupled weight decay)",
                             choices=OPTIMIZERS)
    lr: float = setting(0.1, "peak learning rate")
    momentum: float = setting(0.9, "SGD Nesterov momentum (ignored by adam)")
    weight_decay: float = setting(0.0, "L2 coefficient (0 lets rare samples be memorized)")
    schedule: str | None = setting(None, "learning-rate schedule: constant | linear (decay to 0) | onecycle (20 %% "
                                         "warm-up, linear decay) | multistep (x0.1 at 50 %% and 75 %%) | cosine (to 0); default: "
                                         "constant for standard training (its models must fit their subsets to "
                                         "memorize), onecycle for the adversarial methods (PGD-AT at a constant "
                                         "lr 0.1 does not train reliably)", choices=SCHEDULES)
    augment: bool | None = setting(None, "random crop (4-pixel padding) + horizontal flip; default: on for "
                                         "cifar10 / cifar100 / tiny-imagenet, off otherwise")
    precision: str = setting("fp32", "fp32 | bf16 (autocast, for GPUs) | fp16 (autocast with a gradient scaler, "
                                     "CUDA)", choices=PRECISIONS)
    label_smoothing: float = setting(0.0, "label smoothing of every cross-entropy the method trains with")
    drop_last: bool = setting(False, "skip each epoch's last batch when it is partial (it has m mod batch-size "
                                     "samples: a batch of 2 is a full step of 2 samples' gradient)")
    method: Method = setting(None, "training method", cli=False, factory=Method)
    # the factory of a user's model (never serialized: run.json keeps ``model`` and its digest)
    factory: object = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.method, Method):
            object.__setattr__(self, "method", method_from_dict(self.method))
        if self.schedule is None:
            object.__setattr__(self, "schedule", default_schedule(self.method))
        if callable(self.model):  # Recipe(model=build): the factory itself
            check_factory(self.model)
            object.__setattr__(self, "factory", self.model)
            object.__setattr__(self, "model", spec_of(self.model))
        check_model_spec(self.model)
        object.__setattr__(self, "model_kwargs", parse_model_kwargs(self.model_kwargs))
        check_number("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        if self.label_smoothing and not self.method.smooths:
            raise ValueError(f"label_smoothing applies to standard, pgd-at, gairat, bat and registered methods, not to "
                             f"{self.method.name} (its loss is the official one); use 0")
        for name in ("hidden", "epochs", "batch_size"):
            check_int(name, getattr(self, name), 1)
        check_number("lr", self.lr, 0, low_open=True)
        check_number("momentum", self.momentum, 0, 1, high_open=True)
        check_number("weight_decay", self.weight_decay, 0)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.drop_last, bool):
            raise ValueError(f"drop_last must be true or false, got {self.drop_last!r}")
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
        """The recipe as run.json keeps it; fields added after runs were made (model_kwargs,
        label_smoothing, drop_last) only when set, so those runs reopen and compare unchanged."""
        d = asdict(replace(self, factory=None))
        del d["factory"]
        for name, unset in (("model_kwargs", {}), ("label_smoothing", 0.0), ("drop_last", False)):
            if d[name] == unset:
                del d[name]
        d["method"] = self.method.to_dict()
        return d

    def with_factory(self, factory) -> "Recipe":
        """This recipe (e.g. read back from a run) with the user's model ``factory`` attached;
        the factory's spec must be the recipe's (the digest is checked where a model is built
        against a record: :func:`check_digest`)."""
        if factory is None:
            return self
        spec = spec_of(factory)
        if spec != self.model:
            raise ModelSpecError(f"the model given ({spec}) is not the one this run or checkpoint was made with "
                                 f"({self.model}); nothing was changed")
        return replace(self, factory=factory)

    def build(self, in_shape, num_classes: int):
        """A fresh model of this recipe for inputs of ``in_shape`` (user code only through the
        attached factory: a MODULE:FUNCTION spec is never imported here)."""
        factory = self.factory or registered_factory(self.model)
        kwargs = {"hidden": self.hidden, **self.model_kwargs} if self.model in HIDDEN_TAKERS else self.model_kwargs
        return create_model(factory, in_shape, num_classes, **kwargs)

    def for_dataset(self, dataset: str) -> "Recipe":
        """The recipe with its dataset defaults resolved where unset: ``augment`` and the
        method's eps (:func:`memtool.datasets.standard_eps`)."""
        from .augment import default_augment

        augment = default_augment(dataset) if self.augment is None else self.augment
        return replace(self, augment=augment, method=self.method.for_dataset(dataset))

    def model_record(self, in_shape, num_classes: int) -> dict:
        """Build the model once, check its output shape, and return what runs and checkpoints
        record of it (spec, structural digest, parameter count): before any training, so a
        factory that fails does so at once."""
        net = self.build(in_shape, num_classes)
        check_output(net, self.model, in_shape, num_classes)
        return model_record(net, self.model)

    # ------------------------------------------------------------------ use

    def lr_at(self, step: int, total: int) -> float:
        return lr_at(self.schedule, self.lr, step, total)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """The optimizer over ``params``; elementwise, so over stacked tensors it is exactly
        one optimizer per model."""
        fused = True
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, fused=fused)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, fused=fused)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                               nesterov=self.momentum > 0, fused=fused)

    def batches(self, n_train: int) -> int:
        """SGD steps per epoch on ``n_train`` samples."""
        if self.drop_last and n_train >= self.batch_size:
            return n_train // self.batch_size
        return math.ceil(n_train / self.batch_size)

    def steps(self, n_train: int) -> int:
        return self.epochs * self.batches(n_train)


def user_settings(settings: dict) -> dict:
    """``settings`` (what a user passed to a command or an API call) with the model and the
    dataset they named resolved: MODULE:FUNCTION is imported here, and only here, because the
    user named it (:func:`memtool.userdata.resolve_dataset` for data). A spec read back from a
    run directory never goes through this."""
    from .userdata import user_dataset

    from .models import import_spec

    settings = user_dataset(settings)
    if isinstance(settings.get("train_fn"), str):
        settings = {**settings, "train_fn": import_spec(settings["train_fn"], "--train-fn")}
    model = settings.get("model")
    if not isinstance(model, str) or not SPEC.fullmatch(model):  # None, a factory, or a registered name
        return settings
    return {**settings, "model": resolve_model(model)}


class WithRecipe:
    """Mixin of the job configs that hold a ``recipe`` (through :class:`DataJob`): the
    recipe coerced from a dict and its augmentation resolved for ``self.dataset``; flat
    construction (``from_kwargs``) and dict round trips."""

    def _resolve_recipe(self) -> None:
        recipe = self.recipe if isinstance(self.recipe, Recipe) else Recipe.from_dict(self.recipe)
        object.__setattr__(self, "recipe", recipe.for_dataset(self.dataset))

    @classmethod
    def from_kwargs(cls, *, also=(), **kw):
        """From flat settings: the config's own fields plus the recipe's and its method's
        (``recipe=`` may give a base recipe that the flat ones override). ``also``: names the
        caller took out before (execution settings), listed as valid in the error."""
        own = {f.name for f in fields(cls) if f.init and f.compare} - {"recipe"}
        unknown = set(kw) - own - flat_fields() - {"recipe"}
        if unknown:
            valid = sorted(own | flat_fields() | set(also))
            hints = ["quiet=True is progress=False" if u == "quiet" else f"{u}: did you mean {close[0]}?"
                     for u in sorted(unknown) for close in [difflib.get_close_matches(u, valid, 1)]
                     if u == "quiet" or close]
            raise ValueError(f"unknown {cls.__name__} setting(s) {sorted(unknown)}"
                             f"{' (' + '; '.join(hints) + ')' if hints else ''}; valid: {valid}")
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

    dataset: str = setting("mnist", "a registered name (`memtool datasets` lists them), npz:PATH, imagefolder:DIR "
                                    "(DIR/train, DIR/test) or MODULE:FUNCTION returning arrays")
    limit: int | None = setting(None, "keep the first N training samples")
    label_noise: float = setting(0.0, "fraction of training labels flipped (seeded by --seed)")

    def _check_data(self) -> None:
        if not isinstance(self.dataset, str):  # an ArrayData or a tuple of arrays, kept in this process
            from .userdata import resolve_dataset

            object.__setattr__(self, "dataset", resolve_dataset(self.dataset))
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
    return {f.name for f in fields(Recipe) if f.compare} | {p for m in METHODS for p in method_fields(m)}


def lr_at(schedule: str, lr: float, step: int, total: int) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of ``total``: constant; linear decay
    to 0; onecycle (linear warm-up over the first 20 %, then linear decay to 0); multistep
    (x0.1 at 50 % and again at 75 %); cosine (half a cosine from lr to 0)."""
    frac = step / max(total, 1)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * frac))
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
