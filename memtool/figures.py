"""Figures of a run's scores: what a person looks at before reading tables.

``run_figures(RUN, OUT)`` (CLI: ``memtool figures RUN --out DIR``) writes
- ``mem_hist.png``: distribution of mem (clean vs. planted-noise labels when there are any);
- ``most_memorized.png``: the training images with the highest mem, with their labels;
- ``most_memorized_by_class.png``: each class's most memorized images (label, original label);
- ``high_influence_pairs.png``: the strongest high-influence (train, test) pairs.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt  # headless machines fall back to Agg; notebooks keep their inline backend
import numpy as np
import pandas as pd

from .datasets import load_dataset
from .estimator import load_influence, load_scores, read_run_json
from .estimator.scores import MEM_THRESHOLD


def _image(x: np.ndarray) -> np.ndarray:
    return x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)


def mem_histogram(scores: pd.DataFrame, threshold: float = MEM_THRESHOLD, ax=None):
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


def run_dataset(run: str | Path, data_root=None):
    """The dataset exactly as ``run`` used it (limit, planted noise), checked by fingerprint."""
    meta = read_run_json(run)
    cfg = meta["config"]
    ds = load_dataset(cfg["dataset"], data_root, limit=cfg.get("limit"), label_noise=cfg.get("label_noise", 0.0),
                      seed=cfg.get("seed", 0))
    if meta["dataset"].get("fingerprint") not in (None, ds.fingerprint):
        raise ValueError(f"{cfg['dataset']} on disk differs from the one {run} was made with (fingerprint)")
    return ds


def _title(i, m, y, o, c) -> str:
    return f"#{i} mem {m:.2f}\nlabel {y}" + (f" (was {o})" if c else "")


_COLS = ["sample_id", "mem", "label", "original_label", "label_corrupted"]


def most_memorized(scores: pd.DataFrame, ds, top: int = 24):
    """The ``top`` training images with the highest mem (margin_mem breaks ties)."""
    train = scores[scores["split"] == "train"].dropna(subset=["mem"])
    train = train.sort_values(["mem", "margin_mem"], ascending=False).head(top)
    fig = image_grid(ds.x_train[train["sample_id"].to_numpy()], [_title(*r) for r in train[_COLS].itertuples(index=False)])
    fig.suptitle("Most memorized training samples", fontsize=10)
    return fig


def class_gallery(scores: pd.DataFrame, ds, per_class: int = 8, order: str = "most", labels=None):
    """One row per class (``labels``: which ones; default all): its ``per_class`` most (or
    least) memorized training images, titled with mem, label and, for planted noise, the
    original label."""
    train = scores[scores["split"] == "train"].dropna(subset=["mem"])
    labels = sorted(train["label"].unique()) if labels is None else list(labels)
    rows = []
    for y in labels:
        c = train[train["label"] == y].sort_values(["mem", "margin_mem"], ascending=order == "least")
        rows.append(c.head(per_class))
    fig, axes = plt.subplots(len(labels), per_class, figsize=(per_class * 1.2, len(labels) * 1.55), squeeze=False)
    for ax_row, r in zip(axes, rows):
        for ax in ax_row:
            ax.axis("off")
        for ax, rec in zip(ax_row, r[_COLS].itertuples(index=False)):
            img = ds.x_train[rec[0]]
            ax.imshow(_image(img), cmap="gray" if img.shape[0] == 1 else None)
            ax.set_title(_title(*rec), fontsize=6)
    fig.suptitle(f"{'Most' if order == 'most' else 'Least'} memorized training samples per class", fontsize=10)
    fig.tight_layout()
    return fig


def trusted_pairs(infl: pd.DataFrame, p: float = 0.5) -> pd.DataFrame:
    """The high-influence pairs whose posterior probability of infl >= the threshold is at
    least ``p`` (tables without ``p_high``, made before it: every high pair)."""
    high = infl[infl["high"]]
    return high[high["p_high"] >= p] if "p_high" in high else high


def pair_gallery(infl: pd.DataFrame, ds, top: int = 12):
    """The ``top`` strongest trusted high-influence pairs (:func:`trusted_pairs`): each
    training image, then its test image."""
    trusted = trusted_pairs(infl)
    pairs = trusted.nlargest(top, "infl")
    images, titles = [], []
    for r in pairs.itertuples(index=False):
        images += [ds.x_train[r.train_id], ds.x_test[r.test_id]]
        titles += [f"train #{r.train_id}\nmem {r.mem:.2f}", f"test #{r.test_id}\ninfl {r.infl:.2f}"
                   + (f", P {r.p_high:.2f}" if "p_high" in pairs else "")]
    fig = image_grid(images, titles)
    n_high = int(infl["high"].sum())
    fig.suptitle(f"High-influence pairs (train image, then the test image it helps): {len(trusted)} of {n_high} "
                 "with posterior P(infl >= threshold) >= 0.5", fontsize=9)
    return fig


def is_image(shape) -> bool:
    """Whether samples of ``shape`` can be drawn: (C, H, W) with 1 or 3 channels."""
    return len(shape) == 3 and shape[0] in (1, 3)


def run_figures(run: str | Path, out: str | Path, top: int = 24, threshold: float = MEM_THRESHOLD,
                data_root=None, dataset=None) -> list[Path]:
    """Write the run's figures to ``out``; return their paths: the mem histogram, and for
    images the galleries of the most memorized samples and of the high-influence pairs.
    ``dataset``: the data of a run made from arrays given in Python (checked by fingerprint)."""
    run, out = Path(run), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dataset is not None:
        from .userdata import given_for_run

        given_for_run(dataset, run)
    ds = run_dataset(run, data_root)
    scores, infl = load_scores(run), load_influence(run)
    figs = {"mem_hist.png": mem_histogram(scores, threshold).figure}
    if is_image(ds.image_shape):
        figs.update({"most_memorized.png": most_memorized(scores, ds, top),
                     "most_memorized_by_class.png": class_gallery(scores, ds)})
        if len(trusted_pairs(infl)):
            figs["high_influence_pairs.png"] = pair_gallery(infl, ds, top // 2)
    paths = []
    for name, fig in figs.items():
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        paths.append(out / name)
    return paths


def mem_distributions(scores: dict, path) -> Path:
    """Histograms of clean and robust mem, one panel per run (e.g. standard / adversarial
    training), saved to ``path``."""
    fig, axes = plt.subplots(1, len(scores), figsize=(5 * len(scores), 3.3), squeeze=False)
    bins = np.linspace(-0.5, 1.0, 31)
    for ax, (name, table) in zip(axes[0], scores.items()):
        tr = table[table["split"] == "train"]
        for col, label in (("mem", "clean mem"), ("rob_mem", "robust mem")):
            if col in tr and tr[col].notna().any():
                ax.hist(tr[col].dropna(), bins=bins, alpha=0.6, label=f"{label} (median {tr[col].median():.2f})")
        ax.set(yscale="log", xlabel="memorization score", ylabel="training samples", title=name)
        ax.legend(frameon=False, fontsize=8)
    fig.suptitle("Clean and robust memorization under standard and adversarial training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


VERDICT_STYLES = {  # kind -> (colour, filled, legend)
    "resolved": ("#1f4e99", True, "resolved (the interval excludes 0)"),
    "equivalent": ("#2a7f3f", True, "equivalent within the declared margin"),
    "unresolved": ("0.45", False, "no resolved difference"),
    "none": ("0.65", False, "no interval, or no verdict"),
}


def verdict_kind(said: str) -> str:
    """The :data:`VERDICT_STYLES` kind of a verdict sentence (:func:`memtool.manifest.verdict`)."""
    from .manifest import CURVE, DIFFERENCE

    if said in (*DIFFERENCE[:2], *CURVE[:2]):
        return "resolved"
    if said.startswith("equivalent"):
        return "equivalent"
    return "unresolved" if said in (DIFFERENCE[2], CURVE[2]) else "none"


def verdict_figure(verdicts, path=None):
    """The README's verdict lines drawn (``verdicts``: (study, label, interval, verdict) rows of
    :func:`memtool.manifest.all_verdicts`): each contrast's value and 95 % interval in points,
    top to bottom, coloured by what its interval supports, its verdict beside it, and its
    declared equivalence margin shaded where it has one; saved to ``path`` where given. Returns
    the figure."""
    n = len(verdicts)
    fig, ax = plt.subplots(figsize=(10, 0.9 + 0.3 * n))
    y = np.arange(n)[::-1]
    for yi, (study, label, h, said) in zip(y, verdicts):
        colour, filled, _ = VERDICT_STYLES[verdict_kind(said)]
        if h.get("margin"):  # the declared equivalence margin, on its row
            ax.fill_between([-100 * h["margin"], 100 * h["margin"]], yi - 0.35, yi + 0.35,
                            color=VERDICT_STYLES["equivalent"][0], alpha=0.15, lw=0)
        if h.get("low") is not None:
            ax.plot([100 * h["low"], 100 * h["high"]], [yi, yi], color=colour, lw=2, solid_capstyle="butt")
        ax.plot([100 * h["value"]], [yi], "o", color=colour, mfc=colour if filled else "white", ms=5)
        ax.annotate(said, (1.01, yi), xycoords=("axes fraction", "data"), va="center", fontsize=6.5, color=colour)
    studies = [v[0] for v in verdicts]
    for yi in [y[i] + 0.5 for i in range(1, n) if studies[i] != studies[i - 1]]:
        ax.axhline(yi, color="0.85", lw=0.8)
    ax.axvline(0, color="0.3", lw=0.8, ls="--")
    ax.set_yticks(y, [f"{study}: {label}" for study, label, _, _ in verdicts], fontsize=7)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel("points (95 % interval)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("The decisive contrasts of every study, and what their intervals support", fontsize=9)
    fig.tight_layout()
    fig.legend(handles=[plt.Line2D([], [], color=c, marker="o", mfc=c if f else "white", label=t)
                        for c, f, t in VERDICT_STYLES.values()], fontsize=6.5, frameon=False,
               loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4)
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig
