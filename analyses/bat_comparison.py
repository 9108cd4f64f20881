"""Benign Adversarial Training against standard training, PGD-AT (an eps sweep from 0.5x to
1.25x), TRADES, MART and GAIRAT, with its ablations (issue 10; docs/science.md sections 4 and 5).

    python -m analyses.bat_comparison RUN --out runs/mnist/bat_comparison --seeds 3

Every variant of :data:`GRID` is trained ``seeds`` times with :func:`memtool.train` on RUN's
training set (the data RUN's memorization scores belong to), with one recipe: the same
architecture, epochs, schedule, eps and training attack (PGD-``pgd_steps``) for every method;
only the PGD-AT eps sweep trains at a smaller eps, to draw PGD-AT's trade-off curve. Seeds are
paired: seed s of every variant starts from the same initialization and minibatch order.
Each model is then evaluated with :func:`memtool.evaluate` at ``eps``: clean, PGD-20 and
CW-20 on every test sample, and AutoAttack (standard version, the authors' code) on the first
``aa_samples`` for the variants in ``aa_variants`` (default: all); with ``aa_atypical`` on the
first ``aa_samples`` typical test samples and every atypical one; with ``aa_attack="apgd"``
its first two attacks (APGD-CE + APGD-T) instead, checked against standard AutoAttack on the
first seed of the ``aa_check`` variants. Where AutoAttack is too dear for the whole grid (on
a CPU), the other variants are ranked by CW-20 on the same samples, and the report measures
first how CW-20 agrees with AutoAttack on the models that have both. The robust evaluation's
Every interval (accuracy, and the difference to PGD-AT paired by seed and test sample) counts
both which seeds were trained and which test samples were drawn, the same samples for every
seed (:func:`memtool.experiments.crossed_interval`).
Everything resumes: a model per epoch, an evaluation per batch; and several processes may run
the same command at once (one per core or GPU, ``OMP_NUM_THREADS=1`` on a CPU): each model's
training and evaluations are claimed by one of them. After RUN is
re-estimated the BAT models are refused (their atypical set changed): remove OUT/models/bat*;
the baselines do not read the scores and are reused.

Written to OUT:

- ``models/VARIANT-sS/``: each model's checkpoint, per-epoch log (BAT: mean weight of the
  atypical samples, fraction flagged harmful), its kept epoch (``selected.json``), ``eval/``
  and ``autoattack/`` or ``apgd/`` (per-sample flags, ``robustbench.json``). A model whose evaluations are
  all there needs its checkpoint no more: OUT without the checkpoints (and the evaluations'
  ``state/``) is what a study commits, and a fresh clone resumes from it model by model;
- ``bat_comparison.parquet``: accuracy per (variant, group, metric) with 95 % intervals over
  seeds and test samples and the difference to PGD-AT paired by seed and sample; groups: all,
  typical and atypical test samples (atypical: in a same-class high-influence pair with an
  atypical training sample);
- ``bat_comparison.md``: the table as markdown, each BAT variant's distance to the baselines'
  trade-off curve (under AutoAttack, and under CW-20), and CW-20's agreement with AutoAttack;
- ``bat_comparison.png``: clean accuracy against AutoAttack accuracy, every variant's point
  with its intervals, the TRADES and PGD-AT curves.

A BAT point lies beyond the baselines' curve when its AutoAttack accuracy exceeds that of the
baselines' upper frontier (the Pareto points of the :data:`BASELINES`: standard training,
PGD-AT at every eps, TRADES, MART and GAIRAT, joined by straight lines) at its clean accuracy; the gap is measured per
seed against that seed's frontier (on the seeds where every baseline has the attack), its interval over those
seeds and the test samples (:func:`gap_interval`), which the verdict reads.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from memtool.checkpoints import load_checkpoint, selected_epoch
from memtool.config import check_choice, setting
from memtool.estimator import Thresholds
from memtool.evaluation import evaluate
from memtool.experiments import (crossed_interval, experiment_seeds, seeds_and_samples_interval, slug, summarize,
                                 t_interval)
from memtool.recipe import Recipe
from memtool.rundir import RunMismatchError, read_json, read_table, write_json, write_table
from memtool.sharing import shared
from memtool.training import TrainConfig, check_trained, train

from .study import StudySettings, load_study, main as study_main

# name -> the method and its settings; ``eps_factor``: training eps as a multiple of the study's eps. BAT's are
# spelled out, so that a change of BAT's defaults does not change what a variant means.
BAT = {"method": "bat", "tau": 0.25, "gamma": 1.0, "eta": None, "lam": 1.0, "bat_warmup": 0.2}
JUDGED = "judges"  # stands for the study's harmfulness table (the comparison's ``judges`` setting)
GRID = {
    "standard": {"method": "standard"},
    "pgd-at": {"method": "pgd-at"},
    "pgd-at eps x0.5": {"method": "pgd-at", "eps_factor": 0.5},
    "pgd-at eps x0.625": {"method": "pgd-at", "eps_factor": 0.625},
    "pgd-at eps x0.75": {"method": "pgd-at", "eps_factor": 0.75},
    "pgd-at eps x0.875": {"method": "pgd-at", "eps_factor": 0.875},
    "pgd-at eps x1.25": {"method": "pgd-at", "eps_factor": 1.25},
    "trades b=1": {"method": "trades", "beta": 1.0},
    "trades b=3": {"method": "trades", "beta": 3.0},
    "trades b=6": {"method": "trades", "beta": 6.0},
    "mart": {"method": "mart"},
    "mart b=1": {"method": "mart", "beta": 1.0},  # trains where beta 6 can stall (MNIST, eps 0.3: docs/results.md)
    "mart lr=0.01": {"method": "mart", "lr": 0.01},  # the official TRADES MNIST script's lr
    "gairat": {"method": "gairat", "gair_lambda": -1.0, "gair_function": "tanh", "gair_burnin": 0.5},
    "bat": BAT,
    "bat weights only": {**BAT, "lam": 0.0},
    "bat clean term only": {**BAT, "gamma": 0.0},
    "bat tau=0.1": {**BAT, "tau": 0.1},
    "bat tau=0.5": {**BAT, "tau": 0.5},
    "bat gamma=3": {**BAT, "gamma": 3.0},
    "bat eta=0.5": {**BAT, "eta": 0.5},
    "bat lambda=0.5": {**BAT, "lam": 0.5},
    "bat lambda=2": {**BAT, "lam": 2.0},
}
# BAT's benign half (issue 31): the benign atypical samples fit more. Each family is tuned on held-out training
# samples (analyses/bat_tuning.py), five candidates each: the budget docs/bat.md declared (PGD-AT's eps curve's points).
# Families: the current model's h, atypical weights times u; or harmful as finding (b)'s judges say, removed (h >= 0.5)
UPWEIGHTS = (1.25, 1.5, 2.0, 3.0, 4.0)
FAMILIES = {
    "bat benign": {f"bat benign x{u:g}": {**BAT, "benign": u} for u in UPWEIGHTS},
    "bat judged": {f"bat judged{'' if u == 1 else f' benign x{u:g}'}": {**BAT, "eta": 0.5, "bat_warmup": 0.0,
                                                                        "judges": JUDGED, "benign": u}
                   for u in (1.0, *UPWEIGHTS[1:])},
}
GRID.update({name: spec for family in FAMILIES.values() for name, spec in family.items()})
DEFAULT = [v for v in GRID if not any(v in family for family in FAMILIES.values())]  # the families: tuned first
PGD_CURVE = ("pgd-at eps x0.5", "pgd-at eps x0.625", "pgd-at eps x0.75", "pgd-at eps x0.875", "pgd-at",
             "pgd-at eps x1.25")
BASELINES = ("standard", *PGD_CURVE, "trades b=1", "trades b=3", "trades b=6", "mart", "mart b=1", "mart lr=0.01",
             "gairat")
HEADLINE = (*BASELINES, "bat")  # the curves and every method's default point
ATTACKS = "clean,pgd20,cw20"
LAST_EPOCH = ("pgd-at", "bat")  # with val_samples, also reported at their last epoch, as "VARIANT (last epoch)"
LAST = " (last epoch)"
METRICS = {"clean": "clean", "pgd20": "PGD-20", "cw20": "CW-20", "autoattack": "AutoAttack", "apgd": "APGD-CE+T"}
AA_ATTACKS = ("autoattack", "apgd")  # the robust evaluation of the default points: standard AutoAttack, or its first two
STAND_IN = 0.005  # APGD-CE + APGD-T stands in for AutoAttack at most this far above it on every checked model (docs/bat.md)
SELECTED = "selected.json"  # a model's kept epoch, beside its checkpoint: read where the checkpoint is gone


def kept_epoch(model_dir: Path) -> int:
    """The epoch whose weights a comparison model was evaluated with (its checkpoint rule)."""
    return int(read_json(Path(model_dir) / SELECTED)["epoch"])


def weights_digest(model) -> str:
    """sha256 of a model's weights: whether a retrained model is the one its records measured."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def evaluation_recorded(sub: Path, eps: float, attacks: str, ids: np.ndarray) -> bool:
    """Whether ``sub`` holds a finished evaluation of ``attacks`` at ``eps`` on every test
    sample of ``ids`` (fewer: not finished, it resumes); one at another eps or of other attacks
    is an error, as :func:`memtool.evaluate` would say."""
    if not (sub / "per_sample.parquet").exists():
        return False
    done = read_json(sub / "summary.json")
    if done["eps"] != eps or list(done["attacks"]) != attacks.split(","):
        raise RunMismatchError(f"{sub} holds an evaluation of {','.join(done['attacks'])} at eps {done['eps']:g}; "
                               f"this comparison asks for {attacks} at eps {eps:g}: remove it, or use another OUT")
    return bool(np.isin(ids, read_table(sub / "per_sample.parquet")["sample_id"].to_numpy()).all())


