"""The estimator's driver: plan -> train trial batches -> trial files -> score tables.

One call of :func:`estimate` trains every trial of ``range(trials)`` that the run directory
does not hold yet (in this process's shard), ``ensemble_size`` models at a time, and then
(if nothing is missing) writes the score tables. Interrupting it loses at most the batch in
flight; the same call again picks up where it stopped and gives the same scores.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Runtime, check_int, check_number, device_name, setting, split_settings
from ..datasets import load_dataset
from ..userdata import in_memory, register_data
from ..engine import Models, as_floats, default_ensemble_size, fit
from ..models import check_output
from ..progress import progress_bar
from ..recorder import Recorder
from ..recipe import trial_seed, user_settings
from . import plan
from .config import EstimateConfig
from .store import (append_log, claim, claim_path, finished_trials, init_run, note_asked, stored_trials,
                    write_trials)
from .tables import Thresholds, compute_tables


FIT_THRESHOLD = 0.99  # mean accuracy of a standard-trained model on its own subset below which it warns


def fit_warning(cfg: EstimateConfig, train_acc_in_subset: float) -> str | None:
    """A warning when standard-trained models do not fit their own subsets: memorization is
    defined for models that interpolate their training data, so mem is then underestimated
    (planted label noise is not recovered). Adversarial methods are not expected to fit."""
    if cfg.recipe.method.adversarial or not train_acc_in_subset < FIT_THRESHOLD:
        return None
    r = cfg.recipe
    if cfg.train_fn is not None:
        return (f"the models of {cfg.train_fn} reach only {train_acc_in_subset:.3f} mean accuracy on their own training "
                f"subsets (< {FIT_THRESHOLD}): they do not fit them, so mem underestimates memorization")
    return (f"the models reach only {train_acc_in_subset:.3f} mean accuracy on their own training subsets "
            f"(< {FIT_THRESHOLD}): they do not fit them, so mem underestimates memorization. Train longer "
            f"(--epochs, now {r.epochs})" + (f" or at a constant learning rate (--schedule constant, now {r.schedule})"
                                             if r.schedule != "constant" else "") + " in a new run directory")


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int]:
    """'i/N' -> (i, N): this process takes trial batches i, i+N, i+2N, ..."""
    if shard is None:
        return 0, 1
    if isinstance(shard, str):
        try:
            i, n = (int(v) for v in shard.split("/"))
        except ValueError:
            raise ValueError(f"shard must look like 'i/N' (e.g. 0/4), got {shard!r}") from None
    else:
        i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard index must be in 0..N-1, got {i}/{n}")
    return i, n


def consecutive(ids) -> list[np.ndarray]:
    """Sorted ``ids`` split at gaps: each trial file holds consecutive ids."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    return [r for r in np.split(ids, np.flatnonzero(np.diff(ids) != 1) + 1) if len(r)]


