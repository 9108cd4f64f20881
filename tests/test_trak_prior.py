"""The TRAK prior of the pairs (issue 30): the trials' own models are trained again exactly,
TRAK (the `traker` package) ranks a test sample's own class above the others, and a prior binned by an
informative score lifts the planted pairs' posterior while an uninformative one changes little."""

import numpy as np
import pytest

pytest.importorskip("trak")

from memtool.estimator.pairs import posterior, prior_grid  # noqa: E402
from memtool.estimator.trak_prior import run_trak, trak_posterior, trial_models  # noqa: E402


def test_trials_are_trained_again_into_their_own_models_and_trak_favours_the_own_class(tmp_path):
    """Up to float rounding: a stack of 2 sums in another order than the run's stack of 8 (a
    chaotic recipe, e.g. lr 0.2 for 40 epochs on digits, can amplify that; this one does not)."""
    import torch

    import memtool
    from conftest import DIGITS_FAST
    from memtool.estimator import load_trials

    run = tmp_path / "run"
    memtool.estimate(run, trials=8, progress=False, **{**DIGITS_FAST, "epochs": 10, "lr": 0.05})
    trials = load_trials(run)
    models, d = trial_models(run, trials.trial_ids[[1, 4]])
    with torch.no_grad():
        for k, row in enumerate((1, 4)):
            out = models[k](d["x_test"])
            y = d["y_test"]
            own = out.gather(1, y[:, None])[:, 0]
            margin = own - out.scatter(1, y[:, None], -torch.inf).max(1).values
            np.testing.assert_allclose(margin.numpy(), trials.test_margin[row], atol=0.05)
    scores = run_trak(run, trials.trial_ids[:2])
    y_train, y_test = d["y_train"].numpy(), d["y_test"].numpy()
    assert scores.shape == (len(y_train), len(y_test))
    same = y_train[:, None] == y_test[None, :]
    own_first = [scores[same[:, j], j].mean() > scores[~same[:, j], j].mean() for j in range(len(y_test))]
    assert np.mean(own_first) > 0.7  # measured: 0.79 (last layer, 2 models: a weak ranking, hence a prior only)


def test_a_prior_binned_by_an_informative_score_lifts_the_planted_pairs():
    rng = np.random.default_rng(0)
    n, planted = 20_000, np.arange(200)
    true = np.zeros(n)
    true[planted] = 0.4
    se = np.full(n, 0.15)
    est = true + se * rng.standard_normal(n)
    informative = rng.standard_normal(n) + 3 * (true > 0)
    flat, _ = posterior(est, se, 0.15, prior=prior_grid(est, se))
    lifted = trak_posterior(est, se, informative, 0.15)
    assert np.median(lifted[planted]) > np.median(flat[planted]) + 0.2
    assert np.median(lifted[200:]) <= np.median(flat[200:]) + 1e-3  # and the others' falls
    noise = trak_posterior(est, se, rng.standard_normal(n), 0.15)
    assert np.abs(noise - flat).mean() < 0.02
    rows = np.array([0, 5, 300])
    np.testing.assert_allclose(trak_posterior(est, se, informative, 0.15, rows=rows), lifted[rows])
