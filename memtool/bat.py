"""BAT's inputs: the atypical training samples of a score table, checked against the data.

A score table belongs to a dataset as memtool loaded it (after ``limit`` and planted label
noise). The check uses the dataset fingerprint where the table records one (any estimator
run, an imported C-score table) and otherwise (an imported Feldman & Zhang table) the number
of training samples and their labels; a mismatch is refused, naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .estimator.scores import at_least
from .rundir import read_table


def read_scores(scores) -> "pd.DataFrame":  # noqa: F821
    """A score table from a run directory (its scores.parquet) or a parquet file."""
    path = Path(scores)
    if path.is_dir():
        path = path / "scores.parquet"
    if not path.exists():
        raise FileNotFoundError(f"no score table at {path} (give a run directory or a scores .parquet file)")
    table = read_table(path)
    if not {"sample_id", "split", "label"} <= set(table.columns):
        raise ValueError(f"{path} is not a score table (one row per sample: sample_id, split, label, mem, ...; it has "
                         f"{', '.join(map(str, table.columns[:6]))}): give the run directory or its scores.parquet")
    return table


def require_mem(table, source) -> None:
    """A score table without ``mem`` (one-run proxies only) cannot say who is atypical: say how to get it."""
    if "mem" not in table.columns:
        raise ValueError(f"score table {source} has no mem column (a `memtool proxies` table?): calibrate it with "
                         "`memtool proxies ... --calibrate RUN` (RUN: a few-trial `memtool estimate` of the same data)")
    if not table.loc[table["split"] == "train", "mem"].notna().any():
        raise ValueError(f"score table {source} has no mem estimate for any training sample (an `import-cscore` "
                         "table?): every sample would count as typical; give a `memtool estimate` run or an "
                         "`import-fz` table")


def atypical_mask(scores, dataset, tau: float) -> np.ndarray:
    """(n_train,) bool: mem >= tau (NaN: typical) for every training sample of ``dataset``."""
    table = read_scores(scores)
    require_mem(table, scores)
    meta = table.attrs.get("memtool", {})
    fp = (meta.get("dataset") or {}).get("fingerprint")
    train = table[table["split"] == "train"].sort_values("sample_id")
    n = len(dataset.y_train)
    if fp is not None and fp != dataset.fingerprint:
        raise ValueError(f"score table {scores} belongs to other data: its dataset fingerprint is {fp}, "
                         f"{dataset.name} as loaded here (limit, label noise) has {dataset.fingerprint}")
    if len(train) != n or not np.array_equal(train["sample_id"].to_numpy(), np.arange(n)):
        raise ValueError(f"score table {scores} has {len(train)} training rows, {dataset.name} as loaded here has "
                         f"{n} training samples: the table belongs to other data")
    wrong = np.flatnonzero(train["label"].to_numpy() != dataset.y_train)
    if len(wrong):
        raise ValueError(f"score table {scores}: {len(wrong)} of {n} training labels differ from {dataset.name} "
                         f"(first at sample {wrong[0]}); the table belongs to other data")
    return at_least(train["mem"].to_numpy(dtype=float), tau)


def judged_harm(table, dataset, atypical: np.ndarray) -> np.ndarray:
    """(n_train,) float: h of every atypical training sample from a harmfulness table (columns
    sample_id, label, h: :mod:`analyses.finding_b`'s), 0 for the typical ones. Every atypical
    sample must be in it, with the dataset's label."""
    harm = read_table(table).set_index("sample_id")
    ids = np.flatnonzero(atypical)
    missing = np.setdiff1d(ids, harm.index.to_numpy())
    if len(missing):
        raise ValueError(f"harmfulness table {table} lacks {len(missing)} of the {len(ids)} atypical training samples "
                         f"(first: {missing[0]}): it was judged with another score table or tau; use the same ones")
    if "label" in harm and not np.array_equal(harm.loc[ids, "label"].to_numpy(), dataset.y_train[ids]):
        raise ValueError(f"harmfulness table {table}: its labels differ from {dataset.name}'s; "
                         "it belongs to other data")
    h = np.zeros(len(dataset.y_train))
    h[ids] = harm.loc[ids, "h"].to_numpy()
    return h
