"""The run directory: the contract between the estimator's stages (see docs/ARCHITECTURE.md).

    RUN/run.json        config, dataset fingerprint, versions, last score summary
    RUN/labels.npz      training labels (as used, and before planted noise), test labels
    RUN/trials/         one .npz per finished batch of trials, named by its trial ids
    RUN/log.jsonl       one line per finished batch

Trial files are written to a temporary name and renamed, so a file under its final name is
always complete; several processes may write to one RUN at once (each its own trials). A
file damaged anyway (a copy cut short, a bad disk) is detected by its zip checksums, moved
to RUN/trials/damaged/ with a warning, and its trials count as not finished.
Every file is plain arrays read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..rundir import atomic_write, check_settings, read_json, write_json

_TRIAL_FILE = re.compile(r"^trials_(\d{6})-(\d{6})\.npz$")
# per-sample records kept for every trial: clean and (optionally) robust margins/correctness
RECORDS = ("train_margin", "test_margin", "train_rob_margin", "test_rob_margin")


def read_run_json(run: str | Path) -> dict:
    path = Path(run) / "run.json"
    if not path.exists():
        raise FileNotFoundError(f"{run} is not a memtool run directory (no run.json)")
    try:
        meta = read_json(path)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it (memtool writes it, it is not meant to be "
                         "edited) or start a new run directory") from None
    missing = {"config", "dataset"} - set(meta) if isinstance(meta, dict) else {"config", "dataset"}
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}: not a run.json memtool wrote; restore it or start a new "
                         "run directory")
    return meta


def init_run(run: str | Path, config: dict, dataset, command: list[str] | None = None) -> dict:
    """Create ``run`` or check that it was made with the same config and dataset."""
    run = Path(run)
    info = {"name": dataset.name, "fingerprint": dataset.fingerprint, "n_train": len(dataset.y_train),
            "n_test": len(dataset.y_test), "num_classes": dataset.num_classes}
    if (run / "run.json").exists():
        meta = read_run_json(run)
        check_settings({"config": meta["config"], "dataset": meta["dataset"]}, {"config": config, "dataset": info},
                       run)
        return meta
    import torch

    (run / "trials").mkdir(parents=True, exist_ok=True)
    atomic_write(run / "labels.npz", lambda f: np.savez(
        f, train_label=dataset.y_train, original_label=dataset.original_label, test_label=dataset.y_test))
    meta = {"config": config, "dataset": info, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": {"memtool": __version__, "torch": torch.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            "command": command}
    write_json(run / "run.json", meta)
    return meta


def update_run_json(run: str | Path, **fields) -> None:
    meta = read_run_json(run)
    meta.update(fields)
    write_json(Path(run) / "run.json", meta)


def trial_files(run: str | Path) -> list[tuple[int, int, Path]]:
    out = []
    for p in sorted((Path(run) / "trials").glob("trials_*.npz")):
        m = _TRIAL_FILE.match(p.name)
        if m:
            out.append((int(m[1]), int(m[2]), p))
    return out


def _readable(path: Path, first: int, last: int) -> bool:
    """Whether a trial file is whole: its zip checksums hold and it names the trials of its name."""
    try:
        with zipfile.ZipFile(path) as z:
            if z.testzip() is not None:
                return False
        with np.load(path, allow_pickle=False) as z:
            ids = z["trial_ids"]
        return len(ids) == last - first + 1 and int(ids[0]) == first and int(ids[-1]) == last
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, ValueError):
        return False


def set_aside(run: str | Path, path: Path, first: int, last: int) -> Path:
    """Move a damaged trial file to RUN/trials/damaged/ (never deleted) and say so."""
    dest = Path(run) / "trials" / "damaged" / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}"
    dest.parent.mkdir(exist_ok=True)
    os.replace(path, dest)
    warnings.warn(f"{path} is truncated or corrupted: moved to {dest}; its trials {first}-{last} are trained "
                  "again by the next `memtool estimate` with this run's settings", stacklevel=3)
    return dest


def finished_trials(run: str | Path) -> set[int]:
    """The trial ids of every whole trial file (damaged ones are set aside, so their trials
    count as not finished)."""
    done = set()
    for first, last, path in trial_files(run):
        if _readable(path, first, last):
            done.update(range(first, last + 1))
        else:
            set_aside(run, path, first, last)
    return done


def write_trials(run: str | Path, trial_ids: np.ndarray, member: np.ndarray, records: dict) -> Path:
    """Store one batch of consecutive trials: membership (t, n) bool and per-sample records
    (t, n) float margins; correctness is ``margin > 0``, kept as bits next to float16 margins."""
    trial_ids = np.asarray(trial_ids)
    if not np.array_equal(trial_ids, np.arange(trial_ids[0], trial_ids[-1] + 1)):
        raise ValueError("a trial file holds consecutive trial ids")
    arrays = {"trial_ids": trial_ids, "member": np.packbits(member, axis=1), "n_train": np.array(member.shape[1])}
    for name, m in records.items():
        m = np.asarray(m, dtype=np.float32)
        arrays[name] = m.astype(np.float16)
        arrays[name.replace("margin", "correct")] = np.packbits(m > 0, axis=1)
        arrays[name.replace("margin", "n")] = np.array(m.shape[1])
    path = Path(run) / "trials" / f"trials_{trial_ids[0]:06d}-{trial_ids[-1]:06d}.npz"
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


@dataclass
class Trials:
    """Everything the trained models recorded, ordered by trial id.

    ``member``: (t, n_train) bool; ``*_correct``: (t, n) bool; ``*_margin``: (t, n) float32.
    Robust records are None where the run did not record them."""

    trial_ids: np.ndarray
    member: np.ndarray
    train_correct: np.ndarray
    train_margin: np.ndarray
    test_correct: np.ndarray
    test_margin: np.ndarray
    train_rob_correct: np.ndarray | None = None
    train_rob_margin: np.ndarray | None = None
    test_rob_correct: np.ndarray | None = None
    test_rob_margin: np.ndarray | None = None

    def __len__(self):
        return len(self.trial_ids)

    def subset(self, rows) -> "Trials":
        return Trials(**{k: (None if v is None else v[rows]) for k, v in vars(self).items()})


def load_trials(run: str | Path) -> Trials:
    """Read every finished trial of ``run`` (duplicates from concurrent writers read once)."""
    parts: dict[str, list] = {}
    seen: set[int] = set()
    for first, last, path in trial_files(run):
        if not _readable(path, first, last):
            set_aside(run, path, first, last)
            continue
        with np.load(path, allow_pickle=False) as z:
            ids = z["trial_ids"]
            keep = np.array([t not in seen for t in ids])
            if not keep.any():
                continue
            seen.update(ids.tolist())
            n = int(z["n_train"])
            parts.setdefault("trial_ids", []).append(ids[keep])
            parts.setdefault("member", []).append(np.unpackbits(z["member"], axis=1, count=n).astype(bool)[keep])
            for name in RECORDS:
                if name in z.files:
                    cnt = int(z[name.replace("margin", "n")])
                    parts.setdefault(name, []).append(z[name].astype(np.float32)[keep])
                    c = name.replace("margin", "correct")
                    parts.setdefault(c, []).append(np.unpackbits(z[c], axis=1, count=cnt).astype(bool)[keep])
    if not parts:
        raise FileNotFoundError(f"{run} has no finished trials yet")
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(arrays["trial_ids"], kind="stable")
    return Trials(**{k: v[order] for k, v in arrays.items()})


def load_labels(run: str | Path) -> dict[str, np.ndarray]:
    with np.load(Path(run) / "labels.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def append_log(run: str | Path, record: dict) -> None:
    with open(Path(run) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