def pending_batches(done: set[int], trials: int, k: int, shard=(0, 1)) -> list[np.ndarray]:
    """Runs of at most ``k`` consecutive unfinished trial ids; block b goes to shard b % N."""
    i, n = shard
    out = []
    for block in range(i, (trials + k - 1) // k, n):
        out += consecutive([t for t in range(block * k, min((block + 1) * k, trials)) if t not in done])
    return out


def train_batch(cfg: EstimateConfig, data: dict, trial_ids: np.ndarray, device: str = "cpu",
                eval_batch: int = 1024, on_step=None, record_proxies: bool = False) -> dict:
    """Train the trials ``trial_ids`` (stacked where the architecture allows) and return their
    (K, n) margin records, and with ``record_proxies`` their (K, n_train) proxies
    (``proxy_<name>``, :mod:`memtool.proxies`; NaN where a trial did not train on a sample)."""
    n = len(data["y_train"])
    members = plan.subset_indices(n, cfg.ratio, cfg.seed, trial_ids)
    seeds = [trial_seed(cfg.seed, int(t)) for t in trial_ids]
    dev = torch.device(device)  # a no-op when the data already lives there (estimate moves it once)
    host = data.get("on_host", False)  # data larger than the device: batches are moved one at a time
    xy = {split: tuple(t if host else t.to(dev) for t in (data[f"x_{split}"], data[f"y_{split}"]))
          for split in ("train", "test")}
    recorder = Recorder(*xy["train"], seeds, cfg.recipe) if record_proxies else None
    if cfg.trainer is not None:
        models = user_trained(cfg, data, members, seeds, dev, on_step)
    else:
        models = fit(cfg.recipe, *xy["train"], members, seeds, num_classes=data["num_classes"],
                     ensemble_size=len(trial_ids), on_step=on_step, recorder=recorder, device=dev)
    rec = {f"{split}_margin": models.margins(*xy[split], batch=eval_batch).numpy() for split in xy}
    if recorder is not None:
        rec.update({f"proxy_{k}": v for k, v in recorder.result().items()})
    if cfg.robust:
        rec.update({f"{split}_rob_margin": models.margins(*xy[split], robust=cfg.robust_eps, batch=eval_batch,
                                                          key=key).numpy() for key, split in enumerate(xy)})
    return rec


def user_trained(cfg: EstimateConfig, data: dict, members, seeds, device, on_step=None) -> Models:
    """The user's own loop, ``cfg.trainer(dataset, subset_ids, seed) -> nn.Module``, once per
    trial (``on_step(1)`` after each): memtool keeps the plan and the seeds, and measures what
    comes back."""
    out, ds = [], data["dataset"]
    for ids, seed in zip(members, seeds):
        model = cfg.trainer(ds, np.asarray(ids), int(seed))
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"train_fn {cfg.train_fn} returned {type(model).__name__}; it must return the trained "
                            "nn.Module")
        check_output(model.to(device), f"returned by train_fn {cfg.train_fn}", ds.image_shape, ds.num_classes)
        out.append(([len(out)], model.eval()))
        if on_step is not None:
            on_step(1)
    return Models(cfg.recipe, seeds, out)


def _tensors(ds, device="cpu", on_host: bool = False) -> dict:
    """The whole dataset as float tensors on ``device`` (uint8 pixels scaled to [0, 1]); with
    ``on_host``, as it is in host memory (a memory map stays one: batches are read from it)."""
    def img(a):  # torch.tensor copies: the dataset's arrays may be read-only views of its files
        if on_host:  # no copy: a read-only memory map stays one (memtool never writes to the data)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(np.asarray(a))
        return as_floats(torch.tensor(a), device)

    return {"x_train": img(ds.x_train), "y_train": torch.tensor(ds.y_train, device=device),
            "x_test": img(ds.x_test), "y_test": torch.tensor(ds.y_test, device=device),
            "shape": ds.image_shape, "num_classes": ds.num_classes, "dataset": ds, "on_host": on_host}


@dataclass(frozen=True)
class DataSpec:
    """What a worker needs to load the run's data itself: a task carries this, not the data."""

    dataset: str
    data_root: str | None
    limit: int | None
    label_noise: float
    seed: int
    fingerprint: str
    source: object = field(default=None, compare=False, hash=False)  # arrays given in Python travel with the task


@functools.lru_cache(maxsize=2)
def load_data(spec: DataSpec) -> dict:
    """The run's data as tensors, loaded once per worker process and checked by fingerprint."""
    if spec.source is not None:
        register_data(spec.source)
    ds = load_dataset(spec.dataset, spec.data_root, spec.limit, spec.label_noise, spec.seed)
    if ds.fingerprint != spec.fingerprint:
        raise RuntimeError(f"the worker on {socket.gethostname()} loaded {spec.dataset} from data root "
                           f"{spec.data_root} with fingerprint {ds.fingerprint}, but the run's data have "
                           f"{spec.fingerprint}: give every worker the same data files (--data-root on a shared "
                           "file system)")
    return _tensors(ds)


def _run_batch(run, cfg, data, ids, device, eval_batch, threads=None, on_step=None, record_proxies=False) -> list[dict]:
    """Claim the trials ``ids``, train those no other process holds or has finished, store
    them; returns one log record per trial file written."""
    if threads:
        torch.set_num_threads(threads)
    if isinstance(data, DataSpec):
        data = load_data(data)
    claims = claim(run, ids)
    try:
        done = stored_trials(run)  # after claiming: a trial finished meanwhile is not trained again
        step = (lambda n: (claims.beat(), on_step(n))) if on_step else claims.beat  # noqa: E731
        return [_train_and_store(run, cfg, data, part, device, eval_batch, step, record_proxies)
                for part in consecutive([t for t in claims.trials if t not in done])]
    finally:
        claims.release()


