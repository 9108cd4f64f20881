"""The seeded subset plan: trial t trains on a random subset of round(ratio * n) samples.

Each trial's subset depends only on (seed, trial id), so a run can be extended with more
trials, sharded, or resumed in any order and every trial still sees the same subset."""

from __future__ import annotations

import numpy as np

_PLAN_STREAM = 0x51A9


def subset_size(n: int, ratio: float) -> int:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be strictly between 0 and 1, got {ratio}")
    m = int(round(ratio * n))
    if not 0 < m < n:
        raise ValueError(f"ratio={ratio} of n={n} samples leaves an empty subset or no held-out sample")
    return m


def subset_indices(n: int, ratio: float, seed: int, trial_ids) -> np.ndarray:
    """(len(trial_ids), m) sorted training indices of each trial's subset."""
    m = subset_size(n, ratio)
    return np.stack([np.sort(np.random.default_rng([seed, _PLAN_STREAM, int(t)]).permutation(n)[:m])
                     for t in trial_ids])


def membership(n: int, ratio: float, seed: int, trial_ids) -> np.ndarray:
    """(len(trial_ids), n) bool mask: sample i is in trial t's training subset."""
    idx = subset_indices(n, ratio, seed, trial_ids)
    mask = np.zeros((len(idx), n), dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask
