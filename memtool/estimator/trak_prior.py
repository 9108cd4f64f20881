"""A TRAK prior for the high-influence pairs (issue 30): TRAK scores (Park et al. 2023, through
the `traker` package) of the run's own trial models, and each pair's empirical-Bayes posterior
under a prior that depends on its TRAK score.

The trials do not keep their models, but a trial is reproducible from the run's plan (its subset
and seed): :func:`trial_models` trains the chosen trials again, and gets the trials' own models up
to float rounding (a stack of another size sums in another order; tests/test_trak_prior.py checks
the margins against the stored ones). TRAK then scores every
(training, test) pair with the last layer's gradients (``grad_wrt``; on a CPU the full gradients
of even an MLP cost minutes per model), averaged over the models.

:func:`trak_posterior` bins the candidate pairs by TRAK score (quantiles), fits the NPMLE prior of
:func:`memtool.estimator.pairs.prior_grid` within each bin, and gives each pair P(infl >=
threshold | its estimate, its bin): a pair TRAK ranks high borrows the higher base rate of its
bin. TRAK only moves the prior; the evidence is still the pair's own estimate from the trials.
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext

import numpy as np
import torch

from .pairs import posterior, prior_grid


def trial_models(run, trial_ids, device: str = "cpu", data_root=None) -> tuple[list[torch.nn.Module], dict]:
    """(models, data): the models of ``run``'s trials ``trial_ids``, trained again from the run's
    plan and seeds, and the run's data as tensors (``x_train``, ``y_train``, ``x_test``, ``y_test``)."""
    from ..engine import fit
    from ..recipe import trial_seed
    from . import plan
    from .run import _tensors
    from .store import open_run

    _, cfg, ds = open_run(run, data_root, "TRAK")
    if cfg.train_fn is not None:
        raise ValueError(f"{run} trains with your own loop {cfg.train_fn}: memtool cannot train its trials again")
    data = _tensors(ds, device)
    trial_ids = np.asarray(trial_ids, dtype=np.int64)
    members = plan.subset_indices(len(ds.y_train), cfg.ratio, cfg.seed, trial_ids)
    seeds = [trial_seed(cfg.seed, int(t)) for t in trial_ids]
    models = fit(cfg.recipe, data["x_train"], data["y_train"], members, seeds, num_classes=ds.num_classes,
                 ensemble_size=len(trial_ids))
    return [models[k] for k in range(len(trial_ids))], data


def run_trak(run, trial_ids, device: str = "cpu", data_root=None, **kw) -> np.ndarray:
    """(n_train, n_test) TRAK scores of ``run``'s data from the models of its trials ``trial_ids``
    (:func:`trial_models`, :func:`trak_scores`)."""
    models, d = trial_models(run, trial_ids, device, data_root)
    return trak_scores(models, d["x_train"], d["y_train"], d["x_test"], d["y_test"], **kw)


def last_layer(model: torch.nn.Module) -> list[str]:
    """The parameter names of the model's last module that has parameters."""
    names = [n for n, _ in model.named_parameters()]
    prefix = names[-1].rsplit(".", 1)[0]
    return [n for n in names if n.rsplit(".", 1)[0] == prefix]


def trak_scores(models, x_train, y_train, x_test, y_test, grad_wrt=None, batch: int = 500,
                lambda_reg: float = 1e-3, save_dir=None) -> np.ndarray:
    """(n_train, n_test) TRAK scores of ``models`` (checkpoints of one architecture) through
    ``trak.TRAKer``, with the gradients of ``grad_wrt`` (default: :func:`last_layer`), unprojected;
    ``lambda_reg``: TRAK's ridge on X^T X (units that never fire make it singular)."""
    from trak import TRAKer
    from trak.projectors import NoOpProjector

    model = models[0]
    grad_wrt = last_layer(model) if grad_wrt is None else list(grad_wrt)
    dim = sum(p.numel() for n, p in model.named_parameters() if n in grad_wrt)
    device = str(next(model.parameters()).device)  # a string: traker compares it with "cpu"
    with tempfile.TemporaryDirectory() if save_dir is None else nullcontext(save_dir) as d:
        traker = TRAKer(model=model, task="image_classification", train_set_size=len(y_train), save_dir=str(d),
                        device=device, projector=NoOpProjector(dim, dim, device=device), proj_dim=dim,
                        use_half_precision=False, grad_wrt=grad_wrt,
                        lambda_reg=lambda_reg, logging_level=40)
        for k, m in enumerate(models):
            traker.load_checkpoint(m.state_dict(), model_id=k)
            for s in range(0, len(y_train), batch):
                traker.featurize(batch=(x_train[s:s + batch], y_train[s:s + batch]),
                                 num_samples=len(y_train[s:s + batch]))
        traker.finalize_features()
        for k, m in enumerate(models):
            traker.start_scoring_checkpoint(exp_name="pairs", checkpoint=m.state_dict(), model_id=k,
                                            num_targets=len(y_test))
            for s in range(0, len(y_test), batch):
                traker.score(batch=(x_test[s:s + batch], y_test[s:s + batch]), num_samples=len(y_test[s:s + batch]))
        return np.array(traker.finalize_scores(exp_name="pairs"), dtype=np.float32)


def trak_posterior(estimate, se, score, threshold: float, bins: int = 10, rows=None):
    """P(true >= threshold | estimate) of every candidate pair (or of ``rows`` of them), under
    a prior fitted within the pair's TRAK-score bin (``bins`` quantile bins of ``score`` over
    the candidates)."""
    estimate, se, score = (np.asarray(a, dtype=np.float64) for a in (estimate, se, score))
    edges = np.quantile(score, np.linspace(0, 1, bins + 1)[1:-1])
    which = np.searchsorted(edges, score, side="right")
    rows = np.arange(len(estimate)) if rows is None else np.asarray(rows)
    prob = np.full(len(rows), np.nan)
    for b in range(bins):
        fit_on = which == b
        if not fit_on.any():
            continue
        mine = which[rows] == b
        prob[mine] = posterior(estimate[rows[mine]], se[rows[mine]], threshold,
                               prior=prior_grid(estimate[fit_on], se[fit_on]))[0]
    return prob