def _train_and_store(run, cfg, data, ids, device, eval_batch, on_step, record_proxies=False) -> dict:
    t0 = time.perf_counter()
    rec = train_batch(cfg, data, ids, device, eval_batch, on_step, record_proxies)
    member = plan.membership(len(data["y_train"]), cfg.ratio, cfg.seed, ids)
    path = write_trials(run, ids, member, rec)
    log = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "trials": [int(ids[0]), int(ids[-1])],
           "seconds": round(time.perf_counter() - t0, 3), "file": path.name, "host": socket.gethostname(),
           "device": device_name(device), "pid": os.getpid(),
           "train_acc_in_subset": float((rec["train_margin"] > 0)[member].mean()),
           "test_acc": float((rec["test_margin"] > 0).mean())}
    if "test_rob_margin" in rec:
        log["test_rob_acc"] = float((rec["test_rob_margin"] > 0).mean())
    append_log(run, log)
    return log


@dataclass(frozen=True)
class Execution(Runtime):
    """How an estimation runs: none of it changes any trial's result."""

    trials: int = setting(64, "number of trained models (>= 2); more can be added to a finished run later")
    ensemble_size: int | None = setting(None, "models trained at once (default: by model and device)")
    n_jobs: int = setting(1, "worker processes over trial batches")
    scheduler: str | None = setting(None, "Dask scheduler address, e.g. tcp://host:8786")
    shard: str | None = setting(None, "i/N: train only this share of the trial batches (SLURM arrays)")
    eval_batch: int = setting(1024, "samples per evaluation batch")
    record_proxies: bool = setting(False, "also record each trial's one-run proxies (memtool.proxies: csl, "
                                          "forgetting, ...; score-table columns) from its own training")
    data_on_host: bool = setting(False, "keep the data in host memory (a memory map stays one) and move one batch "
                                        "at a time to the device: for data larger than device memory; same trials")
    until_se: float | None = setting(None, "add trials in batches until the 95th percentile of mem_se over the "
                                           "training samples is <= X; --trials is then the most it trains")
    until_pairs: float | None = setting(None, "add trials in rounds (doubling) until the split-half Jaccard of the "
                                              "high-influence pairs is >= X; --trials is then the most it trains")

    def __post_init__(self):
        super().__post_init__()
        check_int("trials", self.trials, 2)  # with one trial no sample is both in and out
        check_number("until_se", self.until_se, 0, low_open=True, optional=True)
        check_number("until_pairs", self.until_pairs, 0, 1, low_open=True, optional=True)
        if self.data_on_host and self.record_proxies:
            raise ValueError("record_proxies needs the data on the device: drop --data-on-host or --record-proxies")
        if self.until_se is not None and self.until_pairs is not None:
            raise ValueError("give one stopping rule: --until-se or --until-pairs, not both")
        for rule in ("until_se", "until_pairs"):
            if getattr(self, rule) is not None and self.shard is not None:
                raise ValueError(f"{rule} needs the whole run in one call; with --shard, give a fixed --trials")
        check_int("ensemble_size", self.ensemble_size, 1, optional=True)
        check_int("n_jobs", self.n_jobs, 1)
        check_int("eval_batch", self.eval_batch, 1)
        parse_shard(self.shard)