def recipes(base: Recipe, eps: float, run_dir, variants, pgd_steps: int = 10, judges=None) -> dict[str, Recipe]:
    """The recipe of every variant: ``base`` with the variant's method at ``eps`` (times the
    variant's factor), PGD-``pgd_steps`` in training, BAT reading RUN's scores (and the judged
    variants the harmfulness table ``judges``)."""
    flat = {k: v for k, v in base.to_dict().items() if k != "method"}
    out = {}
    for name in variants:
        if name not in GRID:
            raise ValueError(f"unknown variant {name!r}; choose from {list(GRID)}")
        spec = dict(GRID[name])
        factor = spec.pop("eps_factor", 1.0)
        if spec["method"] != "standard":
            spec["eps"] = eps * factor
            spec["pgd_steps"] = pgd_steps
        if spec["method"] == "bat":
            spec["scores"] = str(run_dir)
        if spec.get("judges") == JUDGED:
            if judges is None:
                raise ValueError(f"variant {name!r} needs a harmfulness table (judges: finding (b)'s "
                                 "harmfulness.parquet in the study's records)")
            spec["judges"] = str(judges)
        out[name] = Recipe.from_flat(**{**flat, **spec})
    return out


def frontier(clean, robust, at):
    """AutoAttack accuracy of the upper frontier of the points (clean, robust) at clean
    accuracy ``at``: the Pareto points joined by straight lines, flat beyond both ends."""
    order = np.argsort(clean)[::-1]
    pareto = []  # by clean accuracy descending, robust accuracy ascending strictly
    for i in order:
        if not pareto or robust[i] > robust[pareto[-1]]:
            pareto.append(i)
    c, r = np.asarray(clean)[pareto][::-1], np.asarray(robust)[pareto][::-1]
    return np.interp(at, c, r)


