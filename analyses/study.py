"""What every analysis of a run starts from: its config, its data as it was used, and the
typical / atypical split of PAPER.md section 2."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memtool.analysis import atypical_test, atypical_train
from memtool.datasets import Dataset, load_dataset, standard_eps
from memtool.estimator import EstimateConfig, load_influence, load_scores, read_run_json
from memtool.experiments import Data


@dataclass
class Study:
    run: Path
    meta: dict
    config: EstimateConfig
    dataset: Dataset
    data: Data  # the same samples as tensors on the device
    eps: float  # the robustness radius of the analysis
    atypical_train: np.ndarray  # (n_train,) bool
    atypical_test: np.ndarray  # (n_test,) bool

    @property
    def atypical_ids(self) -> np.ndarray:
        return np.flatnonzero(self.atypical_train)


def load_study(run, eps: float | None = None, mem_threshold: float = 0.25, infl_threshold: float = 0.15,
               device: str = "cpu", data_root=None) -> Study:
    run = Path(run)
    meta = read_run_json(run)
    cfg = EstimateConfig.from_dict(meta["config"])
    ds = load_dataset(cfg.dataset, data_root, cfg.limit, cfg.label_noise, cfg.seed)
    if ds.fingerprint != meta["dataset"]["fingerprint"]:
        raise ValueError(f"the {cfg.dataset} data on disk differ from the data {run} was estimated on")
    scores, infl = load_scores(run), load_influence(run)
    return Study(run, meta, cfg, ds, Data.of(ds, device), standard_eps(cfg.dataset) if eps is None else eps,
                 atypical_train(scores, mem_threshold).to_numpy(),
                 atypical_test(scores, infl, mem_threshold, infl_threshold).to_numpy())


def study_parser(doc: str) -> argparse.ArgumentParser:
    """The command line every analysis shares: RUN, --out, seeds, eps, threshold, device."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("run", help="a `memtool estimate` run directory")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--seeds", type=int, default=3, help="models per cell (default: 3)")
    p.add_argument("--eps", type=float, default=None, help="default: the dataset's usual radius")
    p.add_argument("--mem-threshold", type=float, default=0.25, help="atypical: mem >= this (default: 0.25)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-root", default=None)
    return p
