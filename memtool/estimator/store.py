"""The run directory: the contract between the estimator's stages (see docs/ARCHITECTURE.md).

    RUN/run.json        config, dataset fingerprint, versions, last score summary
    RUN/labels.npz      training labels (as used, and before planted noise), test labels
    RUN/trials/         one .npz per finished batch of trials, named by its trial ids
    RUN/log.jsonl       one line per finished batch
    RUN/claims/         one file per trial being trained now: which process holds it

Trial files are written to a temporary name and renamed, so a file under its final name is
always complete. Several processes may estimate into one RUN at once: each claims a trial
before training it (:func:`claim`: an exclusive create), skips trials claimed by a live
process, and takes over the claims of dead ones (same host: the process is gone; another
host: no heartbeat for ``STALE_S`` seconds), so no trial is lost and none is trained twice. A
file damaged anyway (a copy cut short, a bad disk) is detected by its zip checksums, moved
to RUN/trials/damaged/ with a warning, and its trials count as not finished.
Every file is plain arrays read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import threading
import time
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..rundir import RunMismatchError, atomic_write, check_settings, read_json, write_json

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


def open_run(run: str | Path, data_root=None, purpose: str = "this analysis"):
    """``run``'s metadata, its :class:`EstimateConfig` and its data as they were used (the
    dataset loaded again and checked against the run's fingerprint). Imported tables (no
    recipe, no data) are refused, naming ``purpose``."""
    from ..datasets import load_dataset
    from .config import EstimateConfig

    meta = read_run_json(run)
    if "recipe" not in meta["config"]:
        raise ValueError(f"{run} was imported ({meta['config'].get('source')}), not estimated: {purpose} retrains "
                         "with a run's recipe on its data, so it needs a `memtool estimate` run")
    cfg = EstimateConfig.from_dict(meta["config"])
    ds = load_dataset(cfg.dataset, data_root, cfg.limit, cfg.label_noise, cfg.seed)
    if ds.fingerprint != meta["dataset"]["fingerprint"]:
        raise ValueError(f"the {cfg.dataset} data on disk differ from the data {run} was estimated on "
                         f"(fingerprint {ds.fingerprint} vs {meta['dataset']['fingerprint']})")
    return meta, cfg, ds


def dataset_info(dataset) -> dict:
    """What a run records of its data (and compares when it is reopened)."""
    return {"name": dataset.name, "fingerprint": dataset.fingerprint, "n_train": len(dataset.y_train),
            "n_test": len(dataset.y_test), "num_classes": dataset.num_classes}


def init_run(run: str | Path, config: dict, dataset, command: list[str] | None = None,
             model: dict | None = None) -> dict:
    """Create ``run`` or check that it was made with the same config, dataset and model
    (``model``: :func:`memtool.models.model_record`, compared by structural digest)."""
    from ..models import check_model_record

    run = Path(run)
    info = dataset_info(dataset)
    if (run / "run.json").exists():
        meta = read_run_json(run)
        check_settings({"config": meta["config"], "dataset": meta["dataset"]}, {"config": config, "dataset": info},
                       run)
        if model is not None:
            check_model_record(meta.get("model"), model, run)
        return meta
    import torch

    (run / "trials").mkdir(parents=True, exist_ok=True)
    atomic_write(run / "labels.npz", lambda f: np.savez(
        f, train_label=dataset.y_train, original_label=dataset.original_label, test_label=dataset.y_test))
    meta = {"config": config, "dataset": info, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": {"memtool": __version__, "torch": torch.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            "command": command, **({} if model is None else {"model": model})}
    write_json(run / "run.json", meta)
    return meta


def update_run_json(run: str | Path, **fields) -> None:
    meta = read_run_json(run)
    meta.update(fields)
    write_json(Path(run) / "run.json", meta)


STALE_S = 900  # a claim from another host without a heartbeat for this long is taken over
HEARTBEAT_S = 60


def note_asked(run: str | Path, trials: int) -> None:
    """How many trials the last ``estimate`` of ``run`` asked for (every shard asks the same):
    what :func:`memtool.estimator.tables.compute_tables` warns the tables fall short of."""
    if trials_asked(run) != int(trials):  # shards asking the same write nothing
        write_json(Path(run) / "asked.json", {"trials": int(trials)})


def trials_asked(run: str | Path) -> int | None:
    path = Path(run) / "asked.json"
    return read_json(path)["trials"] if path.exists() else None


def claim_path(run, trial: int) -> Path:
    return Path(run) / "claims" / f"trial_{trial:06d}.claim"


def _owner_alive(text: str, mtime: float) -> bool:
    try:
        owner = json.loads(text)
        host, pid = owner["host"], int(owner["pid"])
    except (ValueError, KeyError, TypeError):
        return time.time() - mtime < STALE_S  # half-written by a process that died: stale after a while
    if host != socket.gethostname():
        return time.time() - mtime < STALE_S
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _try_claim(path: Path, me: bytes) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(me)
    return True


def _me() -> bytes:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode()


def claim_file(path: Path, me: bytes | None = None) -> bool:
    """Take the claim file ``path`` for this process: True if it got it (made it, or took it
    over from a process that died: renamed aside first, so of two processes taking over the
    same claim only one succeeds), False if a live process holds it."""
    me = me or _me()
    if _try_claim(path, me):
        return True
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:  # released meanwhile: its work is finished, or free again
        return _try_claim(path, me)
    if _owner_alive(text, mtime):
        return False
    aside = path.with_name(f"{path.name}.{os.getpid()}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False  # another process took it over first
    if aside.read_text() != text:  # a fresh claim was made meanwhile: give it back
        os.rename(aside, path)
        return False
    aside.unlink()
    return _try_claim(path, me)


def claim(run: str | Path, trials) -> "Claims":
    """Claim ``trials`` for this process; the result holds the ones it got. A trial another
    live process holds is left out; the claim of a dead process is taken over."""
    (Path(run) / "claims").mkdir(exist_ok=True)
    me = _me()
    return Claims(Path(run), [t for t in map(int, trials) if claim_file(claim_path(run, t), me)])


@contextmanager
def holding(path: str | Path):
    """Hold the claim file ``path`` while the block runs, with a heartbeat for other hosts;
    yields False (and holds nothing) where a live process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not claim_file(path):
        yield False
        return
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(path)
            except FileNotFoundError:
                pass

    threading.Thread(target=beat, daemon=True).start()
    try:
        yield True
    finally:
        stop.set()
        path.unlink(missing_ok=True)


