"""`memtool train`: one model, trained by the engine (:func:`memtool.engine.fit`), resumable.

    train(TrainConfig(dataset="mnist", recipe=Recipe.from_flat(model="cnn", method="pgd-at", eps=0.3)),
          out="runs/at")

The training set is the dataset minus ``exclude_ids``; ``weights`` give per-sample weights.
Both come as files on the command line (``--exclude-ids FILE``: one id per line, or a parquet
file with a ``sample_id`` column; ``--weights FILE``: parquet with ``sample_id`` and
``weight``) or as arrays from Python, and both are part of the run's settings check (by
content: a digest of the ids and of the weights).

The output directory::

    OUT/checkpoint.pt   model and optimizer state, epoch, config, data digests and log (written
                        atomically after every epoch; memtool.load_model(OUT)); with
                        ``--val-samples N --select best-pgd`` also the weights of the epoch with
                        the best PGD accuracy on N held-out training samples after ``--limit``
                        (never the test set), which load_model and evaluate then use
    OUT/config.json     the settings of this run (config, dataset, excluded ids and weights)
    OUT/log.jsonl       one line per epoch: mean training loss, clean and PGD accuracy on the
                        first eval_samples test samples, wall and CPU time

Calling :func:`train` again with the same ``out`` resumes after the last finished epoch and
gives the same model as an uninterrupted run; other settings are refused, naming the field.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import __version__
from .attacks import PGD, attacked_logits
from .checkpoints import CHECKPOINT, load_checkpoint, model_from_checkpoint, save_checkpoint
from .config import check_choice, check_device, check_int, check_number, device_name, setting
from .datasets import load_dataset
from .engine import as_floats, fit
from .progress import progress_bar
from .models import check_model_record
from .recipe import EVAL, DataJob, Recipe, stream, user_settings
from .rundir import check_settings, open_settings, read_json, write_jsonl


SELECTIONS = ("last", "best-pgd")


@dataclass(frozen=True)
class TrainConfig(DataJob):
    seed: int = setting(0, "seed of the model: init, minibatch order, augmentation, attack noise, label noise")
    exclude_ids: str | None = setting(None, "file of training sample ids to leave out: text, one id per line, "
                                            "or parquet with a sample_id column")
    weights: str | None = setting(None, "parquet file with sample_id and weight columns (every training sample)")
    eval_samples: int = setting(1000, "first N test samples checked after every --eval-every epochs (0: none)")
    eval_every: int = setting(1, "epochs between those checks (the last epoch is always checked)")
    eval_steps: int = setting(20, "PGD steps of the checks (test and validation)")
    eval_eps: float | None = setting(None, "eps of the checks (default: the method's eps; none for standard)")
    val_samples: int = setting(0, "hold out N training samples from beyond --limit (never trained on) as a "
                                  "validation set, checked after every epoch")
    select: str = setting("last", "the checkpoint memtool.load_model and evaluate use: last (epoch) | best-pgd "
                                  "(best PGD accuracy on the validation samples; needs --val-samples)",
                          choices=SELECTIONS)
    recipe: Recipe = setting(None, "how the model is trained", cli=False, factory=Recipe)

    def __post_init__(self):
        self._check_data()
        check_int("seed", self.seed, 0)
        check_int("eval_samples", self.eval_samples, 0)
        check_int("eval_every", self.eval_every, 1)
        check_int("eval_steps", self.eval_steps, 1)
        check_number("eval_eps", self.eval_eps, 0, optional=True)
        check_int("val_samples", self.val_samples, 0)
        check_choice("select", self.select, SELECTIONS)
        if self.val_samples and self.limit is None:
            raise ValueError("val_samples needs --limit: the validation samples are taken from beyond it, so "
                             "that the training set (and its scores) stays the first --limit samples")
        if self.select == "best-pgd" and not self.val_samples:
            raise ValueError("select best-pgd needs --val-samples N (held-out training samples to select on; "
                             "the test set is never used for selection)")
        self._resolve_recipe()
        if self.select == "best-pgd" and self.check_eps is None:
            raise ValueError("select best-pgd needs an eps: an adversarial method, or --eval-eps")

    @property
    def check_eps(self) -> float | None:
        return self.eval_eps if self.eval_eps is not None else getattr(self.recipe.method, "eps", None)


# ----------------------------------------------------------------------------- sample files


IDS_FORMATS = "text with one sample id per line, or parquet with a sample_id column"
WEIGHTS_FORMAT = "parquet with sample_id and weight columns"


def _read_parquet(path: Path, what: str, accepted: str) -> pd.DataFrame:
    """The parquet file ``path``; another format is one error naming the file and ``accepted``
    (pyarrow's own message, e.g. "Parquet magic bytes not found in footer", names neither)."""
    try:
        return pd.read_parquet(path)
    except (ValueError, OSError):
        raise ValueError(f"{what} file {path} is not a parquet file; {what} takes {accepted}") from None


def read_ids(path: str | os.PathLike, n: int, what: str = "exclude_ids") -> np.ndarray:
    """Sample ids from a text file (one per line, '#' comments) or a parquet file (``.parquet``)
    with a ``sample_id`` column; each must be a training sample id in 0..n-1."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    if path.suffix == ".parquet":
        df = _read_parquet(path, what, IDS_FORMATS)
        if "sample_id" not in df.columns:
            raise ValueError(f"{what} file {path} has no sample_id column (columns: {list(df.columns)})")
        ids = df["sample_id"].to_numpy()
    else:
        try:
            lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
            ids = np.array([int(ln) for ln in lines if ln], dtype=np.int64)
        except ValueError as e:  # UnicodeDecodeError too: a binary file
            raise ValueError(f"{what} file {path}: every line must be one integer sample id ({e}); "
                             f"{what} takes {IDS_FORMATS} (named .parquet)") from None
    ids = np.asarray(ids)
    if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= n):
        raise ValueError(f"{what} file {path} holds ids outside 0..{n - 1} (the training set has {n} samples): "
                         f"min {ids.min()}, max {ids.max()}")
    return np.unique(ids.astype(np.int64))


def read_weights(path: str | os.PathLike, n: int) -> np.ndarray:
    """Per-sample weights from a parquet file with ``sample_id`` and ``weight``: every training
    sample 0..n-1 exactly once, finite and >= 0."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    df = _read_parquet(path, "weights", WEIGHTS_FORMAT)
    missing = {"sample_id", "weight"} - set(df.columns)
    if missing:
        raise ValueError(f"weights file {path} lacks column(s) {sorted(missing)} (columns: {list(df.columns)})")
    ids = df["sample_id"].to_numpy()
    if len(ids) != n or not np.array_equal(np.sort(ids), np.arange(n)):
        raise ValueError(f"weights file {path} must list every training sample id 0..{n - 1} once "
                         f"(the training set has {n} samples); it has {len(ids)} rows with ids "
                         f"{ids.min() if len(ids) else '-'}..{ids.max() if len(ids) else '-'}")
    w = np.empty(n)
    w[ids] = df["weight"].to_numpy(dtype=np.float64)
    return check_weights(w, n, str(path))


def check_weights(w, n: int, where: str = "weights") -> np.ndarray:
    w = np.asarray(w.detach().cpu() if torch.is_tensor(w) else w, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"{where} must have one entry per training sample, shape ({n},), got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{where} must be finite and >= 0")
    if w.sum() == 0:
        raise ValueError(f"{where} are all zero: no sample would train the model")
    return w


def _digest(a: np.ndarray | None) -> str | None:
    return None if a is None else hashlib.sha256(np.ascontiguousarray(a)).hexdigest()[:16]


# ----------------------------------------------------------------------------- training


def epoch_check(model, x_u8, y, eps: float | None, steps: int, seed: int, batch: int = 500) -> dict:
    """Clean and PGD-``steps`` accuracy at ``eps`` on the given test samples (no robust
    accuracy without an eps); the random starts come from one generator seeded with ``seed``."""
    attack = None if eps is None else PGD(eps=eps, steps=steps)
    gen = torch.Generator(device=x_u8.device).manual_seed(seed)
    clean = rob = 0
    for i in range(0, len(y), batch):
        xb, yb = as_floats(x_u8[i : i + batch]), y[i : i + batch]
        with torch.no_grad():
            clean += int((model(xb).argmax(1) == yb).sum())
        if attack is not None:
            rob += int((attacked_logits(attack, model, xb, yb, gen).argmax(1) == yb).sum())
    if not len(y):
        return {}
    return {"clean_acc": clean / len(y), "robust_acc": None if attack is None else rob / len(y),
            "eval_attack": None if attack is None else f"pgd{steps}", "eval_eps": eps, "eval_n": len(y)}


def validation_samples(config: TrainConfig, data_root, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``val_samples`` training samples right after the first ``limit`` (true labels)."""
    if not config.val_samples:
        return torch.zeros(0, dtype=torch.uint8, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    full = load_dataset(config.dataset, data_root)
    if n + config.val_samples > len(full.y_train):
        raise ValueError(f"val_samples {config.val_samples} does not fit beyond limit {n}: {config.dataset} has "
                         f"{len(full.y_train)} training samples")
    sl = slice(n, n + config.val_samples)
    return torch.tensor(full.x_train[sl], device=device), torch.tensor(full.y_train[sl], device=device)


def epoch_line(record: dict, epochs: int, stats: dict) -> str:
    """One progress line per epoch: loss, the method's statistics, the checks that ran."""
    line = f"epoch {record['epoch']}/{epochs}  loss {record['loss']:.4f}" + "".join(f"  {k} {v:.3f}" for k, v in stats.items())
    if "clean_acc" in record:
        line += f"  clean {record['clean_acc']:.3f}"
        if record["robust_acc"] is not None:
            line += f"  {record['eval_attack']}@{record['eval_eps']:g} {record['robust_acc']:.3f}"
        line += f" (n={record['eval_n']})"
    if record.get("val_robust_acc") is not None:
        line += f"  val PGD {record['val_robust_acc']:.3f}"
    return line + f"  ({record['time_s']:.1f} s)"


def _settings(config: TrainConfig, ds, excluded, w, method) -> dict:
    cfg = config.to_dict()
    for f in ("exclude_ids", "weights"):  # compared by content below, not by path
        cfg[f] = None
    for f in ("scores", "judges"):  # BAT's tables: by content (atypical_sha, judged_sha), not by path
        if cfg["recipe"]["method"].get(f) is not None:
            cfg["recipe"]["method"][f] = None
    # BAT's atypical set, by content too: re-estimating into the same run directory changes it
    atypical, judged = getattr(method, "atypical", None), getattr(method, "judged", None)
    return {"config": cfg,
            "dataset": {"name": ds.name, "fingerprint": ds.fingerprint, "n_train": len(ds.y_train),
                        "n_test": len(ds.y_test), "num_classes": ds.num_classes, "image_shape": list(ds.image_shape)},
            "samples": {"n_excluded": int(len(excluded)), "excluded_sha": _digest(excluded) if len(excluded) else None,
                        "weights_sha": _digest(w),
                        **({} if atypical is None else {"atypical_sha": _digest(atypical.numpy())}),
                        **({} if judged is None else {"judged_sha": _digest(judged.numpy())})}}


def train(config: TrainConfig | dict | None = None, out: str | os.PathLike | None = None, *, weights=None,
          exclude_ids=None, progress: bool = True, device: str = "cpu", data_root=None, **settings) -> torch.nn.Module:
    """Train (or resume training) the model described by ``config`` (or flat ``settings``:
    ``dataset``, ``model``, ``method``, ``eps``, ``epochs``, ...) into ``out``.

    ``weights``: per-sample weights, a parquet file (``sample_id``, ``weight``) or an array with
    one weight per training sample; ``exclude_ids``: training sample ids to leave out, a file
    (text or parquet) or an array. Files are recorded by path in the config, arrays by
    digest; both are part of the settings check. Returns the model in eval mode."""
    if isinstance(weights, (str, os.PathLike)):
        settings["weights"], weights = str(weights), None
    if isinstance(exclude_ids, (str, os.PathLike)):
        settings["exclude_ids"], exclude_ids = str(exclude_ids), None
    if config is None:
        config = TrainConfig.from_kwargs(**user_settings(settings))
    elif settings:
        raise TypeError(f"give either a config or settings, not both (got {sorted(settings)})")
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if out is None:
        raise ValueError("out must name the training run's output directory, got None")
    out, device = Path(out), check_device(device)
    ds, subset, w, r, settings_now = _prepare(config, weights, exclude_ids, data_root)
    built = r.model_record(ds.image_shape, ds.num_classes)
    start, log = None, []
    if (out / CHECKPOINT).exists():
        ck = load_checkpoint(out / CHECKPOINT, device)
        check_settings(ck["settings"], settings_now, out)
        check_model_record(ck.get("model_record"), built, out)
        start, log = {k: ck[k] for k in ("model", "optimizer", "epoch")}, list(ck["log"])
    open_settings(out / "config.json", settings_now)

    # torch.tensor copies: the dataset's arrays may be read-only views of its files
    x, y = torch.tensor(ds.x_train, device=device), torch.tensor(ds.y_train, device=device)
    n_eval = min(config.eval_samples, len(ds.y_test))
    xt, yt = torch.tensor(ds.x_test[:n_eval], device=device), torch.tensor(ds.y_test[:n_eval], device=device)
    xv, yv = validation_samples(config, data_root, len(ds.y_train), device)
    done = 0 if start is None else int(start["epoch"])
    if done >= r.epochs:
        if progress:
            print(f"{out}: already trained for {done} epochs")
        return model_from_checkpoint(ck, device, model=r.factory, where=out)

    bar = progress_bar(total=r.steps(len(subset)), initial=r.steps(len(subset)) * done // r.epochs, unit="step",
                       disable=not progress, desc=f"train {r.method.name}", dynamic_ncols=True)
    clock = [time.time(), time.process_time()]

    best = {k: ck[k] for k in ("best_model", "best_epoch", "best_val") if k in ck} if start is not None else {}

    def on_epoch(epoch, model, opt, stats):
        record = {"epoch": epoch, "loss": float(stats.pop("loss")), **stats, "train_time_s": time.time() - clock[0]}
        if epoch % config.eval_every == 0 or epoch == r.epochs:
            record.update(epoch_check(model, xt, yt, config.check_eps, config.eval_steps,
                                      stream(config.seed, EVAL, epoch)))
        if len(yv):
            val = epoch_check(model, xv, yv, config.check_eps, config.eval_steps, stream(config.seed, EVAL, epoch, 1))
            record.update({f"val_{k}": v for k, v in val.items() if k in ("clean_acc", "robust_acc")})
            if val["robust_acc"] is not None and val["robust_acc"] > best.get("best_val", -1.0):
                best.update(best_model={k: v.clone() for k, v in model.state_dict().items()}, best_epoch=epoch,
                            best_val=val["robust_acc"])
        record["time_s"], record["cpu_s"] = time.time() - clock[0], time.process_time() - clock[1]
        record["device"] = device_name(device)
        log.append(record)
        save_checkpoint({"format": "memtool-train/2", "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "epoch": epoch, "settings": settings_now, "model_record": built, "log": log, **best,
                         "versions": {"memtool": __version__, "torch": str(torch.__version__)}}, out / CHECKPOINT)
        write_jsonl(out / "log.jsonl", log)
        if progress:
            tqdm.write(epoch_line(record, r.epochs, stats))
            sys.stdout.flush()  # one line per epoch also where stdout is a file or a pipe
        clock[:] = [time.time(), time.process_time()]

    models = fit(r, x, y, [subset], [config.seed], num_classes=ds.num_classes,
                 weights=None if w is None else torch.as_tensor(w, dtype=torch.float32, device=device),
                 start=start, on_epoch=on_epoch, on_step=bar.update)
    bar.close()
    if progress:
        print(f"wrote {out / CHECKPOINT}")
    if config.select != "last":
        return model_from_checkpoint(load_checkpoint(out / CHECKPOINT, device), device, model=r.factory, where=out)
    return models[0]


def _prepare(config: TrainConfig, weights, exclude_ids, data_root):
    """The dataset, the training subset, the weights, the bound recipe and the settings that
    :func:`train` records and checks."""
    ds = load_dataset(config.dataset, data_root, config.limit, config.label_noise, config.seed)
    if config.recipe.method.adversarial or config.check_eps is not None:
        ds.check_attackable(f"method {config.recipe.method.name}" if config.recipe.method.adversarial
                            else "the per-epoch robust check (give --eval-eps only for images)")
    n = len(ds.y_train)
    if weights is not None and config.weights is not None:
        raise ValueError("give per-sample weights either as an array or as a file, not both")
    if exclude_ids is not None and config.exclude_ids is not None:
        raise ValueError("give excluded ids either as an array or as a file, not both")
    w = read_weights(config.weights, n) if config.weights else None if weights is None else check_weights(weights, n)
    if config.exclude_ids:
        excluded = read_ids(config.exclude_ids, n)
    else:
        excluded = np.unique(np.asarray([] if exclude_ids is None else exclude_ids, dtype=np.int64))
        if excluded.size and (excluded.min() < 0 or excluded.max() >= n):
            raise ValueError(f"exclude_ids holds ids outside 0..{n - 1} (the training set has {n} samples)")
    subset = np.setdiff1d(np.arange(n), excluded)
    if len(subset) == 0:
        raise ValueError(f"exclude_ids leaves none of the {n} training samples")

    r = replace(config.recipe, method=config.recipe.method.bind(ds))
    atypical = getattr(r.method, "atypical", None)  # BAT's: what it weights
    if atypical is not None and not atypical.numpy()[subset].any():
        raise ValueError(f"method {r.method.name}: none of the {int(atypical.sum())} atypical training samples "
                         f"(mem >= tau {r.method.tau}) is trained on, so it would be plain PGD-AT: use --method "
                         "pgd-at, or keep atypical samples (exclude_ids, tau)")
    return ds, subset, w, r, _settings(config, ds, excluded, w, r.method)


def check_trained(config: TrainConfig, out, data_root=None) -> None:
    """Raise :class:`memtool.rundir.RunMismatchError` (naming each field) unless ``out`` was
    trained with ``config``: what :func:`train` checks, from ``out``/config.json alone, so it
    holds where the checkpoint is gone (a committed study's records)."""
    *_, settings = _prepare(config, None, None, data_root)
    check_settings(read_json(Path(out) / "config.json"), settings, out)
