"""What the engine records during ordinary training: one-run proxies of memorization and
TracIn pair similarity (``memtool proxies``, :mod:`memtool.proxies`, runs them; so does
``memtool estimate --record-proxies``).

Each column is oriented so that larger means more atypical / memorized; each is per model,
then averaged over the models (``--seeds``), or, from an estimator's trials
(``memtool estimate --record-proxies``), over the trials that trained on the sample:

- ``csl``: cumulative sample loss (Ravikumar et al. 2025): the sum of the sample's training
  loss over its visits (the method's loss, so under PGD-AT the adversarial one: a robust proxy).
- ``learning_speed``: minus the fraction of epochs after which the model classifies it
  correctly (Jiang et al. 2021).
- ``forgetting``: correct -> incorrect transitions between consecutive epochs (Toneva et
  al. 2019); a sample never learned counts ``epochs`` (more than any learned sample can).
- ``aum``: minus the area under the margin (Pleiss et al. 2020): the margin (assigned logit
  minus the largest other) averaged over epochs.
- ``el2n``: ||softmax f(x) - onehot(y)||_2 after ``el2n_at`` of the training (Paul et al. 2021).
- ``grad_norm``: ||d loss / d x||_2 summed over the measured epochs (CSG).
- ``curvature``: Garg et al. 2024's input-loss curvature, ||grad(x + h v) - grad(x)||_2 for
  Rademacher v (official code: h = 1e-3, 10 draws; here ``curvature_draws``), averaged over
  the measured epochs.

Everything but ``csl`` is measured after every epoch on clean inputs, in eval mode
(``grad_norm`` and ``curvature`` every ``input_every`` epochs and after the last). The
measurements consume no random numbers of training: a model records the same proxies
whether trained alone, stacked, or with the recording off, and trains to the same weights.

TracIn (Pruthi et al. 2020) over the epoch checkpoints, last layer: for training sample i
and test sample j of the same class, T(i, j) = sum over epochs of lr * (e_i . e_j)(h_i . h_j)
with e = softmax - onehot and h the last layer's input (and a 1 for its bias), summed over the
models; ``tracin.npz`` holds per class c ``cos_c`` = T(i, j) / sqrt(T(i, i) T(j, j)), and
:func:`memtool.hybrid.cheap_influence` turns it into an influence table.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .attacks.base import margins_from_logits
from .config import check_int, check_number, setting
from .ensemble import Ensemble, FuncEnsemble
from .recipe import EVAL, Recipe, lr_at, stream

PROXIES = ("csl", "learning_speed", "forgetting", "aum", "el2n", "grad_norm", "curvature")
PROXY_RUN = 1 << 20  # model seeds of a proxies run: trial_seed(seed, PROXY_RUN + s), apart from any estimator trial


@dataclass(frozen=True)
class ProxySettings:
    """How the proxies are measured (none of it changes the training)."""

    el2n_at: float = setting(0.1, "EL2N after this fraction of the epochs (Paul et al.: a few epochs in)")
    input_every: int = setting(4, "grad_norm and curvature every N epochs (and after the last)")
    curvature_draws: int = setting(2, "Rademacher directions per curvature measurement (Garg et al.: 10)")
    curvature_h: float = setting(1e-3, "finite-difference step of the curvature")

    def __post_init__(self):
        check_number("el2n_at", self.el2n_at, 0, 1, low_open=True)
        check_int("input_every", self.input_every, 1)
        check_int("curvature_draws", self.curvature_draws, 1)
        check_number("curvature_h", self.curvature_h, 0, low_open=True)


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _probe(model, x, y, opts: ProxySettings, gen, inputs: bool, features: bool, chunk: int = 1000) -> dict:
    """Per-sample loss-free measurements of one plain model (eval mode) on ``x``, ``y``:
    correct, margin, the error vector norm, and with ``inputs`` the input-gradient norm and
    curvature, with ``features`` the last layer's input h (with a 1) and error e."""
    out = {k: [] for k in ("correct", "margin", "el2n", "grad_norm", "curvature", "h", "e")}
    captured = {}
    hook = _last_linear(model).register_forward_hook(lambda m, i, o: captured.__setitem__("h", i[0].detach()))
    try:
        for s in range(0, len(y), chunk):
            xb, yb = x[s:s + chunk], y[s:s + chunk]
            xb = xb.float().div(255) if xb.dtype == torch.uint8 else xb
            with torch.no_grad():
                logits = model(xb)
            p = F.softmax(logits.float(), -1)
            e = p - F.one_hot(yb, p.shape[-1]).to(p.dtype)
            out["correct"].append(logits.argmax(-1) == yb)
            out["margin"].append(margins_from_logits(logits, yb))
            out["el2n"].append(e.norm(dim=-1))
            if features:
                h = captured["h"].flatten(1)
                out["h"].append(torch.cat([h, torch.ones(len(h), 1, device=h.device)], 1))
                out["e"].append(e)
            if inputs:
                g = _input_grad(model, xb, yb)
                out["grad_norm"].append(g.flatten(1).norm(dim=1))
                curv = torch.zeros(len(yb), device=xb.device)
                for _ in range(opts.curvature_draws):
                    v = torch.randint(0, 2, xb.shape, generator=gen, device=gen.device).to(xb) * 2 - 1
                    curv += (_input_grad(model, xb + opts.curvature_h * v, yb) - g).flatten(1).norm(dim=1)
                out["curvature"].append(curv / opts.curvature_draws)
    finally:
        hook.remove()
    return {k: torch.cat(v) for k, v in out.items() if v}


