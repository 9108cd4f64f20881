"""Import Feldman & Zhang's released CIFAR-100 scores as memtool score tables.

Two files are understood (keys in docs/science.md section 1), read with ``allow_pickle=False``:

- ``cifar100_infl_matrix.npz``: ``tr_mem``, ``tr_labels``, ``tt_labels`` and, per class k,
  ``infl_matrix_class{k}`` (train x test of that class) with ``tr_classidx_{k}`` and
  ``tt_classidx_{k}``. Gives the full scores.parquet and influence.parquet (high pairs and
  each test sample's top-k within its class).
- ``cifar100_high_infl_pairs_infl0.15_mem0.25.npz``: ``tr_idx``, ``tt_idx``, ``infl``, ``mem``.
  Gives the high-influence pairs only (and ``mem`` of the training samples that appear).

The tables have the same columns as an estimator run; what the files do not hold
(counts, standard errors, margins) is NaN.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .estimator.scores import at_least
from .rundir import write_json, write_table

_SCORE_COLUMNS = ["n_in", "n_out", "acc_in", "acc_out", "mem_se", "margin_in", "margin_out", "margin_mem",
                  "margin_mem_se"]


def _load(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not one of Feldman & Zhang's .npz files (numpy says: {e}); expected "
                         "cifar100_infl_matrix.npz or cifar100_high_infl_pairs_infl0.15_mem0.25.npz") from None


def _score_rows(split, ids, label, mem) -> pd.DataFrame:
    df = pd.DataFrame({"sample_id": ids, "split": split, "label": label, "mem": mem})
    for c in _SCORE_COLUMNS:
        df[c] = np.nan
    df["label_corrupted"] = False
    df["original_label"] = label
    return df


def _matrix_pairs(z: dict, mem_threshold: float, infl_threshold: float, top_k: int) -> pd.DataFrame:
    parts, k = [], 0
    while f"infl_matrix_class{k}" in z:
        infl = z[f"infl_matrix_class{k}"].astype(np.float64)
        tr, tt = z[f"tr_classidx_{k}"].astype(np.int64), z[f"tt_classidx_{k}"].astype(np.int64)
        high = at_least(z["tr_mem"][tr][:, None], mem_threshold) & at_least(infl, infl_threshold)
        rank = np.full(infl.shape, -1, dtype=np.int64)
        kk = min(top_k, len(tr))
        if kk:
            order = np.argsort(-infl, axis=0, kind="stable")[:kk]
            np.put_along_axis(rank, order, np.arange(kk)[:, None].repeat(len(tt), 1), axis=0)
        i, j = np.nonzero(high | (rank >= 0))
        parts.append(pd.DataFrame({"train_id": tr[i], "test_id": tt[j], "infl": infl[i, j],
                                   "high": high[i, j], "rank": rank[i, j]}))
        k += 1
    if not parts:
        raise ValueError("no infl_matrix_class{k} arrays in the influence-matrix file")
    return pd.concat(parts, ignore_index=True)


def import_fz(files, out, mem_threshold: float = 0.25, infl_threshold: float = 0.15, top_k: int = 10):
    """Write ``out``/scores.parquet, influence.parquet and run.json from the released files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = {Path(f).name: _load(f) for f in files}
    matrix = next((z for z in data.values() if "tr_mem" in z), None)
    pairs_file = next((z for z in data.values() if "tr_idx" in z), None)
    if matrix is None and pairs_file is None:
        raise ValueError(f"{list(data)}: neither a Feldman & Zhang influence-matrix file (key tr_mem) "
                         "nor a high-influence-pairs file (key tr_idx)")
    if matrix is not None:
        y_tr, y_te = matrix["tr_labels"].astype(np.int64), matrix["tt_labels"].astype(np.int64)
        scores = pd.concat([_score_rows("train", np.arange(len(y_tr)), y_tr, matrix["tr_mem"].astype(np.float64)),
                            _score_rows("test", np.arange(len(y_te)), y_te, np.nan)], ignore_index=True)
        infl = _matrix_pairs(matrix, mem_threshold, infl_threshold, top_k)
        infl["train_label"], infl["test_label"] = y_tr[infl["train_id"]], y_te[infl["test_id"]]
        infl["mem"] = matrix["tr_mem"][infl["train_id"]].astype(np.float64)
    else:
        p = pairs_file
        tr_ids, first = np.unique(p["tr_idx"].astype(np.int64), return_index=True)
        scores = _score_rows("train", tr_ids, -1, p["mem"][first].astype(np.float64))
        infl = pd.DataFrame({"train_id": p["tr_idx"].astype(np.int64), "test_id": p["tt_idx"].astype(np.int64),
                             "infl": p["infl"].astype(np.float64), "high": True, "rank": -1,
                             "train_label": -1, "test_label": -1, "mem": p["mem"].astype(np.float64)})
        infl = infl[at_least(infl["mem"], mem_threshold) & at_least(infl["infl"], infl_threshold)]
    scores["split"] = pd.Categorical(scores["split"], categories=["train", "test"])
    infl["infl_se"] = np.nan
    infl = infl[["train_id", "test_id", "train_label", "test_label", "mem", "infl", "infl_se", "high", "rank"]]
    infl = infl.sort_values(["test_id", "train_id"], ignore_index=True)
    tr = scores[scores["split"] == "train"]
    high = infl[infl["high"]]
    summary = {"n_train": len(tr), "n_test": int((scores["split"] == "test").sum()),
               "mem_threshold": mem_threshold, "infl_threshold": infl_threshold,
               "n_high_mem": int(at_least(tr["mem"], mem_threshold).sum()),
               "frac_high_mem": float(at_least(tr["mem"], mem_threshold).mean()),
               "n_high_pairs": len(high), "n_test_in_high_pairs": int(high["test_id"].nunique())}
    meta = {"config": {"source": "feldman-zhang", "files": sorted(data)},
            "dataset": {"name": "cifar100", "num_classes": 100, "fingerprint": None},
            "summary": summary, "thresholds": {"mem": mem_threshold, "infl": infl_threshold, "top_k": top_k}}
    paths = [write_table(scores, out / "scores.parquet", meta), write_table(infl, out / "influence.parquet", meta)]
    write_json(out / "run.json", meta)
    return paths
