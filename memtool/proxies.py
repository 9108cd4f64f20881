"""One-run proxies of memorization from the training dynamics, and TracIn pair similarity.

    memtool proxies --dataset mnist --limit 5000 --seeds 4 --out runs/px

trains ``seeds`` ordinary models and records their proxies (:mod:`memtool.recorder` defines
them: csl, learning_speed, forgetting, aum, el2n, grad_norm, curvature, and TracIn); with
``--calibrate RUN`` a few estimator trials turn them into mem and pairs (:mod:`memtool.hybrid`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .config import Runtime, check_int, setting, split_settings
from .progress import progress_bar
from .recipe import DataJob, Recipe, trial_seed, user_settings
from .recorder import PROXIES, PROXY_RUN, ProxySettings, Recorder, mean_over_members  # noqa: F401  (the API)


@dataclass(frozen=True)
class ProxiesConfig(DataJob):
    seed: int = setting(0, "seed of the label noise and of the models")
    seeds: int = setting(4, "ordinary training runs (on the whole training set) the proxies are averaged over")
    pairs: bool = setting(True, "also the TracIn similarity of every same-class (train, test) pair")
    recipe: Recipe = setting(None, "how each model is trained", cli=False, factory=Recipe)

    def __post_init__(self):
        self._check_data()
        check_int("seed", self.seed, 0)
        check_int("seeds", self.seeds, 1)
        self._resolve_recipe()


def proxies(out, *, calibrate=None, progress: bool = True, **settings) -> pd.DataFrame:
    """Train ``seeds`` models on the whole training set and write their proxies to
    ``out``/scores.parquet (train rows: the columns of :data:`PROXIES`; test rows NaN) and,
    with ``pairs``, the TracIn similarities to ``out``/tracin.npz. Finished models are kept in
    ``out``/models/ and reused, so an interrupted call resumes. Returns the score table.

    ``calibrate``: a `memtool estimate` run of the same data (a few trials suffice): ``mem``
    and the high-influence pairs are then estimated from it and the proxies
    (:mod:`memtool.hybrid`), and ``out`` becomes a run directory every stage accepts
    (validate, the analyses, BAT's ``--scores``)."""
    from .datasets import load_dataset
    from .engine import default_ensemble_size, fit
    from .estimator.store import dataset_info
    from .rundir import atomic_write, open_settings, read_table, write_table

    rt, opts, rest = split_settings(settings, Runtime, ProxySettings)
    rt, opts = Runtime(**rt), ProxySettings(**opts)
    cfg = ProxiesConfig.from_kwargs(**user_settings(rest))
    out, device = Path(out), torch.device(rt.device)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; proxies writes a directory (scores.parquet, tracin.npz, models/)")
    ds = load_dataset(cfg.dataset, rt.data_root, cfg.limit, cfg.label_noise, cfg.seed)
    if calibrate is not None:  # checked before any model trains
        _check_calibration_run(calibrate, ds)
    recipe = replace(cfg.recipe, method=cfg.recipe.method.bind(ds))
    info = dataset_info(ds)
    open_settings(out / "config.json", {"config": cfg.to_dict(), "proxy_settings": asdict(opts), "dataset": info})
    x, y = torch.tensor(ds.x_train, device=device), torch.tensor(ds.y_train, device=device)
    test = (torch.tensor(ds.x_test, device=device), torch.tensor(ds.y_test, device=device)) if cfg.pairs else None
    k = min(cfg.seeds, default_ensemble_size(recipe, device, int(np.prod(ds.image_shape))))
    n = len(y)
    bar = progress_bar(total=cfg.seeds, unit="model", disable=not progress, desc="proxies", dynamic_ncols=True)
    for first in range(0, cfg.seeds, k):
        idx = list(range(first, min(first + k, cfg.seeds)))
        path = out / "models" / f"seeds_{idx[0]:04d}-{idx[-1]:04d}.npz"
        if not path.exists():
            seeds = [trial_seed(cfg.seed, PROXY_RUN + s) for s in idx]
            rec = Recorder(x, y, seeds, recipe, opts, test)
            fit(recipe, x, y, [np.arange(n)] * len(idx), seeds, num_classes=ds.num_classes, ensemble_size=len(idx),
                recorder=rec)
            arrays = {f"proxy_{name}": v for name, v in rec.result().items()}
            if test is not None:
                arrays.update({f"tracin_{c}": t for c, t in enumerate(rec.tracin)},
                              self_train=rec.self_train, self_test=rec.self_test)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: np.savez(f, **arrays))
        bar.update(len(idx))
    bar.close()
    files = sorted((out / "models").glob("seeds_*.npz"))
    per_model = {name: [] for name in PROXIES}
    tr_sum, self_tr, self_te = None, 0.0, 0.0
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            for name in PROXIES:
                per_model[name].append(z[f"proxy_{name}"])
            if cfg.pairs:
                parts = [z[f"tracin_{c}"] for c in range(ds.num_classes)]
                tr_sum = parts if tr_sum is None else [a + b for a, b in zip(tr_sum, parts)]
                self_tr, self_te = self_tr + z["self_train"], self_te + z["self_test"]
    cols = {name: mean_over_members(np.concatenate(v)) for name, v in per_model.items()}
    table = proxy_table(ds, cols)
    meta = {"config": cfg.to_dict(), "proxy_settings": asdict(opts), "dataset": info, "kind": "proxies",
            "n_models": cfg.seeds, "model_epochs": cfg.seeds * recipe.epochs * n}
    write_table(table, out / "scores.parquet", meta)
    if cfg.pairs:
        ytr, yte = ds.y_train, ds.y_test
        arrays = {}
        for c, t in enumerate(tr_sum):
            a, b = np.flatnonzero(ytr == c), np.flatnonzero(yte == c)
            arrays[f"cos_{c}"] = (t / np.sqrt(np.maximum(self_tr[a][:, None] * self_te[b][None, :], 1e-300))
                                  ).astype(np.float32)
        atomic_write(out / "tracin.npz", lambda f: np.savez(f, train_label=ytr, test_label=yte, **arrays))
    if calibrate is not None:
        _calibrate(out, calibrate, read_table(out / "scores.parquet"), ds, cfg)
    if progress:
        print(f"wrote {out / 'scores.parquet'}" + (f", {out / 'tracin.npz'}" if cfg.pairs else "")
              + (f", {out / 'influence.parquet'}, {out / 'run.json'}" if calibrate is not None and cfg.pairs else ""))
    return read_table(out / "scores.parquet")


def _check_calibration_run(run, ds) -> None:
    from .estimator import read_run_json

    if not (Path(run) / "run.json").exists():
        raise FileNotFoundError(f"--calibrate {run}: no run directory there (no run.json); give a `memtool estimate` "
                                "run of the same data")
    fp = read_run_json(run)["dataset"]["fingerprint"]
    if fp != ds.fingerprint:
        raise ValueError(f"calibration run {run} belongs to other data (fingerprint {fp}, these proxies' data "
                         f"{ds.fingerprint}): estimate it with the same dataset, limit and label noise")


def _calibrate(out: Path, run, table: pd.DataFrame, ds, cfg: ProxiesConfig) -> None:
    from .estimator import load_trials
    from .hybrid import hybrid_tables, load_tracin, write_hybrid_run

    _check_calibration_run(run, ds)
    trials = load_trials(run)
    scores, infl = hybrid_tables(trials, table, load_tracin(out) if cfg.pairs else None)
    write_hybrid_run(out, run, scores, infl, {"calibration_run": str(run), "calibration_trials": len(trials),
                                              "proxy_models": cfg.seeds, "proxies": str(out)})


def proxy_table(ds, cols: dict[str, np.ndarray], extra: pd.DataFrame | None = None) -> pd.DataFrame:
    """A score table (train rows, then test rows) with the proxy columns (NaN on test rows)."""
    n, n_test = len(ds.y_train), len(ds.y_test)
    train = pd.DataFrame({"sample_id": np.arange(n), "split": "train", "label": ds.y_train, **cols,
                          "label_corrupted": ds.y_train != ds.original_label, "original_label": ds.original_label})
    test = pd.DataFrame({"sample_id": np.arange(n_test), "split": "test", "label": ds.y_test,
                         **{c: np.full(n_test, np.nan) for c in cols},
                         "label_corrupted": False, "original_label": ds.y_test})
    df = pd.concat([train, test], ignore_index=True)
    df["split"] = pd.Categorical(df["split"], categories=["train", "test"])
    return df