@dataclass
class Claims:
    """The trials this process holds; :meth:`beat` keeps them alive, :meth:`release` frees them."""

    run: Path
    trials: list
    last_beat: float = 0.0

    def beat(self, *_):
        now = time.time()
        if now - self.last_beat >= HEARTBEAT_S:
            self.last_beat = now
            for t in self.trials:
                try:
                    os.utime(claim_path(self.run, t))
                except FileNotFoundError:
                    pass

    def release(self):
        for t in self.trials:
            claim_path(self.run, t).unlink(missing_ok=True)
        self.trials = []


def stored_trials(run: str | Path) -> set[int]:
    """The trial ids named by the trial files (without reading them)."""
    return {t for first, last, _ in trial_files(run) for t in range(first, last + 1)}


def trial_files(run: str | Path) -> list[tuple[int, int, Path]]:
    out = []
    for p in sorted((Path(run) / "trials").glob("trials_*.npz")):
        m = _TRIAL_FILE.match(p.name)
        if m:
            out.append((int(m[1]), int(m[2]), p))
    return out


def array_checksum(arrays: dict) -> str:
    """sha256 of every array (name, dtype, shape, bytes) but the checksum itself, in name order."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(k for k in arrays if k != "checksum"):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:32]


def _readable(path: Path, first: int, last: int) -> bool:
    """Whether a trial file is whole: its zip checksums hold, it names the trials of its name,
    and its arrays hash to the checksum written with them (an npz altered but still valid is
    caught; files from before checksums have none)."""
    try:
        with zipfile.ZipFile(path) as z:
            if z.testzip() is not None:
                return False
        with np.load(path, allow_pickle=False) as z:
            ids = z["trial_ids"]
            if "checksum" in z.files and str(z["checksum"]) != array_checksum({k: z[k] for k in z.files}):
                return False
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


def run_digest(meta: dict) -> str:
    """A digest of what run.json says defines the trials (config and dataset)."""
    import hashlib

    text = json.dumps({"config": meta["config"], "dataset": meta["dataset"]}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_run_digest(run: str | Path, meta: dict) -> None:
    """Refuse tables from trials that run.json no longer describes (it was edited after they
    were written): the tables' metadata would name another config or dataset."""
    want = run_digest(meta)
    for f in sorted((Path(run) / "trials").glob("trials_*.npz")):
        with np.load(f, allow_pickle=False) as z:
            if "run_digest" in z.files and str(z["run_digest"]) != want:
                raise RunMismatchError(f"{Path(run) / 'run.json'} no longer describes its trials ({f.name} was written "
                                       "under another config or dataset): restore run.json, or estimate into a new "
                                       "run directory")


