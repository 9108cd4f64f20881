"""Score tables: trials -> scores.parquet and influence.parquet, plus the run summary.

Both tables carry their settings and summary as JSON in the parquet key-value metadata
(key ``memtool``), so a table explains itself; :func:`read_table` puts it in ``df.attrs``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import check_choice, check_int, check_number, setting
from ..rundir import read_table, write_table  # noqa: F401  (re-exported: memtool.estimator.read_table)

from ..recorder import mean_over_members
from . import scores as S
from .pairs import ASH_CUT, ash_candidates, candidate_pairs, plain_posterior, posterior, prior_grid, probit_influence
from .scores import INFL_THRESHOLD, MEM_THRESHOLD
from .store import Trials, check_run_digest, load_labels, load_trials, read_run_json, trials_asked, update_run_json

def score_table(trials: Trials, labels: dict) -> pd.DataFrame:
    """One row per sample (train rows, then test rows); see docs/ARCHITECTURE.md for columns."""
    y_tr, y_te = labels["train_label"], labels["test_label"]
    never = np.zeros((len(trials), len(y_te)), dtype=bool)  # test samples are never trained on
    parts = []
    for split, member, y, extra in (
        ("train", trials.member, y_tr, {"label_corrupted": y_tr != labels["original_label"],
                                        "original_label": labels["original_label"]}),
        ("test", never, y_te, {"label_corrupted": np.zeros(len(y_te), bool), "original_label": y_te}),
    ):
        stats = S.memorization(member, getattr(trials, f"{split}_correct"))
        stats.update(S.margin_memorization(member, getattr(trials, f"{split}_margin")))
        if trials.train_rob_correct is not None:
            rob = S.memorization(member, getattr(trials, f"{split}_rob_correct"))
            rob.update(S.margin_memorization(member, getattr(trials, f"{split}_rob_margin")))
            stats.update({f"rob_{k}": v for k, v in rob.items() if not k.startswith("n_")})
        if trials.proxies:  # the mean over the trials that trained on the sample; none for test samples
            stats.update({k: mean_over_members(v, member) if split == "train" else np.full(len(y), np.nan)
                          for k, v in trials.proxies.items()})
        parts.append(pd.DataFrame({"sample_id": np.arange(len(y)), "split": split, "label": y, **stats, **extra}))
    df = pd.concat(parts, ignore_index=True)
    df["split"] = pd.Categorical(df["split"], categories=["train", "test"])
    return df


ESTIMATOR_NAMES = {"fz": "Feldman & Zhang", "probit": "probit", "ash": "adaptive-shrinkage"}  # --pairs
PAIR_ESTIMATORS = tuple(ESTIMATOR_NAMES)


def _pairs(trials: Trials, labels: dict, mem: np.ndarray, kind: str, **thr) -> pd.DataFrame:
    correct = trials.test_correct if kind == "clean" else trials.test_rob_correct
    p = S.influence_pairs(trials.member, correct, labels["train_label"], labels["test_label"], mem, **thr)
    return pd.DataFrame(p)


def probit_candidates(trials: Trials, labels: dict, mem: np.ndarray, mem_threshold=MEM_THRESHOLD):
    """(train_ids, test_ids, infl, se): the probit estimate of every pair the high-influence rule
    can call (same class, mem(i) >= mem_threshold)."""
    ci, cj = candidate_pairs(mem, labels["train_label"], labels["test_label"], mem_threshold)
    return (ci, cj, *probit_influence(trials.member, trials.test_margin, ci, cj))


def ash_called(trials: Trials, labels: dict, mem: np.ndarray, mem_threshold=MEM_THRESHOLD,
               infl_threshold=INFL_THRESHOLD):
    """(train_ids, test_ids, infl, p_high, called) of every candidate pair by the adaptive-shrinkage
    regression; called: P(infl >= infl_threshold) >= ASH_CUT."""
    ci, cj, infl, p = ash_candidates(trials.member, trials.test_margin, mem, labels["train_label"],
                                     labels["test_label"], mem_threshold, infl_threshold)
    return ci, cj, infl, p, p >= ASH_CUT


def influence_table(trials: Trials, labels: dict, mem: np.ndarray, rob_mem: np.ndarray | None = None,
                    mem_threshold=MEM_THRESHOLD, infl_threshold=INFL_THRESHOLD, top_k=10,
                    pairs: str = "ash") -> pd.DataFrame:
    """High-influence pairs and top-k pairs; robust influence (``rob_*``) where recorded.
    Every row carries the three estimates of its pair: Feldman & Zhang's 0/1 difference
    (``infl``, ``infl_se``, ``high_fz``), the probit of the test margins (``infl_probit``,
    ``infl_probit_se``, ``high_probit``) and the adaptive-shrinkage regression (``infl_ash``, its
    posterior mean, and ``high_ash``: P(infl >= infl_threshold) >= ASH_CUT; NaN and False off
    the candidates); ``high`` is the call of the estimator ``pairs`` and ``p_high`` its
    P(infl >= infl_threshold | the trials) (docs/estimating.md)."""
    check_choice("pairs", pairs, PAIR_ESTIMATORS)
    thr = dict(mem_threshold=mem_threshold, infl_threshold=infl_threshold, top_k=top_k)
    keys = ["train_id", "test_id"]
    ci, cj, c_infl, c_se = probit_candidates(trials, labels, mem, mem_threshold)
    _, _, a_infl, a_p, a_called = ash_called(trials, labels, mem, mem_threshold, infl_threshold)
    called = S.at_least(c_infl, infl_threshold) | a_called
    df = _pairs(trials, labels, mem, "clean", **thr).rename(columns={"high": "high_fz"})
    df = df.merge(pd.DataFrame({"train_id": ci[called], "test_id": cj[called]}), on=keys, how="outer")
    prefixes = [("", "high_fz", trials.test_correct)]
    if rob_mem is not None:
        df = df.merge(_pairs(trials, labels, rob_mem, "robust", **thr).add_prefix("rob_")
                      .rename(columns={"rob_train_id": "train_id", "rob_test_id": "test_id"}), on=keys, how="outer")
        prefixes.append(("rob_", "rob_high", trials.test_rob_correct))
    for prefix, high, correct in prefixes:  # rows one rule called but not another: their estimates
        miss = df[f"{prefix}infl"].isna().to_numpy()
        if miss.any():
            i, j = df.loc[miss, "train_id"].to_numpy(), df.loc[miss, "test_id"].to_numpy()
            infl, se = S.influence_at(trials.member, correct, i, j)
            df.loc[miss, f"{prefix}infl"], df.loc[miss, f"{prefix}infl_se"] = infl, se
            df.loc[miss, high], df.loc[miss, f"{prefix}rank"] = False, -1
        df = df.astype({high: bool, f"{prefix}rank": np.int64})
    i, j = df["train_id"].to_numpy(), df["test_id"].to_numpy()
    df["infl_probit"], df["infl_probit_se"] = probit_influence(trials.member, trials.test_margin, i, j)
    df["high_probit"] = ((labels["train_label"][i] == labels["test_label"][j]) & S.at_least(mem[i], mem_threshold)
                         & S.at_least(df["infl_probit"].to_numpy(), infl_threshold))
    ash = pd.DataFrame({"train_id": ci, "test_id": cj, "infl_ash": a_infl, "p_ash": a_p, "high_ash": a_called})
    df = df.merge(ash, on=keys, how="left")
    df["high_ash"] = df["high_ash"].eq(True)  # False off the candidates
    i, j = df["train_id"].to_numpy(), df["test_id"].to_numpy()
    df.insert(2, "train_label", labels["train_label"][i])
    df.insert(3, "test_label", labels["test_label"][j])
    df.insert(4, "mem", mem[i])
    df["high"] = df[f"high_{pairs}"]
    if pairs == "ash":
        df["p_high"] = df["p_ash"]
    elif pairs == "probit":
        df["p_high"] = posterior(df["infl_probit"].to_numpy(), df["infl_probit_se"].to_numpy(), infl_threshold,
                                 prior=prior_grid(c_infl, c_se))[0]
    else:
        df["p_high"] = plain_posterior(trials.member, trials.test_correct, mem, labels["train_label"],
                                       labels["test_label"], mem_threshold, infl_threshold, i, j)
    df = df.drop(columns="p_ash")
    return df.sort_values(["test_id", "train_id"], ignore_index=True)


def high_pair_set(trials: Trials, labels: dict, mem: np.ndarray, mem_threshold=MEM_THRESHOLD,
                  infl_threshold=INFL_THRESHOLD, prefix: str = "", pairs: str = "ash") -> set:
    """The high-influence pairs (train_id, test_id) that ``trials`` estimate by the estimator
    ``pairs`` (robust, ``prefix="rob_"``: Feldman & Zhang's), given ``mem``."""
    if pairs in ("probit", "ash") and not prefix:
        if pairs == "ash":
            ci, cj, *_, called = ash_called(trials, labels, mem, mem_threshold, infl_threshold)
        else:
            ci, cj, infl, _ = probit_candidates(trials, labels, mem, mem_threshold)
            called = S.at_least(infl, infl_threshold)
        return set(zip(ci[called].tolist(), cj[called].tolist()))
    p = S.influence_pairs(trials.member, getattr(trials, f"test_{prefix}correct"), labels["train_label"],
                          labels["test_label"], mem, mem_threshold, infl_threshold, top_k=0)
    return set(zip(p["train_id"].tolist(), p["test_id"].tolist()))


def split_half(trials: Trials, labels: dict, prefix: str = "", mem_threshold=MEM_THRESHOLD,
               infl_threshold=INFL_THRESHOLD, pairs: str = "ash") -> dict:
    """Agreement of scores from even- and odd-numbered trials (docs/science.md section 1)."""
    halves = [trials.subset(slice(0, None, 2)), trials.subset(slice(1, None, 2))]
    correct = f"train_{prefix}correct"
    mems = [S.memorization(h.member, getattr(h, correct))["mem"] for h in halves]
    margins = [S.margin_memorization(h.member, getattr(h, f"train_{prefix}margin"))["margin_mem"] for h in halves]
    pair_sets = [high_pair_set(h, labels, m, mem_threshold, infl_threshold, prefix, pairs)
                 for h, m in zip(halves, mems)]
    high = [set(np.flatnonzero(S.at_least(m, mem_threshold)).tolist()) for m in mems]
    return {f"{prefix}spearman_mem": S.spearman(*mems), f"{prefix}spearman_margin_mem": S.spearman(*margins),
            f"{prefix}jaccard_high_mem": S.jaccard(*high), f"{prefix}jaccard_high_pairs": S.jaccard(*pair_sets)}


def summarize(scores: pd.DataFrame, infl: pd.DataFrame, trials: Trials, labels: dict,
              mem_threshold=MEM_THRESHOLD, infl_threshold=INFL_THRESHOLD, pairs: str = "ash") -> dict:
    tr = scores[scores["split"] == "train"]
    te = scores[scores["split"] == "test"]
    high = infl[infl["high"]]
    member = trials.member
    out = {
        "n_trials": len(trials), "n_train": len(tr), "n_test": len(te),
        "train_acc_in_subset": float(trials.train_correct[member].mean()),
        "test_acc": float(trials.test_correct.mean()),
        "mem_threshold": mem_threshold, "infl_threshold": infl_threshold, "pairs": pairs,
        "n_no_estimate": int(tr["mem"].isna().sum()),
        "n_high_mem": int(S.at_least(tr["mem"], mem_threshold).sum()),
        "frac_high_mem": float(S.at_least(tr["mem"], mem_threshold).mean()),
        "n_high_pairs": len(high), "n_test_in_high_pairs": int(high["test_id"].nunique()),
        **({"expected_false_pairs": float((1 - high["p_high"]).sum())} if "p_high" in high else {}),
        "median_mem_se": float(tr["mem_se"].median()),
    }
    corrupted = tr["label_corrupted"].to_numpy()
    if corrupted.any():
        out["n_label_corrupted"] = int(corrupted.sum())
        out["noise_auroc_mem"] = S.auroc(tr["mem"].to_numpy(), corrupted)
        out["noise_auroc_margin_mem"] = S.auroc(tr["margin_mem"].to_numpy(), corrupted)
    if len(trials) >= 4:
        out["split_half"] = split_half(trials, labels, "", mem_threshold, infl_threshold, pairs)
    if trials.train_rob_correct is not None:
        out["rob_train_acc_in_subset"] = float(trials.train_rob_correct[member].mean())
        out["rob_test_acc"] = float(trials.test_rob_correct.mean())
        out["n_high_rob_mem"] = int(S.at_least(tr["rob_mem"], mem_threshold).sum())
        if len(trials) >= 4:
            out["split_half"].update(split_half(trials, labels, "rob_", mem_threshold, infl_threshold))
    return out


@dataclass(frozen=True)
class Thresholds:
    """What the score tables call high (docs/science.md section 1)."""

    mem_threshold: float = setting(MEM_THRESHOLD, "high-memorization threshold on mem")
    infl_threshold: float = setting(INFL_THRESHOLD, "high-influence threshold on infl")
    top_k: int = setting(10, "most influential training samples kept per test sample")
    pairs: str = setting("ash", "the estimate that calls a pair high: ash (the adaptive-shrinkage regression of "
                                "the test margins on membership; the default: docs/estimating.md) | probit (of "
                                "each pair's test margins) | fz (Feldman & Zhang's 0/1 difference)",
                         choices=PAIR_ESTIMATORS)

    def __post_init__(self):
        check_number("mem_threshold", self.mem_threshold, -1, 1)
        check_number("infl_threshold", self.infl_threshold, -1, 1)
        check_int("top_k", self.top_k, 0)
        check_choice("pairs", self.pairs, PAIR_ESTIMATORS)


def rerun_command(argv: list[str], run: Path, trials: int) -> str:
    """The command that made ``run`` (its argv, as run.json records it), to train whatever of
    its first ``trials`` trials is missing: every shard, the run by its absolute path."""
    keep, args = ["memtool"], list(argv[1:])
    while args:
        a = args.pop(0)
        if a.split("=")[0] in ("--shard", "--trials", "--out", "--until-se", "--until-pairs"):
            if "=" not in a and args:
                args.pop(0)
            continue
        keep.append(a)
    return shlex.join(keep + ["--trials", str(trials), "--out", str(Path(run).resolve())])


def compute_tables(run: str | Path, mem_threshold: float = Thresholds.mem_threshold,
                   infl_threshold: float = Thresholds.infl_threshold, top_k: int = Thresholds.top_k,
                   pairs: str = Thresholds.pairs, allow_fewer: bool = False) -> dict:
    """Recompute scores.parquet and influence.parquet from ``run``'s trials; return the summary.
    Tables made from more trials than the run now holds whole (a damaged file was set aside)
    are not replaced unless ``allow_fewer``: the error names the damaged files and the command
    that retrains them."""
    Thresholds(mem_threshold, infl_threshold, top_k, pairs)  # validates
    run = Path(run)
    meta = read_run_json(run)
    trials, labels = load_trials(run), load_labels(run)  # damaged files moved aside first
    check_run_digest(run, meta)
    before = (meta.get("summary") or {}).get("n_trials") if (run / "scores.parquet").exists() else None
    if before and len(trials) < before and not allow_fewer:
        damaged = sorted(p.name for p in (run / "trials" / "damaged").glob("*")) if (run / "trials" / "damaged").exists() else []
        command = rerun_command(meta["command"], run, before) if meta.get("command") else \
            f"memtool estimate --trials {before} --out {run.resolve()} (with run.json's settings)"
        raise ValueError(f"{run} holds {len(trials)} whole trials, but its tables were made from {before}: not replacing "
                         f"them with worse ones. Set aside as damaged: {', '.join(damaged) or 'none'} (in "
                         f"{run / 'trials' / 'damaged'}). Retrain the missing trials with `{command}`, or write "
                         f"tables from fewer trials with `memtool scores {run} --allow-fewer`")
    scores = score_table(trials, labels)
    tr = scores[scores["split"] == "train"]
    rob_mem = tr["rob_mem"].to_numpy() if "rob_mem" in tr else None
    infl = influence_table(trials, labels, tr["mem"].to_numpy(), rob_mem, mem_threshold, infl_threshold, top_k, pairs)
    summary = summarize(scores, infl, trials, labels, mem_threshold, infl_threshold, pairs)
    asked = trials_asked(run)
    if asked is not None and len(trials) < asked:  # `memtool scores` while shards are still training
        summary["unfinished"] = (f"{len(trials)} of the {asked} trials the run was asked for are finished, and these "
                                 f"tables are from them: run `memtool scores {run}` again once the rest are")
    table_meta = {"config": meta["config"], "dataset": meta["dataset"], "summary": summary,
                  "thresholds": {"mem": mem_threshold, "infl": infl_threshold, "top_k": top_k, "pairs": pairs}}
    write_table(scores, run / "scores.parquet", table_meta)
    write_table(infl, run / "influence.parquet", table_meta)
    update_run_json(run, summary=summary)
    return summary


def _table(run: str | Path, name: str, compute: bool) -> pd.DataFrame:
    path = Path(run) / name
    if not path.exists():
        if not compute:
            raise FileNotFoundError(f"{path} does not exist: if {run} has trials, compute its tables with "
                                    f"`memtool scores {run}` (or compute=True); otherwise estimate into it first")
        compute_tables(run)
    return read_table(path)


def load_scores(run: str | Path, compute: bool = False) -> pd.DataFrame:
    """The per-sample score table of ``run``; ``compute=True``: computed (and written) from its
    trials first if it is missing."""
    return _table(run, "scores.parquet", compute)


def load_influence(run: str | Path, compute: bool = False) -> pd.DataFrame:
    """The influence table of ``run`` (see :func:`load_scores` for ``compute``)."""
    return _table(run, "influence.parquet", compute)
