"""The estimator's driver: plan -> train trial batches -> trial files -> score tables.

One call of :func:`estimate` trains every trial of ``range(trials)`` that the run directory
does not hold yet (in this process's shard), ``ensemble_size`` models at a time, and then
(if nothing is missing) writes the score tables. Interrupting it loses at most the batch in
flight; the same call again picks up where it stopped and gives the same scores.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..datasets import load_dataset
from ..ensemble import ensemble_margins, single_margins, stackable, train_ensemble, train_single
from ..models import build_model
from ..recipe import trial_seed
from . import plan
from .config import EstimateConfig
from .store import append_log, finished_trials, init_run, write_trials
from .tables import compute_tables


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


def default_ensemble_size(recipe, device, in_features: int = 784) -> int:
    """Models per step where stacking pays off (benchmarks/README.md): MLPs everywhere; the
    CNN only on GPUs (on a CPU its per-model convolutions already run near peak, and K
    models' activations overflow the cache: K = 8 measured 16 % slower than one at a time).
    On a CPU, small MLPs stack more models so each batched matmul stays big enough for BLAS:
    K = 64 below 10^6 multiply-adds per model and step (digits 64-128-10 at batch 32 on 2
    threads: 18x the naive loop, against 9.6x with K = 16), else 16 (MNIST 784-256-10:
    K = 8, 16, 32 within 4 %)."""
    if torch.device(device).type == "cuda":
        return 64 if recipe.model in ("mlp", "cnn") else 1
    if recipe.model != "mlp":
        return 1
    return 64 if recipe.batch_size * in_features * recipe.hidden < 1_000_000 else 16


def pending_batches(done: set[int], trials: int, k: int, shard=(0, 1)) -> list[np.ndarray]:
    """Runs of at most ``k`` consecutive unfinished trial ids; block b goes to shard b % N."""
    i, n = shard
    out = []
    for block in range(i, (trials + k - 1) // k, n):
        ids = [t for t in range(block * k, min((block + 1) * k, trials)) if t not in done]
        while ids:  # split at gaps so each file holds consecutive ids
            run = [ids.pop(0)]
            while ids and ids[0] == run[-1] + 1:
                run.append(ids.pop(0))
            out.append(np.array(run))
    return out


def train_batch(cfg: EstimateConfig, data: dict, trial_ids: np.ndarray, device: str = "cpu",
                eval_batch: int = 1024, on_step=None) -> dict:
    """Train the trials ``trial_ids`` and return their (K, n) margin records."""
    r = cfg.recipe
    n = len(data["y_train"])
    members = plan.subset_indices(n, cfg.ratio, cfg.seed, trial_ids)
    seeds = [trial_seed(cfg.seed, int(t)) for t in trial_ids]
    build = partial(build_model, r.model, data["shape"], data["num_classes"], r.hidden)
    dev = torch.device(device)  # a no-op when the data already lives there (estimate moves it once)
    xy = {split: (data[f"x_{split}"].to(dev), data[f"y_{split}"].to(dev)) for split in ("train", "test")}
    names = ["train_margin", "test_margin"] + (["train_rob_margin", "test_rob_margin"] if cfg.robust else [])
    if stackable(build()):
        ens = train_ensemble(build, *xy["train"], members, seeds, r, dev, on_step=on_step)
        return {name: ensemble_margins(ens, *xy[name.split("_")[0]], r, eval_batch, robust="rob" in name).numpy()
                for name in names}
    rec = {name: [] for name in names}  # one model at a time (e.g. BatchNorm statistics are per model)
    for idx, s in zip(members, seeds):
        model = train_single(build, *xy["train"], idx, s, r, dev)
        for name in names:
            rec[name].append(single_margins(model, *xy[name.split("_")[0]], r, eval_batch, robust="rob" in name))
        if on_step:
            on_step(r.steps(members.shape[1]))
    return {name: torch.stack(v).numpy() for name, v in rec.items()}


def _tensors(ds, device="cpu") -> dict:
    """The whole dataset as tensors on ``device``, pixels in [0, 1]."""
    def img(a):
        return torch.from_numpy(a).to(device).float().div_(255)

    return {"x_train": img(ds.x_train), "y_train": torch.from_numpy(ds.y_train).to(device),
            "x_test": img(ds.x_test), "y_test": torch.from_numpy(ds.y_test).to(device),
            "shape": ds.image_shape, "num_classes": ds.num_classes}


def _run_batch(run, cfg, data, ids, device, eval_batch, threads=None, on_step=None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    rec = train_batch(cfg, data, ids, device, eval_batch, on_step)
    member = plan.membership(len(data["y_train"]), cfg.ratio, cfg.seed, ids)
    path = write_trials(run, ids, member, rec)
    log = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "trials": [int(ids[0]), int(ids[-1])],
           "seconds": round(time.perf_counter() - t0, 3), "file": path.name,
           "train_acc_in_subset": float((rec["train_margin"] > 0)[member].mean()),
           "test_acc": float((rec["test_margin"] > 0).mean())}
    if "test_rob_margin" in rec:
        log["test_rob_acc"] = float((rec["test_rob_margin"] > 0).mean())
    append_log(run, log)
    return log


def estimate(out: str | Path, trials: int = 64, *, data_root=None, ensemble_size: int | None = None,
             device: str = "cpu", n_jobs: int = 1, scheduler: str | None = None, shard=None,
             eval_batch: int = 1024, progress: bool = True, mem_threshold: float = 0.25,
             infl_threshold: float = 0.15, top_k: int = 10, tables: bool = True,
             config: EstimateConfig | None = None, **settings) -> dict:
    """Run (or resume) the subsampling estimator into run directory ``out``.

    ``settings`` are the config's fields by their command-line names (``dataset``, ``limit``,
    ``label_noise``, ``ratio``, ``seed``, ``model``, ``hidden``, ``epochs``, ``batch_size``,
    ``lr``, ...; see :class:`EstimateConfig` and :class:`memtool.recipe.TrainRecipe`).
    Execution arguments (``trials``, ``ensemble_size``, ``device``, ``n_jobs``, ``scheduler``:
    a Dask address, ``shard``: 'i/N') do not change any trial's result.

    With ``tables`` (default) the score tables are written once every trial is finished.
    Returns the run summary, with ``status`` 'complete', or 'partial' while trials are missing
    (other shards) or the tables were not asked for."""
    cfg = config or EstimateConfig.from_kwargs(**settings)
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    ds = load_dataset(cfg.dataset, data_root, cfg.limit, cfg.label_noise, cfg.seed)
    init_run(out, cfg.to_dict(), ds, command=sys.argv if Path(sys.argv[0]).name == "memtool" else None)
    k = ensemble_size or default_ensemble_size(cfg.recipe, device, int(np.prod(ds.image_shape)))
    batches = pending_batches(finished_trials(out), trials, k, parse_shard(shard))
    data = _tensors(ds, device if n_jobs == 1 and scheduler is None else "cpu")
    m = plan.subset_size(len(ds.y_train), cfg.ratio)
    total_steps = sum(len(b) for b in batches) * cfg.recipe.steps(m)
    if batches:
        say = (lambda s: tqdm.write(s, file=sys.stderr)) if progress else (lambda s: None)
        say(f"memtool estimate: {sum(map(len, batches))} trials to train ({trials - sum(map(len, batches))} "
            f"already in {out}), {k} models at a time on {device}")
        if n_jobs == 1 and scheduler is None:
            with tqdm(total=total_steps, unit="step", disable=not progress, desc="models x steps",
                      unit_scale=True, dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10) as bar:
                for ids in batches:
                    log = _run_batch(out, cfg, data, ids, device, eval_batch, on_step=lambda s: bar.update(s * len(ids)))
                    bar.set_postfix(trials=f"{log['trials'][1] + 1}", test_acc=f"{log['test_acc']:.3f}")
        else:
            _run_parallel(out, cfg, data, batches, device, eval_batch, n_jobs, scheduler, progress)
    missing = set(range(trials)) - finished_trials(out)
    if missing or not tables:
        return {"status": "partial", "missing_trials": len(missing), "out": str(out)}
    summary = compute_tables(out, mem_threshold, infl_threshold, top_k)
    return {"status": "complete", "out": str(out), **summary}


def _run_parallel(out, cfg, data, batches, device, eval_batch, n_jobs, scheduler, progress):
    """Trial batches over joblib workers (loky processes, or a Dask cluster at ``scheduler``)."""
    from joblib import Parallel, delayed, parallel_config

    threads = max(1, torch.get_num_threads() // max(n_jobs, 1)) if scheduler is None else 1
    client = None
    if scheduler:  # every worker must see `out` (a shared file system)
        from dask.distributed import Client

        client = Client(scheduler)
    jobs = (delayed(_run_batch)(out, cfg, data, ids, device, eval_batch, threads) for ids in batches)
    with parallel_config(backend="dask" if client else "loky", n_jobs=-1 if client else n_jobs):
        for _ in tqdm(Parallel(return_as="generator_unordered")(jobs), total=len(batches), unit="batch",
                      disable=not progress, desc="trial batches"):
            pass
    if client is not None:
        client.close()