def write_trials(run: str | Path, trial_ids: np.ndarray, member: np.ndarray, records: dict) -> Path:
    """Store one batch of consecutive trials: membership (t, n) bool and per-sample records
    (t, n) float margins; correctness is ``margin > 0``, kept as bits next to float16 margins;
    and the digest of the run.json they were written under (:func:`check_run_digest`)."""
    trial_ids = np.asarray(trial_ids)
    if not np.array_equal(trial_ids, np.arange(trial_ids[0], trial_ids[-1] + 1)):
        raise ValueError("a trial file holds consecutive trial ids")
    arrays = {"trial_ids": trial_ids, "member": np.packbits(member, axis=1), "n_train": np.array(member.shape[1]),
              "run_digest": np.array(run_digest(read_run_json(run)))}
    for name, m in records.items():
        if name.startswith("proxy_"):  # per-trial proxies (memtool.proxies), kept as they are
            arrays[name] = np.asarray(m, dtype=np.float32)
            continue
        m = np.asarray(m, dtype=np.float32)
        arrays[name] = m.astype(np.float16)
        arrays[name.replace("margin", "correct")] = np.packbits(m > 0, axis=1)
        arrays[name.replace("margin", "n")] = np.array(m.shape[1])
    path = Path(run) / "trials" / f"trials_{trial_ids[0]:06d}-{trial_ids[-1]:06d}.npz"
    arrays["checksum"] = np.array(array_checksum(arrays))
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


@dataclass
class Trials:
    """Everything the trained models recorded, ordered by trial id.

    ``member``: (t, n_train) bool; ``*_correct``: (t, n) bool; ``*_margin``: (t, n) float32.
    Robust records are None where the run did not record them; ``proxies``: name -> (t,
    n_train) float32 (:mod:`memtool.proxies`, NaN for trials that did not record them), or None."""

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
    proxies: dict | None = None

    def __len__(self):
        return len(self.trial_ids)

    def subset(self, rows) -> "Trials":
        def pick(v):
            return None if v is None else {k: a[rows] for k, a in v.items()} if isinstance(v, dict) else v[rows]

        return Trials(**{k: pick(v) for k, v in vars(self).items()})


def load_trials(run: str | Path) -> Trials:
    """Read every finished trial of ``run`` (duplicates from concurrent writers read once) into
    arrays allocated once, ordered by trial id."""
    files = []
    for first, last, path in trial_files(run):
        if _readable(path, first, last):
            files.append((first, last, path))
        else:
            set_aside(run, path, first, last)
    ids = sorted({t for first, last, _ in files for t in range(first, last + 1)})
    if not ids:
        kept = (Path(run) / "scores.parquet").exists()  # a committed reference, a --calibrate or imported run
        raise FileNotFoundError(f"{run} has no finished trials" + (
            ": its score tables were kept without them (a committed reference, a `proxies --calibrate` or an "
            "imported run), so they are final and cannot be recomputed" if kept else " yet"))
    row = {t: r for r, t in enumerate(ids)}
    arrays: dict[str, np.ndarray] = {"trial_ids": np.array(ids, dtype=np.int64)}
    filled = np.zeros(len(ids), bool)
    for first, last, path in files:
        with np.load(path, allow_pickle=False) as z:
            rows = np.array([row[t] for t in z["trial_ids"].tolist()])
            keep = ~filled[rows]
            if not keep.any():
                continue
            filled[rows] = True
            rows = rows[keep]
            n = int(z["n_train"])
            cols = {"member": (np.unpackbits(z["member"], axis=1, count=n).astype(bool), n)}
            for name in RECORDS:
                if name in z.files:
                    cnt = int(z[name.replace("margin", "n")])
                    c = name.replace("margin", "correct")
                    cols[name] = (z[name].astype(np.float32), cnt)
                    cols[c] = (np.unpackbits(z[c], axis=1, count=cnt).astype(bool), cnt)
            for name in z.files:
                if name.startswith("proxy_"):
                    cols[name] = (z[name], n)
            for key, (a, width) in cols.items():
                if key not in arrays:
                    arrays[key] = (np.full if key.startswith("proxy_") else np.zeros)(
                        (len(ids), width), *((np.nan,) if key.startswith("proxy_") else ()), dtype=a.dtype)
                arrays[key][rows] = a[keep]
    proxies = {k[len("proxy_"):]: arrays.pop(k) for k in list(arrays) if k.startswith("proxy_")}
    return Trials(**arrays, proxies=proxies or None)


def load_labels(run: str | Path) -> dict[str, np.ndarray]:
    with np.load(Path(run) / "labels.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def append_log(run: str | Path, record: dict) -> None:
    with open(Path(run) / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
