"""Figures of a run's scores: what a person looks at before reading tables.

``run_figures(RUN, OUT)`` (CLI: ``memtool figures RUN --out DIR``) writes
- ``mem_hist.png``: distribution of mem (clean vs. planted-noise labels when there are any);
- ``most_memorized.png``: the training images with the highest mem, with their labels;
- ``high_influence_pairs.png``: the strongest high-influence (train, test) pairs.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .datasets import load_dataset  # noqa: E402
from .estimator import load_influence, load_scores, read_run_json  # noqa: E402


def _image(x: np.ndarray) -> np.ndarray:
    return x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)


def mem_histogram(scores: pd.DataFrame, threshold: float = 0.25, ax=None):
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    train = scores[scores["split"] == "train"]
    bins = np.linspace(-0.5, 1.0, 31)
    groups = [("clean label", ~train["label_corrupted"]), ("flipped label", train["label_corrupted"])]
    for name, mask in groups:
        if mask.any():
            ax.hist(train.loc[mask, "mem"].dropna(), bins=bins, alpha=0.7, label=f"{name} (n={int(mask.sum())})")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"mem = {threshold}")
    ax.set_yscale("log")
    ax.set(xlabel="memorization score mem", ylabel="training samples", title="Memorization of training samples")
    ax.legend(frameon=False)
    return ax


def image_grid(images, titles, ncols: int = 8, size: float = 1.3):
    nrows = max(1, -(-len(images) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * (size + 0.35)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles):
        ax.imshow(_image(img), cmap="gray" if img.shape[0] == 1 else None)
        ax.set_title(title, fontsize=7)
    return fig


def run_figures(run: str | Path, out: str | Path, top: int = 24, threshold: float = 0.25) -> list[Path]:
    """Write the run's figures to ``out``; return their paths."""
    run, out = Path(run), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = read_run_json(run)
    cfg = meta["config"]
    ds = load_dataset(cfg["dataset"], limit=cfg.get("limit"), label_noise=cfg.get("label_noise", 0.0),
                      seed=cfg.get("seed", 0))
    if meta["dataset"].get("fingerprint") not in (None, ds.fingerprint):
        raise ValueError(f"{cfg['dataset']} on disk differs from the one {run} was made with (fingerprint)")
    scores, infl = load_scores(run), load_influence(run)
    paths = []

    mem_histogram(scores, threshold)
    paths.append(out / "mem_hist.png")
    plt.tight_layout()
    plt.savefig(paths[-1], dpi=120)
    plt.close("all")

    train = scores[scores["split"] == "train"].dropna(subset=["mem"])
    train = train.sort_values(["mem", "margin_mem"], ascending=False).head(top)  # margin breaks ties
    titles = [f"#{i} mem {m:.2f}\nlabel {y}" + (f" (was {o})" if c else "")
              for i, m, y, o, c in train[["sample_id", "mem", "label", "original_label", "label_corrupted"]].itertuples(index=False)]
    fig = image_grid(ds.x_train[train["sample_id"].to_numpy()], titles)
    fig.suptitle("Most memorized training samples", fontsize=10)
    paths.append(out / "most_memorized.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    pairs = infl[infl["high"]].nlargest(top // 2, "infl")
    if len(pairs):
        images, titles = [], []
        for i, j, v, m in pairs[["train_id", "test_id", "infl", "mem"]].itertuples(index=False):
            images += [ds.x_train[i], ds.x_test[j]]
            titles += [f"train #{i}\nmem {m:.2f}", f"test #{j}\ninfl {v:.2f}"]
        fig = image_grid(images, titles)
        fig.suptitle("High-influence pairs (train image, then the test image it helps)", fontsize=10)
        paths.append(out / "high_influence_pairs.png")
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