def _input_grad(model, x, y) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(F.cross_entropy(model(x).float(), y, reduction="sum"), x)
    return g


class Recorder:
    """The proxies of K models (in :func:`memtool.engine.fit`'s order) accumulated during
    their training: the engine calls :meth:`visit` after every step with the method's
    per-sample losses and :meth:`epoch_end` after every epoch. With ``test`` (x, y), also
    the TracIn sums of every same-class (train, test) pair, summed over the models."""

    def __init__(self, x, y, seeds, recipe: Recipe, opts: ProxySettings | None = None, test=None):
        self.x, self.y, self.seeds, self.recipe = x, y, [int(s) for s in seeds], recipe
        self.opts = opts or ProxySettings()
        k, n = len(seeds), len(y)
        z = lambda: torch.zeros(k, n, dtype=torch.float64)  # noqa: E731
        self.sums = {name: z() for name in ("loss", "correct", "margin", "forgetting", "grad_norm", "curvature")}
        self.visits, self.el2n = z(), torch.full((k, n), float("nan"), dtype=torch.float64)
        self.prev = torch.zeros(k, n, dtype=torch.bool)
        self.ever = torch.zeros(k, n, dtype=torch.bool)
        self.n_input = torch.zeros(k, dtype=torch.int64)
        self.test = test
        if test is not None:
            ytr, yte = y.cpu().numpy(), test[1].cpu().numpy()
            self.classes = [(np.flatnonzero(ytr == c), np.flatnonzero(yte == c)) for c in range(int(max(ytr.max(), yte.max())) + 1)]
            self.tracin = [np.zeros((len(a), len(b))) for a, b in self.classes]
            self.self_train, self.self_test = np.zeros(n), np.zeros(len(yte))

    def visit(self, positions, ids, losses) -> None:
        ids, losses = ids.reshape(len(positions), -1).cpu(), losses.detach().reshape(len(positions), -1).double().cpu()
        for row, k in enumerate(positions):
            self.sums["loss"][k].index_add_(0, ids[row], losses[row])
            self.visits[k].index_add_(0, ids[row], torch.ones_like(losses[row]))

    def epoch_end(self, positions, model, epoch: int) -> None:
        """``epoch``: epochs done (1-based)."""
        epochs = self.recipe.epochs
        inputs = epoch % self.opts.input_every == 0 or epoch == epochs
        el2n_epoch = max(1, round(self.opts.el2n_at * epochs))
        lr = lr_at(self.recipe.schedule, self.recipe.lr, epoch - 0.5, epochs)  # mid-epoch: TracIn's checkpoint lr
        for row, k in enumerate(positions):
            member = model.member(row) if isinstance(model, (Ensemble, FuncEnsemble)) else model
            gen = torch.Generator(device=self.x.device).manual_seed(stream(self.seeds[k], EVAL, 1 << 16, epoch))
            p = _probe(member, self.x, self.y, self.opts, gen, inputs, self.test is not None)
            correct = p["correct"].cpu()
            self.sums["correct"][k] += correct
            self.sums["margin"][k] += p["margin"].double().cpu()
            self.sums["forgetting"][k] += (self.prev[k] & ~correct).double()
            self.prev[k], self.ever[k] = correct, self.ever[k] | correct
            if epoch == el2n_epoch:
                self.el2n[k] = p["el2n"].double().cpu()
            if inputs:
                self.sums["grad_norm"][k] += p["grad_norm"].double().cpu()
                self.sums["curvature"][k] += p["curvature"].double().cpu()
                self.n_input[k] += 1
            if self.test is not None:
                self._tracin(member, p, lr)

    def _tracin(self, member, p, lr: float) -> None:
        q = _probe(member, self.test[0], self.test[1], self.opts, None, False, True)
        h_tr, e_tr = p["h"].double().cpu().numpy(), p["e"].double().cpu().numpy()
        h_te, e_te = q["h"].double().cpu().numpy(), q["e"].double().cpu().numpy()
        self.self_train += lr * (e_tr ** 2).sum(1) * (h_tr ** 2).sum(1)
        self.self_test += lr * (e_te ** 2).sum(1) * (h_te ** 2).sum(1)
        for (a, b), acc in zip(self.classes, self.tracin):
            acc += lr * (e_tr[a] @ e_te[b].T) * (h_tr[a] @ h_te[b].T)

    def result(self) -> dict[str, np.ndarray]:
        """(K, n) per-model proxies (NaN for a sample the model never trained on)."""
        epochs = self.recipe.epochs
        seen = self.visits > 0
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        forgetting = torch.where(self.ever, self.sums["forgetting"], torch.tensor(float(epochs), dtype=torch.float64))
        n_input = self.n_input.clamp_min(1)[:, None].double()
        out = {"csl": self.sums["loss"], "learning_speed": -self.sums["correct"] / epochs, "forgetting": forgetting,
               "aum": -self.sums["margin"] / epochs, "el2n": self.el2n, "grad_norm": self.sums["grad_norm"],
               "curvature": self.sums["curvature"] / n_input}
        return {k: torch.where(seen, v, nan).numpy().astype(np.float32) for k, v in out.items()}


def mean_over_members(per_model: np.ndarray, member: np.ndarray | None = None) -> np.ndarray:
    """Per sample, the mean over the models that trained on it (NaN marks the others)."""
    a = per_model.astype(np.float64)
    if member is not None:
        a = np.where(member, a, np.nan)
    with warnings.catch_warnings():  # a sample no model trained on: NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, 0)
