"""The hybrid (memtool.hybrid): a cross-fitted regression recovers a known function from
noisy targets; TracIn pairs by hand; a calibrated proxies directory is a run that validate
and BAT accept, and it finds planted label noise."""

import numpy as np
import pytest

import memtool
from memtool.hybrid import cheap_influence, cross_fit


def test_cross_fit_recovers_a_known_function_from_noisy_targets():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 4000)
    truth = np.where(x > 0.8, 0.9, 0.1 * x)
    noisy = truth + rng.normal(0, 0.3, len(x))  # noise 3x the signal's typical size
    noisy[:50] = np.nan  # no target: predicted, never fitted on
    pred = cross_fit(x[:, None], noisy)
    assert np.sqrt(np.mean((pred - truth) ** 2)) < 0.06 < np.sqrt(np.nanmean((noisy - truth) ** 2)) / 4
    assert np.isfinite(pred[:50]).all() and np.abs(pred[:50] - truth[:50]).mean() < 0.1


def test_tracin_pairs_by_hand():
    """Class 0: train 0, 2; test 0, 1. Class 1: train 1; test 2. infl = mem_hat(i) * cos(i, j)."""
    tracin = {"train_label": np.array([0, 1, 0]), "test_label": np.array([0, 0, 1]),
              "cos_0": np.array([[0.9, 0.1], [0.5, 0.3]], np.float32), "cos_1": np.array([[0.8]], np.float32)}
    mem_hat = np.array([0.5, 0.1, 0.3])  # train 1 is typical: no pairs
    t = cheap_influence(tracin, mem_hat, mem_threshold=0.25, infl_threshold=0.15)
    got = {(r.train_id, r.test_id): (round(r.infl, 4), r.high) for r in t.itertuples()}
    assert got == {(0, 0): (0.45, True), (0, 1): (0.05, False), (2, 0): (0.15, True), (2, 1): (0.09, False)}
    assert (t["train_label"] == t["test_label"]).all()


def test_calibrated_proxies_are_a_run_every_stage_accepts(tmp_path):
    from memtool.bat import atypical_mask
    from memtool.estimator.scores import auroc

    kw = dict(dataset="digits", label_noise=0.05, epochs=30, hidden=64, batch_size=32, progress=False)
    memtool.estimate(tmp_path / "few", trials=16, **kw)
    table = memtool.proxies(tmp_path / "px", seeds=2, calibrate=tmp_path / "few", **kw)
    train = table[table["split"] == "train"]
    flipped = train["label_corrupted"].to_numpy()
    assert auroc(train["mem"].to_numpy(), flipped) > 0.95
    assert np.isfinite(train["mem_subsampled"]).mean() > 0.98 and np.isfinite(train["mem"]).all()  # 0.7^16: never out
    infl = memtool.load_influence(tmp_path / "px")
    assert infl["high"].any() and (infl["train_label"] == infl["test_label"]).all()
    assert atypical_mask(tmp_path / "px", memtool.load_dataset("digits", label_noise=0.05), 0.25).sum() == \
        (train["mem"] >= 0.25).sum()
    v = memtool.validate(tmp_path / "px", tmp_path / "v", seeds=1, progress=False)
    assert set(v["variant"]) == {"full", "without high-influence", "without random"}
    with pytest.raises(ValueError, match="calibration run .* belongs to other data"):
        memtool.proxies(tmp_path / "px2", seeds=1, calibrate=tmp_path / "few", **{**kw, "label_noise": 0.0})


def test_shrinkage_is_the_empirical_bayes_posterior_mean():
    """One bin, prior 0, se 0.2 everywhere: tau^2 = mean(noisy^2) - 0.04, and every estimate
    is scaled by tau^2 / (tau^2 + 0.04); a missing estimate keeps the prior."""
    from memtool.hybrid import shrink

    rng = np.random.default_rng(1)
    noisy = rng.normal(0, 0.2, 2000) + rng.normal(0, 0.2, 2000)  # truth spread 0.2, noise 0.2
    noisy[0] = np.nan
    se = np.full(2000, 0.2)
    got = shrink(noisy, se, np.zeros(2000), bins=1)
    tau2 = np.nanmean(noisy ** 2) - 0.04
    np.testing.assert_allclose(got[1:], tau2 / (tau2 + 0.04) * noisy[1:])
    assert got[0] == 0.0 and 0.4 < tau2 / (tau2 + 0.04) < 0.6


def test_an_uncalibrated_proxies_table_is_refused_naming_the_fix(tmp_path):
    from memtool.analysis import atypical_train
    from memtool.bat import atypical_mask

    table = memtool.proxies(tmp_path / "px", dataset="digits", limit=200, seeds=1, epochs=1, hidden=16,
                            pairs=False, progress=False)
    with pytest.raises(ValueError, match="no mem column .* --calibrate RUN"):
        atypical_mask(tmp_path / "px", memtool.load_dataset("digits", limit=200), 0.25)
    with pytest.raises(ValueError, match="no mem column"):
        atypical_train(table)