def frontier_gaps(per_seed: pd.DataFrame, variants, baselines=BASELINES, metric: str = "autoattack",
                  samples: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each variant's robust accuracy (column ``metric``) minus the baselines' frontier at its
    clean accuracy, per seed (that seed's baselines), with its interval, which the verdict
    reads: over seeds and test samples (:func:`gap_interval`) where ``samples`` (the per-sample
    records behind ``per_seed``) are given, else t over seeds. A seed counts only where every
    baseline measured at any seed is measured (AutoAttack on seed 0 of most baselines but every
    seed of PGD-AT: the other seeds' frontier would be PGD-AT's alone). One seed has no interval
    over seeds, whatever its test samples say (they give its ``gap_low``, ``gap_high``)."""
    present = [b for b in baselines if b in per_seed.index.get_level_values("variant")]
    rows = []
    for v in variants:
        gaps = {}
        for seed, g in per_seed.groupby(level="seed"):
            g = g.droplevel("seed")
            base = g.loc[[b for b in present if b in g.index]]
            if v in g.index and len(base) == len(present) > 0:
                gaps[seed] = g.loc[v, metric] - frontier(base["clean"].to_numpy(), base[metric].to_numpy(),
                                                         g.loc[v, "clean"])
        if gaps:
            mean, lo, hi = t_interval(list(gaps.values())) if samples is None else \
                gap_interval(samples, v, list(gaps), present, metric)
            verdict = ("one seed: no interval over seeds" if len(gaps) == 1 else "beyond the curve" if lo > 0 else
                       "inside the curve" if hi < 0 else "on the curve (not resolved)")
            rows.append({"variant": v, "attack": metric, "seeds": len(gaps), "gap": mean, "gap_low": lo, "gap_high": hi,
                         "verdict": verdict})
    return pd.DataFrame(rows)


def gap_interval(samples: pd.DataFrame, variant: str, seeds, baselines, metric: str, n_boot: int = 2000,
                 confidence: float = 0.95, rng: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of ``variant``'s gap to the frontier of ``baselines`` over ``seeds`` (a
    seed, or a list), counting which seeds were trained and which test samples were drawn
    (:func:`memtool.experiments.seeds_and_samples_interval`): each seed's gap, and its variance
    over ``n_boot`` draws of the test samples, the same draw for every model and every seed (the
    frontier is not linear in the samples, so its sample variance is bootstrapped)."""
    seeds = list(seeds) if isinstance(seeds, (list, tuple, np.ndarray)) else [seeds]
    at = samples[samples["seed"].isin(seeds) & samples["variant"].isin([*baselines, variant])]
    ids = np.sort(at["sample_id"].unique())
    acc = {}  # (variant, seed) -> (n, 2): clean, robust per sample
    for (v, seed), g in at.groupby(["variant", "seed"]):
        g = g.sort_values("sample_id")
        if not np.array_equal(g["sample_id"].to_numpy(), ids):
            raise ValueError(f"{v} at seed {seed}: the models' records cover different test samples; the interval "
                             "pairs them")
        acc[v, seed] = g[["clean", metric]].to_numpy(float)
    draws = np.random.default_rng(rng).multinomial(len(ids), np.full(len(ids), 1 / len(ids)), n_boot) / len(ids)

    def gap(seed, w):  # the gap at ``seed`` under each row of sample weights ``w``
        means = {v: w @ acc[v, seed] for v in (*baselines, variant)}  # (rows, 2): clean, robust
        base = np.stack([means[b] for b in baselines], axis=1)
        return np.array([means[variant][i, 1] - frontier(base[i, :, 0], base[i, :, 1], means[variant][i, 0])
                         for i in range(len(w))])

    gaps = np.array([gap(seed, np.full((1, len(ids)), 1 / len(ids)))[0] for seed in seeds])
    drawn = np.array([gap(seed, draws) for seed in seeds])  # (seeds, draws)
    return (float(gaps.mean()), *seeds_and_samples_interval(gaps, drawn.var(1, ddof=1), drawn.mean(0).var(ddof=1),
                                                            confidence))


def agreement(strong: pd.DataFrame, weak: pd.DataFrame, attack: str = "autoattack", cheaper: str = "cw20") -> dict:
    """How the ``cheaper`` attack (a column of ``weak``) agrees with the stronger ``attack`` (of
    ``strong``) on the models and samples both have: per-sample agreement, the cheaper attack's
    excess accuracy per model (mean, min, max), and the rank correlation of the models."""
    from scipy.stats import spearmanr

    key = ["variant", "seed", "sample_id"]
    both = strong[key + [attack]].merge(weak[key + [cheaper]], on=key)
    if both.empty:
        return {}
    per_model = both.groupby(["variant", "seed"])[[attack, cheaper]].mean()
    excess = per_model[cheaper] - per_model[attack]
    robust = per_model[per_model[attack] > 0]
    varied = len(robust) > 2 and robust[cheaper].nunique() > 1 and robust[attack].nunique() > 1
    rho = float(spearmanr(robust[cheaper], robust[attack])[0]) if varied else float("nan")  # constant: undefined
    return {"attack": attack, "cheaper": cheaper, "models": len(per_model),
            "samples_per_model": int(len(both) / len(per_model)),
            "per_sample_agreement": float((both[attack] == both[cheaper]).mean()),
            "excess_mean": float(excess.mean()), "excess_min": float(excess.min()), "excess_max": float(excess.max()),
            "spearman_models": rho}


@dataclass(frozen=True)
class Comparison(StudySettings):
    variants: tuple[str, ...] | None = setting(None, f"names from GRID (default: {DEFAULT})")
    val_samples: int = setting(0, "adversarial models keep their best-PGD-20 epoch on this many held-out training "
                                  "samples (0: the last epoch)")
    aa_samples: int = setting(1000, "AutoAttack on the first N test samples (with aa_atypical: the first N typical ones)")
    aa_atypical: bool = setting(False, "AutoAttack also on every atypical test sample")
    aa_attack: str = setting("autoattack", "the robust evaluation of the attacked variants: autoattack (standard) | "
                                           "apgd (its APGD-CE + APGD-T, without FAB-T and Square)", choices=AA_ATTACKS)
    aa_check: tuple[str, ...] = setting((), "with aa_attack apgd: these variants' first seed also gets standard "
                                            "AutoAttack on the same samples (how far apgd's accuracy is above it)")
    margin: float | None = setting(None, "the pre-declared equivalence margin of BAT - PGD-AT under the robust "
                                         "evaluation (accuracy, e.g. 0.01; docs/bat.md): 'equivalent' only within it")
    aa_variants: tuple[str, ...] | None = setting(None, "the variants AutoAttack runs on, or 'headline' "
                                                        "(default: all)")
    aa_seeds: int | None = setting(None, "AutoAttack on the first N seeds of those (default: every seed)")
    aa_all_seeds: tuple[str, ...] = setting((), "of those, the variants AutoAttack runs on at every seed all the same "
                                                "(e.g. pgd-at: the recipe's targets are means over seeds)")
    judges: str | None = setting(None, "harmfulness table of the 'bat judged' variants (finding (b)'s "
                                       "harmfulness.parquet)")
    tuned: str | None = setting(None, "a bat_tuning.parquet: each BAT family's chosen variant joins the variants")
    curve_seeds: int | None = setting(None, "PGD-AT's eps-curve points (not pgd-at itself) at only the first N seeds "
                                            "(default: every seed)")


def with_tuned(variants: list, aa_variants, aa_all_seeds, chosen: list) -> tuple[list, list | None, list]:
    """(variants, aa_variants, aa_all_seeds) with each BAT family's ``chosen`` variant joining
    them: a tuned variant is a default point, so it gets AutoAttack wherever the lists name
    variants, ``"headline"`` (the curves and every method's default point) included."""
    chosen = [v for v in chosen if v not in variants]
    variants = variants + chosen
    if aa_variants in ("headline", ("headline",), ["headline"]):
        aa_variants = [v for v in variants if v in HEADLINE or v in chosen]
    elif aa_variants is not None:
        aa_variants = [*aa_variants, *chosen]
    return variants, aa_variants, [*aa_all_seeds, *chosen] if aa_all_seeds else aa_all_seeds


def run(run_dir, out, *, seeds: int = 3, eps: float | None = None, pgd_steps: int = 10, variants=None,
        val_samples: int = 0, aa_samples: int = 1000, aa_atypical: bool = False, aa_attack: str = "autoattack",
        aa_check=(), margin: float | None = None, aa_variants=None, aa_seeds: int | None = None,
        aa_all_seeds=(), judges=None, tuned=None, curve_seeds=None, thresholds: Thresholds = Thresholds(),
        recipe: Recipe | None = None,
        backend: str = "pyautoattack", device: str = "cpu", data_root=None, progress: bool = True) -> pd.DataFrame:
    """Run the comparison on ``run_dir``'s scores into ``out`` (see the module docstring);
    ``variants``: names from :data:`GRID` (default: all); ``val_samples``: every adversarial
    model keeps its epoch of best PGD-20 accuracy on that many held-out training samples
    (``memtool train --val-samples N --select best-pgd``; 0: the last epoch);
    ``aa_variants``: those that get AutoAttack (default: all of ``variants``; ``"headline"``:
    those in :data:`HEADLINE`), on their first ``aa_seeds`` seeds (default: every seed), those in
    ``aa_all_seeds`` on every seed; on the first ``aa_samples`` test samples, or with
    ``aa_atypical`` the first ``aa_samples`` typical ones and every atypical one; ``aa_attack``
    ``"apgd"``: APGD-CE + APGD-T instead, and standard AutoAttack on the same samples at the
    first seed of ``aa_check`` (their agreement is reported); ``margin``: the declared
    equivalence margin (recorded for the verdicts); ``curve_seeds``: the eps curve's other
    points on the first N seeds only (their frontier then spans those seeds); ``tuned``: a table of :mod:`analyses.bat_tuning`, whose chosen
    variants join ``variants`` (and ``aa_variants``, ``aa_all_seeds`` where those are lists; ``"headline"`` includes them)."""
    run_dir, out = Path(run_dir), Path(out)
    st = load_study(run_dir, eps, thresholds, device, data_root)
    cfg, eps = st.config, st.eps
    if cfg.label_noise:
        raise ValueError(f"{run_dir} planted label noise ({cfg.label_noise}); memtool train seeds label noise with "
                         "the model seed, so its models would see other labels: use a run without --label-noise")
    atyp = st.atypical_test
    n_test = len(atyp)
    pool = np.flatnonzero(~atyp) if aa_atypical else np.arange(n_test)
    if not 1 <= aa_samples <= len(pool):
        raise ValueError(f"aa_samples must be in 1..{len(pool)} (the {'typical ' * aa_atypical}test samples), "
                         f"got {aa_samples}")
    aa_ids = np.sort(np.concatenate([pool[:aa_samples], np.flatnonzero(atyp) if aa_atypical else []])).astype(int)
    check_choice("aa_attack", aa_attack, AA_ATTACKS)
    if aa_check and aa_attack != "apgd":
        raise ValueError(f"aa_check runs standard AutoAttack beside apgd: set aa_attack apgd, or leave aa_check empty "
                         f"(got aa_attack {aa_attack!r})")
    chosen = [] if tuned is None else list(read_table(tuned).attrs["memtool"]["chosen"].values())
    variants, aa_variants, aa_all_seeds = with_tuned(list(variants or DEFAULT), aa_variants, aa_all_seeds, chosen)
    todo = recipes(recipe or cfg.recipe, eps, run_dir, variants, pgd_steps, judges)
    attacked = [v for v in todo if aa_variants is None or v in aa_variants]
    for name, chosen, among, what in (("aa_variants", aa_variants, todo, "variants"),
                                      ("aa_all_seeds", aa_all_seeds, attacked, "aa_variants"),
                                      ("aa_check", aa_check, attacked, "aa_variants")):
        unknown = set(chosen or ()) - set(among)
        if unknown:
            raise ValueError(f"{name} {sorted(unknown)} are not among the {what} {list(among)}")
    if aa_seeds is not None and not 1 <= aa_seeds <= seeds:
        raise ValueError(f"aa_seeds must be in 1..{seeds} (the seeds), got {aa_seeds}")
    model_seeds = experiment_seeds(cfg.seed, seeds)
    if curve_seeds is not None and not 1 <= curve_seeds <= seeds:
        raise ValueError(f"curve_seeds must be in 1..{seeds} (the seeds), got {curve_seeds}")
    on_curve = set(PGD_CURVE) - {"pgd-at"}
    jobs = [(v, s) for s in range(seeds) for v in todo  # seed by seed: a whole first seed exists early
            if v not in on_curve or s < (curve_seeds or seeds)]
    dirs = {(v, s): out / "models" / f"{slug(v)}-s{s}" for v, s in jobs}
    kw = dict(progress=False, device=device, data_root=data_root)

    def config(v, s):  # no test-set check during training: the evaluation below is the measurement
        select = {"val_samples": val_samples, "select": "best-pgd"} if val_samples and todo[v].method.name != \
            "standard" else {}
        return TrainConfig(dataset=cfg.dataset, limit=cfg.limit, seed=model_seeds[s], recipe=todo[v], eval_samples=0,
                           **select)

    aa_jobs = [(v, s) for v, s in jobs if v in attacked and (s < (aa_seeds or seeds) or v in aa_all_seeds)]
    tracked = [j for j in jobs if val_samples and j[0] in LAST_EPOCH]  # robust overfitting (Rice et al.); in order

    checked = [(v, 0) for v in aa_check if (v, 0) in aa_jobs]  # also standard AutoAttack, beside apgd
    evaluations = {"eval": dict(attacks=ATTACKS), "eval-last": dict(attacks=ATTACKS, weights="last"),
                   aa_attack: dict(attacks=f"clean,{aa_attack}", sample_ids=aa_ids, backend=backend)}
    if checked:
        evaluations["autoattack"] = dict(attacks="clean,autoattack", sample_ids=aa_ids, backend=backend)
    all_ids = np.arange(n_test)

    def recorded(j, sub) -> bool:  # refuses a recorded evaluation of other settings
        return evaluation_recorded(dirs[j] / sub, eps, evaluations[sub]["attacks"],
                                   evaluations[sub].get("sample_ids", all_ids))

    def owes_last(j) -> bool:  # PGD-AT and BAT at their last epoch too, where it is not the kept one
        return j in tracked and kept_epoch(dirs[j]) != todo[j[0]].epochs

    def fit_model(j):
        owed = ["eval"] + [aa_attack] * (j in aa_jobs) + ["autoattack"] * (j in checked)  # then the checkpoint may go
        if (dirs[j] / SELECTED).exists() and all(recorded(j, sub) for sub in owed + ["eval-last"] * owes_last(j)):
            check_trained(config(*j), dirs[j], data_root)  # recorded: no checkpoint needed, the settings checked
            return
        if not (dirs[j] / "checkpoint.pt").exists():  # unfinished evaluations of a model that is gone
            for sub in evaluations:
                if (dirs[j] / sub).exists() and not recorded(j, sub):
                    shutil.rmtree(dirs[j] / sub)
        model = train(config(*j), dirs[j], **kw)
        now = {"epoch": selected_epoch(load_checkpoint(dirs[j]))[0], "weights_sha": weights_digest(model)}
        if (dirs[j] / SELECTED).exists() and read_json(dirs[j] / SELECTED) != now:  # retrained, and not the same
            print(f"{dirs[j]}: the retrained model differs from the one its evaluations measured; they run again",
                  file=sys.stderr)
            for sub in evaluations:
                shutil.rmtree(dirs[j] / sub, ignore_errors=True)
        write_json(dirs[j] / SELECTED, now)

    def evaluated(sub):
        return lambda j: recorded(j, sub) or evaluate(dirs[j], dirs[j] / sub, eps=eps, **evaluations[sub], **kw)

    def model(j):  # trained and evaluated in one go: its records are complete (committable) early
        fit_model(j)
        evaluated("eval")(j)
        if owes_last(j):
            evaluated("eval-last")(j)
        if j in aa_jobs:  # at once, while the checkpoint is here: a fresh clone would have to retrain it
            evaluated(aa_attack)(j)
        if j in checked:
            evaluated("autoattack")(j)

    # several processes may share the work, seed by seed: a whole first seed, AutoAttack included, exists early
    shared(jobs, "model", model, desc="train, PGD-20, CW-20, AutoAttack", claims=out / "claims", progress=progress,
           name=lambda j: f"{slug(j[0])}-s{j[1]}")
    best = {j: kept_epoch(dirs[j]) for j in tracked}
    last = {j: "eval-last" if owes_last(j) else "eval" for j in tracked}

    def records(sub, which, suffix=""):
        subs = sub if isinstance(sub, dict) else dict.fromkeys(which, sub)
        return pd.concat([read_table(dirs[j] / subs[j] / "per_sample.parquet").assign(variant=j[0] + suffix, seed=j[1],
                                                                                       split="test")
                          for j in which], ignore_index=True)

    groups = {"all test": np.ones(n_test, bool), "typical test": ~atyp, "atypical test": atyp}
    baseline = "pgd-at" if "pgd-at" in todo else None
    evals = records("eval", jobs)
    on_aa = records(aa_attack, aa_jobs) if aa_jobs else evals.iloc[:0].assign(**{aa_attack: False})
    with_last = pd.concat([evals, records(last, list(last), LAST)]) if last else evals
    in_aa = np.isin(all_ids, aa_ids)
    plain = ATTACKS.split(",")
    table = pd.concat([
        summarize(with_last, groups, baseline=baseline, metrics=dict(zip(plain, plain))),
        summarize(on_aa, {k: m & in_aa for k, m in groups.items()}, baseline=baseline, metrics={aa_attack: aa_attack})
        if attacked else None,
    ], ignore_index=True)
    table.insert(1, "method", table["variant"].map(lambda v: todo[v.removesuffix(LAST)].method.name))

    aa = on_aa.groupby(["variant", "seed"], sort=False)[["clean", aa_attack]].mean()
    first = evals[in_aa[evals["sample_id"]]]  # CW-20 on the samples the robust evaluation attacked
    cw = first.groupby(["variant", "seed"], sort=False)[["clean", "cw20"]].mean()
    others = [v for v in todo if v not in BASELINES]
    gaps = pd.concat([frontier_gaps(aa, [v for v in others if v in attacked], metric=aa_attack, samples=on_aa),
                      frontier_gaps(cw, others, metric="cw20", samples=first)], ignore_index=True)
    agree = {"cw20": agreement(on_aa, evals, aa_attack)}
    if checked:
        agree["apgd"] = agreement(records("autoattack", checked), on_aa, "autoattack", "apgd")
        agree["apgd"]["stands_in"] = agree["apgd"]["excess_max"] <= STAND_IN  # the verdicts read it (docs/bat.md)
    info = {"run": str(run_dir), "dataset": st.meta["dataset"], "eps": eps, "seeds": seeds,
            "train_attack": f"pgd{pgd_steps}", "aa_samples": aa_samples, "aa_atypical": aa_atypical,
            "aa_attack": aa_attack, "aa_n": len(aa_ids), "aa_check": list(aa_check), "margin": margin, "n_test": n_test,
            "n_atypical_test": int(atyp.sum()), "n_atypical_train": int(st.atypical_train.sum()),
            "mem_threshold": thresholds.mem_threshold, "recipe": (recipe or cfg.recipe).to_dict(),
            "aa_variants": attacked, "aa_seeds": aa_seeds or seeds, "aa_all_seeds": list(aa_all_seeds),
            "val_samples": val_samples, "curve_seeds": curve_seeds or seeds,
            "best_epochs": {f"{v} s{s}": e for (v, s), e in best.items()},
            "frontier_gaps": gaps.to_dict("records"), "agreement": agree,
            "intervals": "seeds and test samples"}  # memtool.experiments.crossed_interval (older tables: seeds alone)
    write_table(table, out / "bat_comparison.parquet", info)
    (out / "bat_comparison.md").write_text(report(table, gaps, info, cfg.dataset))
    figure(on_aa, first, out / "bat_comparison.png", cfg.dataset, eps, len(aa_ids), aa_attack)
    return table


def _cell(r) -> str:
    """mean (low to high) of the 95 % interval in %, or the mean alone (one seed); "-" where the
    group has no sample."""
    if np.isnan(r.accuracy):
        return "-"
    if np.isnan(r.ci_low):
        return f"{100 * r.accuracy:.1f}"
    return f"{100 * r.accuracy:.1f} ({100 * r.ci_low:.1f} to {100 * r.ci_high:.1f})"


def _agreement_line(a: dict, attacked: list) -> str:
    name, cheap = METRICS[a["attack"]], METRICS[a["cheaper"]]
    return (f"On the {a['models']} models with both, {a['samples_per_model']} samples each: per-sample agreement "
            f"{100 * a['per_sample_agreement']:.1f} %; {cheap} accuracy exceeds {name}'s by "
            f"{100 * a['excess_mean']:.1f} points on average ({100 * a['excess_min']:.1f} to "
            f"{100 * a['excess_max']:.1f} over models); Spearman correlation of the models' accuracies (robust "
            f"models) {a['spearman_models']:.3f}. {name} ran on: {', '.join(attacked)}.")


def report(table: pd.DataFrame, gaps: pd.DataFrame, info: dict, dataset: str) -> str:
    """The markdown report: headline table, typical/atypical table, distance to the curve."""
    aa = info.get("aa_attack", "autoattack")
    metrics = ["clean", "pgd20", "cw20", aa]

    def wide(group):
        t = table[table["group"] == group]
        head = "| variant | " + " | ".join(METRICS[m] for m in metrics) + " |"
        lines = [head, "|---|" + "---|" * len(metrics)]
        for v in dict.fromkeys(t["variant"]):
            cells = []
            for m in metrics:
                r = t[(t["variant"] == v) & (t["metric"] == m)]
                cells.append(_cell(next(r.itertuples())) if len(r) else "-")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    r = info["recipe"]
    name = {"autoattack": "AutoAttack (standard)", "apgd": "APGD-CE + APGD-T (AutoAttack's first two attacks)"}[aa]
    where = (f"the first {info['aa_samples']} typical test samples and every atypical one ({info['aa_n']}; 'all "
             "test' is their union, the atypical ones over-represented)" if info.get("aa_atypical") else
             f"the first {info['aa_samples']} test samples")
    text = [f"# BAT against PGD-AT, TRADES, MART and GAIRAT on {dataset} (eps {info['eps']:g})", "",
            f"Scores: {info['run']} ({info['n_atypical_train']} atypical training samples, mem >= "
            f"{info['mem_threshold']}). Every model: {r['model']} (hidden {r['hidden']}), {r['epochs']} epochs, "
            f"batch {r['batch_size']}, lr {r['lr']} {r['schedule']}, {info['train_attack']} in training at eps "
            f"{info['eps']:g} (the eps sweep, and a variant that names another lr, excepted); {info['seeds']} seeds "
            "per variant, paired. " + (f"Adversarial models: the epoch of best PGD-20 accuracy (at their training eps) "
            f"on {info['val_samples']} held-out training samples; " if info.get("val_samples") else "Last epoch; ") +
            "the test set is never used for selection. Accuracy in %, mean (95 % interval over the seeds and the test "
            "samples: which seeds were trained, which samples drawn, the same for every seed). "
            f"Clean, PGD-20 and CW-20 on all {info['n_test']} test samples; {name} on {where}, "
            f"on the first {info.get('aa_seeds', info['seeds'])} seed(s)"
            + (f" ({', '.join(info['aa_all_seeds'])}: every seed)" if info.get("aa_all_seeds") else "") + "."
            + (f" Declared equivalence margin of BAT - PGD-AT under {METRICS[aa]}: ±{100 * info['margin']:g} points "
               "(docs/bat.md)." if info.get("margin") else ""), "",
            "## All test samples", "", wide("all test"), "",
            f"## Typical and atypical test samples ({info['n_atypical_test']} atypical of {info['n_test']})", "",
            "### typical", "", wide("typical test"), "",
            "### atypical", "", wide("atypical test"), "",
            "## BAT against the baselines' trade-off curve", "",
            "Robust accuracy minus the baselines' upper frontier (standard, PGD-AT at every eps, TRADES, MART, GAIRAT: "
            "their Pareto points joined by straight lines) at the variant's clean accuracy, in points, on the samples "
            f"{METRICS[aa]} attacked, per seed on which every baseline has the attack. {METRICS[aa]} where the variant "
            "has it; CW-20 for every variant (its agreement is below). Interval: over those seeds and the test samples "
            "(with one seed, over the test samples alone: it says nothing of the spread over seeds).", "",
            "| variant | attack | seeds | gap (95 % interval) | verdict |", "|---|---|---:|---|---|"]
    for g in gaps.itertuples():
        ci = "" if np.isnan(g.gap_low) else f" ({100 * g.gap_low:+.1f} to {100 * g.gap_high:+.1f})"
        text.append(f"| {g.variant} | {METRICS[g.attack]} | {g.seeds} | {100 * g.gap:+.1f}{ci} | {g.verdict} |")
    agree = info.get("agreement") or {}
    if agree.get("cw20"):
        text += ["", f"## CW-20 against {METRICS[aa]} (the cheaper attack that ranks the grid)", "",
                 _agreement_line(agree["cw20"], info["aa_variants"])]
    if agree.get("apgd"):
        text += ["", "## APGD-CE + APGD-T against standard AutoAttack (whether the cheaper one may stand in)", "",
                 _agreement_line(agree["apgd"], info["aa_check"]) + " By the rule declared in docs/bat.md (at most "
                 f"{100 * STAND_IN:g} points above on every checked model) it "
                 + ("stands in." if agree["apgd"]["stands_in"] else "does not stand in: rerun the robust evaluation with "
                    "standard AutoAttack (aa_attack autoattack) before reading a verdict.")]
    diffs = table[(table["group"] == "all test") & table["diff"].notna()] if "diff" in table.columns else []
    if len(diffs):
        text += ["", "## Paired differences to PGD-AT (points, 95 % CI)", "",
                 "| variant | " + " | ".join(METRICS[m] for m in metrics) + " |", "|---|---|---|---|---|"]
        for v in dict.fromkeys(diffs["variant"]):
            if v == "pgd-at":
                continue
            cells = []
            for m in metrics:
                d = next(diffs[(diffs["variant"] == v) & (diffs["metric"] == m)].itertuples(), None)
                cells.append("-" if d is None else f"{100 * d.diff:+.1f} (one seed)" if np.isnan(d.diff_low) else
                             f"{100 * d.diff:+.1f} ({100 * d.diff_low:+.1f} to {100 * d.diff_high:+.1f})")
            text.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(text) + "\n"


def off_panel(points: dict) -> list[str]:
    """The variants (name -> (clean, robust) accuracy) that would squash a plot of the robust
    models: robust below a quarter of the best robust accuracy, or clean more than 15 points
    below the best clean accuracy of the others."""
    top = max(r for _, r in points.values())
    low = [v for v, (_, r) in points.items() if r < top / 4]
    best_clean = max((c for v, (c, _) in points.items() if v not in low), default=np.nan)
    return [v for v, (c, r) in points.items() if v in low or c < best_clean - 15]


def zoom(intervals, margin: float, reach: float = 5.0) -> tuple[float, float]:
    """Axis limits around the means of ``intervals`` ((mean, low, high) each): the intervals
    shown up to ``reach`` beyond the means (a wider one, as from two seeds, runs off the
    panel instead of squashing it), plus ``margin``."""
    means = [m for m, _, _ in intervals]
    low = min(m if np.isnan(lo) else lo for m, lo, _ in intervals)  # one seed (NaN bounds): the mean
    high = max(m if np.isnan(hi) else hi for m, _, hi in intervals)
    return max(low, min(means) - reach) - margin, min(high, max(means) + reach) + margin


def place_labels(ax, labels, fontsize: float = 6.5) -> None:
    """Each (text, x, y) label next to its point, right of it or else left, moved up or down a
    line at a time until its drawn box overlaps no label placed before and no other labelled
    point (greedy, top label first)."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    marks = [Bbox.from_bounds(*(ax.transData.transform((x, y)) - 4), 8, 8) for _, x, y in labels]  # ~ a marker
    steps = [0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5, 6, -6]
    tries = [(side, k) for k in steps for side in (1, -1)]
    placed = []
    for i, (text, x, y) in sorted(enumerate(labels), key=lambda t: -t[1][2]):
        others = [m for j, m in enumerate(marks) if j != i]
        for n, (side, k) in enumerate(tries):
            note = ax.annotate(text, (x, y), xytext=(4 * side, 2 + 1.3 * fontsize * k), textcoords="offset points",
                               ha="left" if side > 0 else "right", fontsize=fontsize,
                               arrowprops=None if k == 0 else dict(arrowstyle="-", lw=0.4, color="0.6"))
            note.update_positions(renderer)
            box = Text.get_window_extent(note, renderer)  # the text's own box, not its leader line
            if n == len(tries) - 1 or not any(box.overlaps(b) for b in placed + others):
                break
            note.remove()
        placed.append(box)


def mark_clipped(ax, pts: dict, fontsize: float = 6) -> None:
    """Where an interval runs off the panel, its bound is written at the edge it crosses."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    for c, a in pts.values():
        for lo, hi, (e0, e1), horizontal in ((c[1], c[2], (x0, x1), True), (a[1], a[2], (y0, y1), False)):
            for bound, edge, inside in ((lo, e0, lo < e0), (hi, e1, hi > e1)):
                if np.isnan(bound) or not inside:
                    continue
                xy = (edge, a[0]) if horizontal else (c[0], edge)
                ax.annotate(f"{bound:.0f}", xy, fontsize=fontsize, color="0.4", ha="center", va="center",
                            xytext=((6 if edge == e0 else -6) if horizontal else 0,
                                    0 if horizontal else (5 if edge == e0 else -5)), textcoords="offset points")


def _points(samples: pd.DataFrame, metric: str) -> dict:
    """variant -> ((clean), (``metric``)) accuracy in %, each (mean, low, high) over the seeds and
    the test samples of ``samples`` (per-sample records); one seed: a point (NaN bounds)."""
    pts = {}
    for v, g in samples.groupby("variant", sort=False):
        pair = []
        for col in ("clean", metric):
            wide = g.pivot(index="seed", columns="sample_id", values=col).to_numpy(float)
            m, lo, hi = crossed_interval(wide, bounds=(0, 1)) if len(wide) > 1 else (wide.mean(), np.nan, np.nan)
            pair.append(100 * np.array([m, lo, hi]))
        pts[v] = tuple(pair)
    return pts


def figure(aa: pd.DataFrame, cw: pd.DataFrame, path, dataset: str, eps: float, n: int, attack: str = "autoattack"):
    """Clean against robust accuracy on the ``n`` attacked test samples (``aa``, ``cw``: their
    per-sample records): ``attack`` (left, the variants that have it) and CW-20 (right, every
    variant); each variant's mean with its intervals over seeds and test samples, the TRADES
    curve and the PGD-AT eps sweep joined by lines."""
    import matplotlib.pyplot as plt

    panels = [(aa, attack, METRICS[attack]), (cw, "cw20", "CW-20")]
    panels = [p for p in panels if len(p[0])]
    fig, axes = plt.subplots(1, len(panels), figsize=(7.2 * len(panels), 4.8), squeeze=False)
    curves = {"TRADES (beta 1, 3, 6)": ("C0", ["trades b=1", "trades b=3", "trades b=6"]),
              "PGD-AT (eps x0.5 to x1.25)": ("C2", list(PGD_CURVE))}  # BAT red, its ablations orange
    pending = []
    for ax, (frame, metric, name) in zip(axes[0], panels):
        pts = _points(frame, metric)
        for label, (color, names) in curves.items():
            names = [k for k in names if k in pts]
            if len(names) > 1:
                ax.plot([pts[k][0][0] for k in names], [pts[k][1][0] for k in names], "-", lw=1, alpha=0.6,
                        color=color, label=label)
        keyed, labels = [], []  # BAT's ablations crowd one spot: numbered, with a key
        for v, (c, a) in pts.items():
            bat = v.startswith("bat")
            xerr = None if np.isnan(c[1]) else [[c[0] - c[1]], [c[2] - c[0]]]
            yerr = None if np.isnan(a[1]) else [[a[0] - a[1]], [a[2] - a[0]]]
            ax.errorbar(c[0], a[0], xerr=xerr, yerr=yerr, fmt="*" if bat else "o", ms=9 if bat else 6, capsize=2,
                        color="C3" if v == "bat" else ("C1" if bat else "0.3"), alpha=0.8 if bat else 0.9)
            if bat and v != "bat":
                keyed.append(v)
            labels.append((str(len(keyed)) if bat and v != "bat" else v, c[0], a[0]))
        if keyed:
            ax.text(1.02, 1.0, "\n".join(f"{i} {v}" for i, v in enumerate(keyed, 1)), transform=ax.transAxes,
                    ha="left", va="top", fontsize=6.5, color="C1")
        off = off_panel({v: (c[0], a[0]) for v, (c, a) in pts.items()})
        shown = [pts[v] for v in pts if v not in off]
        ax.set_xlim(*zoom([c for c, _ in shown], 1))  # the means, and their intervals up to 5 points beyond
        ax.set_ylim(*zoom([a for _, a in shown], 3))
        mark_clipped(ax, {v: pts[v] for v in pts if v not in off})
        pending.append((ax, [lab for lab in labels if lab[0] not in off]))
        if off:  # the far-off points are named with their values
            ax.text(0.0, -0.12, "off the panel (clean, robust): " + "; ".join(
                f"{v} ({pts[v][0][0]:.1f}, {pts[v][1][0]:.1f})" for v in off), transform=ax.transAxes,
                ha="left", va="top", fontsize=6.5, color="0.35")
        ax.set(xlabel="clean accuracy (%)", ylabel=f"{name} accuracy (%, eps {eps:g})",
               title=f"{dataset}: clean vs {name} ({n} test samples, 95 % CI over seeds and samples)")
        ax.title.set_fontsize(9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False, fontsize=7, loc="lower left")
    fig.tight_layout()
    for ax, labels in pending:  # placed once the layout is final, so the boxes are where they will be drawn
        place_labels(ax, labels)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    study_main(__doc__, run, Comparison, argv)


if __name__ == "__main__":
    main()
