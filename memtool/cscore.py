"""Import published C-scores (Jiang et al., ICML 2021) as a memtool score table.

The released files (``cifar10-cscores-orig-order.npz``, ``cifar100-cscores-orig-order.npz``,
``mnist-cscores-orig-order.npz``, ...) hold ``labels`` and ``scores`` for the training set
in the dataset's original order, which is memtool's canonical order. The labels are checked
against the dataset on disk, so scores never land on the wrong samples; the table gets the
dataset's fingerprint. The C-score is a sample's expected accuracy when it is held out,
averaged over the ratios of the training subsets (Jiang et al. train at ratios 10 % to 90 %);
the imported table holds it in ``cscore``, and ``mem`` and the other score columns are NaN.

An estimator run trains at one subset ratio, so it cannot compute the C-score: its tables
have no ``cscore`` column, and their ``acc_out`` (held-out accuracy at the run's ratio) is
one term of the C-score's average, not the C-score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .datasets import load_dataset
from .fz import _score_rows
from .rundir import write_json, write_table


def import_cscore(file, out, dataset: str, data_root=None) -> list[Path]:
    """Write ``out``/scores.parquet and run.json from the C-score ``file`` of ``dataset``."""
    path = Path(file)
    if not path.exists():
        raise FileNotFoundError(f"C-score file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not {"labels", "scores"} <= set(z.files):
                raise ValueError(f"{path} is not a C-score file: it needs arrays 'labels' and 'scores', "
                                 f"it has {sorted(z.files)}")
            labels, scores = z["labels"].astype(np.int64), z["scores"].astype(np.float64)
    except (OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npz file ({e})") from None
    ds = load_dataset(dataset, data_root)
    y = ds.y_train
    if len(labels) != len(y) or len(scores) != len(y):
        raise ValueError(f"{path} holds {len(labels)} labels and {len(scores)} scores, but the {dataset} training "
                         f"set has {len(y)} samples: is it the C-score file of another dataset?")
    wrong = np.flatnonzero(labels != y)
    if len(wrong):
        raise ValueError(f"{path}: {len(wrong)} of {len(y)} labels differ from the {dataset} training set "
                         f"(first at sample {wrong[0]}: file {labels[wrong[0]]}, dataset {y[wrong[0]]}); "
                         "the scores must be in the dataset's original order")
    df = _score_rows("train", np.arange(len(y)), y, np.nan)
    df["cscore"] = scores
    df["split"] = pd.Categorical(df["split"], categories=["train", "test"])
    meta = {"config": {"source": "c-score", "file": path.name, "dataset": dataset},
            "dataset": {"name": ds.name, "fingerprint": ds.fingerprint, "n_train": len(y), "n_test": len(ds.y_test),
                        "num_classes": ds.num_classes},
            "summary": {"n_train": len(y), "cscore_mean": float(np.mean(scores))}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_table(df, out / "scores.parquet", meta)]
    write_json(out / "run.json", meta)
    return paths
