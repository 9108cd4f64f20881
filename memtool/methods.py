"""Training methods as configured objects: standard, PGD-AT, TRADES, MART, GAIRAT and BAT.

A method is a frozen dataclass holding its own hyper-parameters; its :meth:`Method.loss`
returns per-sample losses for one batch, and the engine (:mod:`memtool.engine`) reduces them
with per-sample weights as ``sum_i w_i l_i / sum_i w_i`` per model. ``batch`` tells the method
the ids of the samples in the batch (positions in the training set: the hook BAT uses), how
far training has progressed (for warm-ups) and each model's random generator.

Every formula works on a leading model axis: ``model`` is one ``nn.Module`` taking
(B, C, H, W), or a stacked :class:`memtool.ensemble.Ensemble` taking (K, B, C, H, W) and
returning (K, B, classes); the per-sample losses are then (K, B). Random draws go through
``batch`` (one generator per model), so model k's result is the same whether it was trained
alone or stacked with others.

**BatchNorm and the training attack.** memtool attacks in eval mode by default
(``attack_bn="eval"``): the adversarial example is computed against the network with its
running statistics, i.e. the function that is evaluated at test time, the attack's forward
passes cannot disturb the running statistics, and it is what the official TRADES and MART
code does, so all baselines share it. ``attack_bn="train"`` attacks with batch statistics as
Madry et al. and Rice et al. do (their code); memtool then restores the running statistics
after the attack, so only the training forward pass updates them. For BatchNorm-free models
(mlp, cnn) the two are identical.

Formulas follow the official implementations, reduced per sample instead of over the batch
(their batch loss is the mean of these; tested):

- TRADES (github.com/yaodongyu/TRADES ``trades.py``): x' maximizes KL(f(x) || f(x')) by PGD
  from x + 0.001 N(0, 1); l_i = CE(f(x_i), y_i) + beta * KL(softmax f(x_i) || softmax f(x'_i)).
- MART (github.com/YisenWang/MART ``mart.py``): x' by PGD on CE from x + 0.001 N(0, 1);
  p' = softmax f(x'), p = softmax f(x), y' = argmax_{k != y} p'_k;
  l_i = CE(f(x'_i), y_i) - log(1.0001 - p'_{i,y'} + 1e-12)
        + beta * KL(p_i || p'_i) * (1.0000001 - p_{i,y_i})   (log p' + 1e-12 inside KL).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .attacks.base import eval_mode
from .attacks.pgd import ce_loss as ce
from .attacks.pgd import default_step_size, pgd, project
from .config import check_choice, check_int, check_number, setting

ATTACK_BN = ("eval", "train")


class LossOutput(NamedTuple):
    per_sample: torch.Tensor  # (..., B) losses l_i
    weight: torch.Tensor | None = None  # (..., B) the method's own weights (no gradient), times the given ones
    extra: torch.Tensor | None = None  # (...,) per-model term added after the weighted mean
    stats: dict | None = None  # name -> (numerator, denominator): summed over an epoch, logged as their ratio


class Batch:
    """What the engine tells a method about the current batch."""

    __slots__ = ("ids", "epoch", "progress", "gens", "stacked", "weights", "label_smoothing")

    def __init__(self, ids: torch.Tensor, epoch: int, progress: float, gens: list, stacked: bool,
                 weights: torch.Tensor | None = None, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing  # of the training cross-entropy (Recipe.label_smoothing)
        self.ids = ids  # (B,) or (K, B) sample ids: positions in the training set
        self.weights = weights  # the given per-sample weights of these samples (the engine applies them)
        self.epoch = epoch  # 0-based
        self.progress = progress  # fraction of training done, in [0, 1)
        self.gens = gens  # one torch.Generator per model
        self.stacked = stacked  # tensors carry a leading model axis

    def _draw(self, draw, x: torch.Tensor) -> torch.Tensor:
        if not self.stacked:
            return draw(x.shape, generator=self.gens[0], device=x.device, dtype=x.dtype)
        return torch.stack([draw(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in self.gens])

    def rand_like(self, x):
        """Uniform [0, 1) noise shaped like ``x``, model k's slice from model k's generator."""
        return self._draw(torch.rand, x)

    def randn_like(self, x):
        return self._draw(torch.randn, x)

    def ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training cross-entropy per sample, with the recipe's label smoothing."""
        return ce(logits, y, self.label_smoothing)