def estimate(out: str | Path, trials: int | None = None, *, config: EstimateConfig | None = None,
             progress: bool = True, tables: bool = True, **settings) -> dict:
    """Run (or resume) the subsampling estimator into run directory ``out``.

    ``settings`` by their command-line names: the run's (:class:`EstimateConfig`: ``dataset``,
    ``limit``, ``label_noise``, ``ratio``, ``seed``, ``robust``, ...), the recipe's
    (:class:`memtool.recipe.Recipe`: ``model``, ``epochs``, ``lr``, ...; ``method`` and its
    parameters, :mod:`memtool.methods`), the execution's (:class:`Execution`: ``trials``,
    ``ensemble_size``, ``device``, ``n_jobs``, ``scheduler``, ``shard``, ``data_root``; they do
    not change any trial's result) and the tables' (:class:`Thresholds`).

    With ``tables`` (default) the score tables are written once every trial is finished.
    Returns the run summary, with ``status`` 'complete', or 'partial' while trials are missing
    (other shards) or the tables were not asked for."""
    if trials is not None:
        settings["trials"] = trials
    ex, thr, rest = split_settings(settings, Execution, Thresholds)
    ex, thr = Execution(**ex), Thresholds(**thr)
    if config is not None and rest:
        raise TypeError(f"give either a config or its settings, not both (got {sorted(rest)})")
    cfg = config or EstimateConfig.from_kwargs(**user_settings(rest), also=[*Execution.__dataclass_fields__,
                                                                           *Thresholds.__dataclass_fields__,
                                                                           "progress", "tables"])
    if ex.until_se is not None or ex.until_pairs is not None:
        return _until(out, cfg, ex, thr, progress, tables)
    trials, ensemble_size, device, n_jobs, scheduler = ex.trials, ex.ensemble_size, ex.device, ex.n_jobs, ex.scheduler
    data_root, shard, eval_batch = ex.data_root, ex.shard, ex.eval_batch
    ds = load_dataset(cfg.dataset, data_root, cfg.limit, cfg.label_noise, cfg.seed)
    cfg.check_trainer()
    if cfg.recipe.method.adversarial or cfg.robust:
        ds.check_attackable(f"method {cfg.recipe.method.name}" if cfg.recipe.method.adversarial else "--robust")
    cfg = replace(cfg, recipe=replace(cfg.recipe, method=cfg.recipe.method.bind(ds)))
    init_run(out, cfg.to_dict(), ds, command=sys.argv if Path(sys.argv[0]).name == "memtool" else None,
             model=None if cfg.trainer is not None else cfg.recipe.model_record(ds.image_shape, ds.num_classes))
    note_asked(out, trials)
    k = ensemble_size or default_ensemble_size(cfg.recipe, device, int(np.prod(ds.image_shape)))
    done = finished_trials(out)
    batches = pending_batches(done, trials, k, parse_shard(shard))
    local = n_jobs == 1 and scheduler is None
    data = _tensors(ds, device, ex.data_on_host) if local else DataSpec(
        cfg.dataset, None if data_root is None else str(data_root), cfg.limit, cfg.label_noise, cfg.seed,
        ds.fingerprint, in_memory(cfg.dataset))
    steps = 1 if cfg.trainer is not None else cfg.recipe.steps(plan.subset_size(len(ds.y_train), cfg.ratio))
    say = (lambda s: tqdm.write(s, file=sys.stderr)) if progress else (lambda s: None)
    n, finished = sum(map(len, batches)), len(done & set(range(trials)))
    part = f" for shard {shard} (whole batches of {k})" if shard else ""
    if batches:
        say(f"memtool estimate: {n} of {trials} trials to train{part} ({finished} already in {out}), "
            + (f"{min(k, n)} models at a time on {device}" if cfg.trainer is None else
               f"one at a time by your loop {cfg.train_fn}"))
        if local:
            with progress_bar(total=n * steps, unit="step" if steps > 1 else "trial",
                              disable=not progress, desc="models x steps" if steps > 1 else "trials",
                              unit_scale=True, dynamic_ncols=True) as bar:
                for ids in batches:
                    logs = _run_batch(out, cfg, data, ids, device, eval_batch, on_step=bar.update,
                                      record_proxies=ex.record_proxies)
                    trained = sum(log["trials"][1] - log["trials"][0] + 1 for log in logs)
                    bar.update((len(ids) - trained) * steps)  # held or finished by another process
                    early = logs and ids is batches[0] and fit_warning(cfg, logs[0]["train_acc_in_subset"])
                    if early:  # after the first batch, so that a run that will not fit can be stopped
                        say(f"memtool estimate: warning (trials {ids[0]}-{ids[-1]}): {early}")
                    if logs:
                        bar.set_postfix(trials=f"{logs[-1]['trials'][1] + 1}", test_acc=f"{logs[-1]['test_acc']:.3f}")
        else:
            _run_parallel(out, cfg, data, batches, device, eval_batch, n_jobs, scheduler, progress, ex.record_proxies)
    elif shard:
        say(f"memtool estimate: shard {shard} has no trials to train: its whole batches of {k} are finished, or "
            f"the {trials} trials make fewer batches than shards (--ensemble-size sets the batch)")
    missing = set(range(trials)) - finished_trials(out)
    if missing or not tables:
        held = sum(claim_path(out, t).exists() for t in missing)
        if held and progress:
            tqdm.write(f"memtool estimate: {held} of the {len(missing)} missing trials are being trained by other "
                       f"processes; the last one to finish writes the score tables", file=sys.stderr)
        return {"status": "partial", "missing_trials": len(missing), "held_by_others": held, "out": str(out)}
    summary = compute_tables(out, **asdict(thr))
    return {"status": "complete", "out": str(out), **summary, **_fit(cfg, summary)}


