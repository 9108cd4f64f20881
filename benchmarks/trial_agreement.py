"""Do two runs of one estimate (e.g. the same trials on a CPU and on a GPU) train the same
models? Per shared trial id: its subset (must be identical), clean and robust test accuracy in
each run, and the fraction of test samples whose robust (else clean) correctness agrees.

    python benchmarks/trial_agreement.py RUN_A RUN_B
    python benchmarks/trial_agreement.py A.npz B.npz ...   # pairs of a retraining experiment's model records

Results: benchmarks/README.md (GPU)."""

import sys

import numpy as np

from memtool.estimator.store import load_trials


def agreement(a, b) -> list[dict]:
    ta, tb = load_trials(a), load_trials(b)
    shared = np.intersect1d(ta.trial_ids, tb.trial_ids)
    if not len(shared):
        raise SystemExit(f"{a} and {b} share no trial ids")
    ra, rb = (np.searchsorted(t.trial_ids, shared) for t in (ta, tb))
    rows = []
    for t, i, j in zip(shared.tolist(), ra, rb):
        if not (ta.member[i] == tb.member[j]).all():
            raise SystemExit(f"trial {t} trained on different subsets: not the same estimate")
        rob = ta.test_rob_correct is not None and tb.test_rob_correct is not None
        ca, cb = (ta.test_rob_correct[i], tb.test_rob_correct[j]) if rob else (ta.test_correct[i], tb.test_correct[j])
        rows.append({"trial": t, "clean_a": ta.test_correct[i].mean(), "clean_b": tb.test_correct[j].mean(),
                     "robust_a": ca.mean() if rob else np.nan, "robust_b": cb.mean() if rob else np.nan,
                     "agree": (ca == cb).mean()})
    return rows


def record_agreement(files) -> None:
    """Per pair of model records (models/VARIANT-sS.npz of two experiments): the fraction of
    samples whose clean and robust outcomes are the same."""
    for a, b in zip(files[::2], files[1::2]):
        with np.load(a) as za, np.load(b) as zb:
            same = {k: float((za[k] == zb[k]).mean()) for k in za.files if k in zb.files and k.endswith("correct")}
        print(f"{a} ~ {b}: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in same.items()))


if __name__ == "__main__":
    if len(sys.argv) < 3 or (sys.argv[1].endswith(".npz") and len(sys.argv) % 2 == 0):
        raise SystemExit(__doc__)
    if sys.argv[1].endswith(".npz"):
        record_agreement(sys.argv[1:])
        sys.exit()
    rows = agreement(*sys.argv[1:3])
    print("| trial | clean A % | clean B % | robust A % | robust B % | per-sample agreement % |\n|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['trial']} | {100 * r['clean_a']:.2f} | {100 * r['clean_b']:.2f} | {100 * r['robust_a']:.2f} | "
              f"{100 * r['robust_b']:.2f} | {100 * r['agree']:.1f} |")
    mean = {k: np.mean([r[k] for r in rows]) for k in ("clean_a", "clean_b", "robust_a", "robust_b", "agree")}
    print(f"| mean of {len(rows)} | {100 * mean['clean_a']:.2f} | {100 * mean['clean_b']:.2f} | "
          f"{100 * mean['robust_a']:.2f} | {100 * mean['robust_b']:.2f} | {100 * mean['agree']:.1f} |")
