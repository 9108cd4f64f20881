"""Typical and atypical samples (docs/science.md section 2).

    scores, infl = memtool.load_scores(run), memtool.load_influence(run)
    atypical = atypical_test(scores, infl)                 # bool Series over test sample ids

- Atypical training sample: mem >= ``mem_threshold`` (0.25; ties up to rounding count, see
  ``at_least``). No estimate (NaN) is typical.
- Atypical test sample: in a high-influence pair with an atypical training sample of its
  class (infl >= ``infl_threshold``, 0.15). The influence table keeps only pairs above the
  thresholds the run's tables were computed with, so stricter thresholds filter it and looser
  ones are refused (recompute the tables with ``memtool scores RUN --mem-threshold ...``); the
  ``ash`` pairs' call is a posterior at the table's infl threshold, so another one is refused.
"""

from __future__ import annotations

import pandas as pd

from .estimator.scores import at_least


def _split(scores: pd.DataFrame, split: str) -> pd.DataFrame:
    return scores[scores["split"] == split].set_index("sample_id")


def atypical_train(scores: pd.DataFrame, mem_threshold: float = 0.25) -> pd.Series:
    """Whether each training sample is atypical (mem >= ``mem_threshold``), by sample_id."""
    from .bat import require_mem

    require_mem(scores, "passed to atypical_train")
    mem = _split(scores, "train")["mem"]
    return pd.Series(at_least(mem, mem_threshold), index=mem.index, name="atypical")  # NaN: typical


def atypical_test(scores: pd.DataFrame, influence: pd.DataFrame, mem_threshold: float = 0.25,
                  infl_threshold: float = 0.15) -> pd.Series:
    """Whether each test sample is atypical: in a same-class pair (i, j) with mem(i) >=
    ``mem_threshold`` and infl(i, j) >= ``infl_threshold``, infl by the estimator that made the
    table (its ``pairs``: the probit, the adaptive-shrinkage regression's call, or Feldman &
    Zhang's difference). By sample_id."""
    stored = influence.attrs.get("memtool", {}).get("thresholds")
    if stored and (mem_threshold < stored["mem"] or infl_threshold < stored["infl"]):
        raise ValueError(
            f"the influence table holds the pairs with mem >= {stored['mem']} and infl >= {stored['infl']}; "
            f"for mem_threshold={mem_threshold}, infl_threshold={infl_threshold} recompute it: "
            f"memtool scores RUN --mem-threshold {mem_threshold} --infl-threshold {infl_threshold}")
    rule = (stored or {}).get("pairs", "fz")  # the table's estimator
    if rule == "ash":  # its call is a posterior probability at the table's threshold
        if stored and infl_threshold != stored["infl"]:
            raise ValueError(f"the influence table's ash pairs are called at infl >= {stored['infl']}; for "
                             f"infl_threshold={infl_threshold} recompute it: memtool scores RUN --infl-threshold "
                             f"{infl_threshold}")
        called = influence["high_ash"]
    else:
        called = at_least(influence["infl_probit" if rule == "probit" else "infl"], infl_threshold)
    pairs = influence[at_least(influence["mem"], mem_threshold) & called
                      & (influence["train_label"] == influence["test_label"])]
    test_ids = _split(scores, "test").index
    return pd.Series(test_ids.isin(pairs["test_id"].unique()), index=test_ids, name="atypical")