# ----------------------------------------------------------------------------- formulas


def _full(t: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (autocast) to float32; float32 / float64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def kl_per_sample(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities (``nn.KLDivLoss(q_log, p)`` summed per row)."""
    return F.kl_div(q_log, p_log.exp(), reduction="none").sum(-1)


def trades_per_sample(logits_nat, logits_adv, y, beta: float) -> torch.Tensor:
    """TRADES: CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x_adv)), per sample."""
    logits_nat, logits_adv = _full(logits_nat), _full(logits_adv)
    kl = kl_per_sample(F.log_softmax(logits_nat, -1), F.log_softmax(logits_adv, -1))
    return ce(logits_nat, y) + beta * kl


def mart_per_sample(logits_nat, logits_adv, y, beta: float) -> torch.Tensor:
    """MART with the official code's constants (1.0001, 1e-12, 1.0000001), per sample."""
    logits_nat, logits_adv = _full(logits_nat), _full(logits_adv)
    adv_probs = F.softmax(logits_adv, -1)
    top2 = torch.argsort(adv_probs, dim=-1)[..., -2:]
    new_y = torch.where(top2[..., -1] == y, top2[..., -2], top2[..., -1])  # most likely wrong class
    bce = ce(logits_adv, y) - torch.log(1.0001 - adv_probs.gather(-1, new_y[..., None]).squeeze(-1) + 1e-12)
    nat_probs = F.softmax(logits_nat, -1)
    true_probs = nat_probs.gather(-1, y[..., None]).squeeze(-1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(-1)
    return bce + beta * kl * (1.0000001 - true_probs)


def other_class_confidence(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """h_i = max over k != y_i of softmax(logits_i)_k (docs/science.md section 4): how confidently
    the model puts the sample into another class. On adversarial logits, the harmfulness of
    an atypical training sample."""
    p = F.softmax(_full(logits), -1)
    return p.scatter(-1, y[..., None], 0.0).amax(-1)


def weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Per model ``sum_i w_i l_i / sum_i w_i`` over the last axis (plain mean without weights;
    0 where every weight is 0)."""
    if weight is None:
        return per_sample.mean(-1)
    return (weight * per_sample).sum(-1) / weight.sum(-1).clamp_min(1e-12)


@contextmanager
def frozen_bn_stats(model: nn.Module):
    """Train mode, but every buffer (BatchNorm's running statistics, also a stacked model's)
    is restored on exit."""
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        yield model
    finally:
        for b, value in saved:
            b.copy_(value)


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """Standard training: cross-entropy on the clean samples."""

    name: ClassVar[str] = "standard"
    adversarial: ClassVar[bool] = False
    smooths: ClassVar[bool] = True  # takes the recipe's label smoothing (TRADES and MART: their official losses)
    later: ClassVar[dict] = {}  # fields added after runs were made, and their unset values: written only when set

    def loss(self, model, x, y, batch: Batch) -> LossOutput:
        return LossOutput(batch.ce(model(x), y))

    def to_dict(self) -> dict:
        """The method as run.json keeps it (the fields in ``later`` only when set, so that runs made
        before them reopen and compare unchanged)."""
        kept = {k: v for k, v in asdict(self).items() if k not in self.later or v != self.later[k]}
        return {"name": self.name, **kept}

    def bind(self, dataset) -> "Method":
        """The method ready for ``dataset`` (methods that read per-sample scores load them here)."""
        return self

    def for_dataset(self, dataset: str) -> "Method":
        """The method with its dataset-dependent defaults resolved (the adversarial ones: eps)."""
        return self


@dataclass(frozen=True)
class Adversarial(Method):
    """The training attack shared by the adversarial methods: L-inf PGD."""

    eps: float | None = setting(None, "L-inf radius of the training attack, on the [0, 1] pixel scale (default: the "
                                      "dataset's: 0.3 MNIST, 0.1 Fashion-MNIST, 8/255 CIFAR, Tiny ImageNet)")
    pgd_steps: int = setting(10, "PGD steps of the training attack")
    step_size: float | None = setting(None, "PGD step size (default: 2.5 * eps / pgd-steps)")
    eps_warmup: float = setting(0.3, "fraction of the training over which eps (and the step size) ramp "
                                     "linearly from 0; 0 = full eps from the start")
    attack_bn: str = setting("eval", "BatchNorm mode of the training attack: eval (running statistics, as the "
                                     "official TRADES/MART code) | train (batch statistics, as Madry et al.)",
                             choices=ATTACK_BN)

    adversarial: ClassVar[bool] = True

    def __post_init__(self):
        check_number("eps", self.eps, 0, optional=True)
        check_int("pgd_steps", self.pgd_steps, 1)
        check_number("step_size", self.step_size, 0, low_open=True, optional=True)
        check_number("eps_warmup", self.eps_warmup, 0, 1)
        check_choice("attack_bn", self.attack_bn, ATTACK_BN)

    def for_dataset(self, dataset: str) -> "Adversarial":
        """The method with ``eps`` resolved to the dataset's standard radius when unset."""
        from .datasets import standard_eps

        return self if self.eps is not None else replace(self, eps=standard_eps(dataset))

    @property
    def alpha(self) -> float:
        """The step size at full eps."""
        if self.eps is None:
            raise ValueError(f"method {self.name} has no eps: give one, or build it through a config of a "
                             "dataset (which resolves the dataset's standard eps)")
        return self.step_size if self.step_size is not None else default_step_size(self.eps, self.pgd_steps)

    def radius(self, progress: float) -> tuple[float, float]:
        """(eps, step size) after ``progress`` (fraction of the training) of the eps warm-up."""
        scale = 1.0 if self.eps_warmup <= 0 else min(1.0, progress / self.eps_warmup)
        return self.eps * scale, self.alpha * scale

    @contextmanager
    def attacking(self, model):
        ctx = eval_mode(model) if self.attack_bn == "eval" else frozen_bn_stats(model)
        with ctx, torch.enable_grad():
            yield

    def pgd(self, model, x, y, batch: Batch, loss_fn=ce, start: str = "uniform", on_iterate=None) -> torch.Tensor:
        """PGD maximizing ``loss_fn(model(x'), y)`` in the current eps-ball; random start
        uniform in the ball (Madry et al.) or x + 0.001 N(0, 1) (official TRADES / MART)."""
        eps, alpha = self.radius(batch.progress)
        x = x.detach()
        if start == "uniform":
            x0 = project(x + (batch.rand_like(x) * 2 - 1) * eps, x, eps, "linf")
        else:
            x0 = x + 0.001 * batch.randn_like(x)
        with self.attacking(model):
            return pgd(model, x, y, loss_fn, eps, alpha, self.pgd_steps, "linf", x0, on_iterate)


@dataclass(frozen=True)
class PGDAT(Adversarial):
    """PGD-AT (Madry et al. 2018): cross-entropy on PGD examples (uniform random start)."""

    name: ClassVar[str] = "pgd-at"

    def loss(self, model, x, y, batch):
        return LossOutput(batch.ce(model(self.pgd(model, x, y, batch)), y))


GAIR_FUNCTIONS = ("tanh", "sigmoid", "discrete")


def gair_weights(kappa: torch.Tensor, steps: int, lam: float, function: str = "tanh") -> torch.Tensor:
    """GAIRAT's instance weights (official ``GAIR``, normalised to mean 1 over the last axis)
    from ``kappa``, the number of PGD iterates (of ``steps``) the model still classifies
    correctly: with half = int(steps / 2),

        tanh:     w = (tanh(lam + 5 (half - kappa) / half) + 1) / 2
        sigmoid:  w = sigmoid(lam + 5 (half - kappa) / half)
        discrete: w = (steps + 1 - kappa) / (steps + 1)

    so samples the attack flips quickly (close to the decision boundary) weigh most."""
    kappa = kappa.to(torch.float32)
    half = int(steps / 2)
    if function == "discrete":
        w = ((steps + 1) - kappa) / (steps + 1)
    else:
        z = lam + (half - kappa) * 5 / half
        w = (z.tanh() + 1) / 2 if function == "tanh" else z.sigmoid()
    return w * w.shape[-1] / w.sum(-1, keepdim=True)


@dataclass(frozen=True)
class GAIRAT(Adversarial):
    """GAIRAT (Zhang et al. 2021, github.com/zjfheart/Geometry-aware-Instance-reweighted-Adversarial-Training):
    PGD-AT whose per-sample losses are weighted by :func:`gair_weights` of Kappa, counted
    over the training attack's iterates (start included, final point not) as in the official
    ``GA_PGD``. Plain PGD-AT for the first ``gair_burnin`` of the training (the official
    begin_epoch 60 of 120), then Lambda fixed at ``gair_lambda`` (the official 'fixed'
    schedule, Lambda -1). The official batch loss mean(w_i l_i) with w normalised to mean 1
    is the engine's sum(w_i l_i) / sum(w_i)."""

    gair_lambda: float = setting(-1.0, "GAIRAT: Lambda of the weight function (larger: flatter weights)")
    gair_function: str = setting("tanh", "GAIRAT: weight function tanh | sigmoid | discrete", choices=GAIR_FUNCTIONS)
    gair_burnin: float = setting(0.5, "GAIRAT: fraction of the training that is plain PGD-AT before the weights act")

    name: ClassVar[str] = "gairat"

    def __post_init__(self):
        super().__post_init__()
        check_number("gair_lambda", self.gair_lambda)
        check_choice("gair_function", self.gair_function, GAIR_FUNCTIONS)
        check_number("gair_burnin", self.gair_burnin, 0, 1)

    def loss(self, model, x, y, batch):
        kappa = torch.zeros(y.shape, device=y.device)

        def count(logits):
            kappa.add_((logits.argmax(-1) == y).to(kappa.dtype))

        per_sample = batch.ce(model(self.pgd(model, x, y, batch, on_iterate=count)), y)
        if batch.progress < self.gair_burnin:
            return LossOutput(per_sample)
        w = gair_weights(kappa, self.pgd_steps, self.gair_lambda, self.gair_function)
        return LossOutput(per_sample, w, stats={"mean_kappa": (kappa.sum(), torch.ones_like(kappa).sum())})


@dataclass(frozen=True)
class _Tradeoff(Adversarial):
    """An adversarial method with a trade-off between a clean and a robust term."""

    smooths: ClassVar[bool] = False

    beta: float = setting(6.0, "TRADES / MART trade-off between the clean and the robust term")

    def __post_init__(self):
        super().__post_init__()
        check_number("beta", self.beta, 0)


@dataclass(frozen=True)
class TRADES(_Tradeoff):
    """TRADES (Zhang et al. 2019)."""

    name: ClassVar[str] = "trades"

    def loss(self, model, x, y, batch):
        with self.attacking(model), torch.no_grad():
            p_log = F.log_softmax(_full(model(x)), -1)

        def kl_to_clean(logits, _y):
            return kl_per_sample(p_log, F.log_softmax(_full(logits), -1))

        x_adv = self.pgd(model, x, None, batch, kl_to_clean, start="normal")
        return LossOutput(trades_per_sample(model(x), model(x_adv), y, self.beta))


@dataclass(frozen=True)
class MART(_Tradeoff):
    """MART (Wang et al. 2020)."""

    name: ClassVar[str] = "mart"

    def loss(self, model, x, y, batch):
        x_adv = self.pgd(model, x, y, batch, start="normal")
        return LossOutput(mart_per_sample(model(x), model(x_adv), y, self.beta))


@dataclass(frozen=True)
class BAT(Adversarial):
    """Benign Adversarial Training as memtool defines it (docs/science.md section 4; our
    reconstruction of the paper's stated aim, its method section being unavailable).

    PGD-AT in which each atypical training sample (mem >= tau in the score table) is weighted
    by how harmful it is now: h_i = max over k != y_i of softmax(f(x'_i))_k on its PGD
    example (no gradient), w_i = (1 - h_i)^gamma, or with ``eta`` the hard rule w_i = 0 when
    h_i >= eta; typical samples keep w_i = 1. A clean cross-entropy on the atypical samples,
    weighted by lambda, keeps their clean labels memorized:

        L = sum_i w_i CE(f(x'_i), y_i) / sum_i w_i + lambda * sum_{i atypical} CE(f(x_i), y_i) / |B|

    For the first ``bat_warmup`` of the training it is plain PGD-AT (h from an untrained
    model is noise).

    The benign half (issue 31): ``benign`` multiplies every atypical weight, so that with
    ``benign`` > 1 the atypical samples that are not harmful are fit *more* than the typical
    ones; ``judges`` replaces the current model's h by a fixed h from reference models (a
    harmfulness table as :mod:`analyses.finding_b` writes it), so that "harmful" no longer
    means "not yet fit": w_i = benign * (1 - h_i)^gamma, or benign * [h_i < eta].

    The atypical samples come from :meth:`bind` (the training loop calls it with the
    dataset: the table must belong to that data). Logged per epoch: the mean weight
    of the atypical samples and the fraction flagged harmful (h >= eta, or >= 0.5 with soft
    weights). Defaults (tau 0.25, gamma 1, lambda 1, warm-up 0.2) as kept by the study
    `analyses/bat_comparison.py` (figures/{mnist,fashion-mnist}/bat_comparison.md): no
    variant of tau, gamma, eta or lambda beat them beyond its interval on either dataset."""

    scores: str | None = setting(None, "BAT: a run directory or score table (parquet) with mem of every training sample")
    tau: float = setting(0.25, "BAT: atypical training samples are those with mem >= tau")
    gamma: float = setting(1.0, "BAT: soft weight (1 - h)^gamma of an atypical sample")
    eta: float | None = setting(None, "BAT: hard rule instead: weight 0 when h >= eta")
    lam: float = setting(1.0, "BAT: weight lambda of the clean cross-entropy on atypical samples", flag="--lambda")
    bat_warmup: float = setting(0.2, "BAT: fraction of the training that is plain PGD-AT before the weights act")
    benign: float = setting(1.0, "BAT: factor on every atypical weight (> 1: the benign atypical samples are fit "
                                 "more than the typical ones)")
    judges: str | None = setting(None, "BAT: a harmfulness table (sample_id, h: analyses.finding_b's "
                                       "harmfulness.parquet) whose fixed h replaces the current model's")

    name: ClassVar[str] = "bat"
    later: ClassVar[dict] = {"benign": 1.0, "judges": None}

    def __post_init__(self):
        super().__post_init__()
        check_number("tau", self.tau, -1, 1)
        check_number("gamma", self.gamma, 0)
        check_number("eta", self.eta, 0, 1, optional=True)
        check_number("lam", self.lam, 0)
        check_number("bat_warmup", self.bat_warmup, 0, 1)
        check_number("benign", self.benign, 0)

    def bind(self, dataset) -> "BAT":
        """A copy that knows the atypical training samples of ``dataset`` (a
        :class:`memtool.datasets.Dataset`), read from ``scores`` and checked against it."""
        from .bat import atypical_mask, judged_harm

        if self.scores is None:
            raise ValueError("method bat needs scores (--scores RUN_OR_TABLE: a run directory or a score table)")
        bound = replace(self)
        atypical = atypical_mask(self.scores, dataset, self.tau)
        object.__setattr__(bound, "atypical", torch.as_tensor(atypical))
        if self.judges is not None:
            object.__setattr__(bound, "judged", torch.as_tensor(judged_harm(self.judges, dataset, atypical),
                                                                dtype=torch.float32))
        return bound

    def loss(self, model, x, y, batch):
        atypical = getattr(self, "atypical", None)
        if atypical is None:
            raise RuntimeError("BAT's score table is not bound to the data: call method.bind(dataset) "
                               "(memtool train does)")
        x_adv = self.pgd(model, x, y, batch)
        logits_adv = model(x_adv)
        per_sample = batch.ce(logits_adv, y)
        a = atypical.to(batch.ids.device)[batch.ids]  # (..., B)
        if batch.progress < self.bat_warmup or not bool(a.any()):
            return LossOutput(per_sample)
        judged = getattr(self, "judged", None)
        h = other_class_confidence(logits_adv.detach(), y) if judged is None else \
            judged.to(batch.ids.device)[batch.ids].to(per_sample.dtype)
        soft = (1 - h).clamp_min(0) ** self.gamma if self.eta is None else (h < self.eta).to(h.dtype)
        w = torch.where(a, self.benign * soft, torch.ones_like(soft))
        harmful = h >= (0.5 if self.eta is None else self.eta)
        af = a.to(h.dtype)
        extra = None
        if self.lam > 0:
            extra = self.lam * (batch.ce(model(x), y) * af).sum(-1) / y.shape[-1]
        return LossOutput(per_sample, w, extra, {"atypical_weight": ((w * af).sum(), af.sum()),
                                                 "harmful_fraction": ((harmful & a).to(h.dtype).sum(), af.sum())})


METHODS: dict[str, type[Method]] = {m.name: m for m in (Method, PGDAT, TRADES, MART, GAIRAT, BAT)}
ENTRY_POINTS = "memtool.methods"  # installed packages may add methods: [project.entry-points."memtool.methods"]


def register_method(cls: type[Method]) -> type[Method]:
    """Make a :class:`Method` subclass (a frozen dataclass with a ``name`` ClassVar) known by
    its name to every config, command and run reopened in this process; usable as a decorator.
    Another class under a taken name is an error."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method takes a Method subclass, got {cls!r}")
    if METHODS.get(cls.name, cls) is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({METHODS[cls.name].__qualname__}); "
                         "give your class another name ClassVar")
    METHODS[cls.name] = cls
    return cls


def _from_entry_points(name: str) -> None:
    """Register the installed package's method ``name`` (entry-point group ``memtool.methods``)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        if ep.name == name:
            register_method(ep.load())


def method_fields(name: str) -> set[str]:
    return {f.name for f in fields(METHODS[name])}


def build_method(name: str = "standard", **params) -> Method:
    """The method called ``name`` with ``params``; a parameter it does not take is an error
    that says which methods take it."""
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        _from_entry_points(name)
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r} (a method of your own: "
                         "memtool.register_method(cls) before the run is created or reopened)")
    extra = set(params) - method_fields(name)
    if extra:
        takers = {p: [m for m in METHODS if p in method_fields(m)] for p in sorted(extra)}
        raise ValueError("; ".join(f"{p} does not apply to method {name!r} (it applies to {', '.join(t) or 'none'})"
                                   for p, t in takers.items()))
    return METHODS[name](**params)


def method_from_dict(d: dict | str) -> Method:
    if isinstance(d, str):
        return build_method(d)
    d = dict(d)
    return build_method(d.pop("name", "standard"), **d)