def _fit(cfg: EstimateConfig, summary: dict) -> dict:
    """``fit_warning`` for the summary (also raised as a UserWarning) when the models do not fit."""
    msg = fit_warning(cfg, summary["train_acc_in_subset"])
    if msg is None:
        return {}
    warnings.warn(msg, UserWarning, stacklevel=3)
    return {"fit_warning": msg}


def se_p95(run, trials: int) -> float:
    """The 95th percentile over the training samples of mem_se from the first ``trials`` trials."""
    from .scores import memorization
    from .store import load_trials

    t = load_trials(run)
    t = t.subset(t.trial_ids < trials)
    return float(np.nanpercentile(memorization(t.member, t.train_correct)["mem_se"], 95))


def pairs_half_jaccard(run, trials: int, thr: Thresholds) -> float:
    """The split-half Jaccard of the high-influence pairs from the first ``trials`` trials (0
    where neither half calls a pair)."""
    from .store import load_labels, load_trials
    from .tables import split_half

    t = load_trials(run)
    j = split_half(t.subset(t.trial_ids < trials), load_labels(run), "", thr.mem_threshold,
                   thr.infl_threshold, thr.pairs)["jaccard_high_pairs"]
    return 0.0 if np.isnan(j) else float(j)


def _until(out, cfg, ex: Execution, thr: Thresholds, progress: bool, tables: bool) -> dict:
    """Train in rounds until the goal of ``until_se`` (the 95th percentile of mem_se <= it) or
    of ``until_pairs`` (the split-half pairs Jaccard >= it) is met or ex.trials are done.
    mem_se falls like 1/sqrt(trials), so an until_se round aims at the count that should reach
    its target (at least 16 trials more, at most twice as many); an until_pairs round doubles."""
    most, by_se = ex.trials, ex.until_se is not None
    goal = ex.until_se if by_se else ex.until_pairs
    t = min(most, max(16, len(finished_trials(out))))
    while True:
        estimate(out, config=cfg, progress=progress, tables=False,
                 **{**asdict(ex), "until_se": None, "until_pairs": None, "trials": t})
        q = se_p95(out, t) if by_se else pairs_half_jaccard(out, t, thr)
        met = q <= goal if by_se else q >= goal
        if met or t >= most:
            break
        t = min(most, 2 * t, max(t + 16, int(np.ceil(1.05 * t * (q / goal) ** 2)))) if by_se else min(most, 2 * t)
    what = f"95th percentile of mem_se {q:.4f}" if by_se else f"split-half pairs Jaccard {q:.3f}"
    aim = "precision" if by_se else "agreement"
    note = (f"reached the {aim}: {what} {'<=' if by_se else '>='} {goal} after {t} trials" if met else
            f"reached --trials {most} before the {aim}: {what} {'>' if by_se else '<'} {goal}")
    stopped = aim if met else "trials"
    if progress:
        tqdm.write(f"memtool estimate: {note}", file=sys.stderr)
    result = compute_tables(out, **asdict(thr)) if tables else {}
    result.update(_fit(cfg, result) if result else {})
    key, measured = ("until_se", "mem_se_p95") if by_se else ("until_pairs", "pairs_jaccard")
    return {"status": "complete" if tables else "partial", "out": str(out), **result,
            key: {"target": goal, measured: q, "trials": t, "stopped_by": stopped, "note": note}}


def _run_parallel(out, cfg, data, batches, device, eval_batch, n_jobs, scheduler, progress, record_proxies=False):
    """Trial batches over joblib workers (loky processes, or a Dask cluster at ``scheduler``)."""
    from joblib import Parallel, delayed, parallel_config

    threads = max(1, torch.get_num_threads() // max(n_jobs, 1)) if scheduler is None else 1
    client = None
    if scheduler:  # every worker must see `out` (a shared file system)
        from dask.distributed import Client

        client = Client(scheduler)
    jobs = (delayed(_run_batch)(out, cfg, data, ids, device, eval_batch, threads, None, record_proxies)
            for ids in batches)
    with parallel_config(backend="dask" if client else "loky", n_jobs=-1 if client else n_jobs):
        for _ in progress_bar(Parallel(return_as="generator_unordered")(jobs), total=len(batches), unit="batch",
                              disable=not progress, desc="trial batches"):
            pass
    if client is not None:
        client.close()
