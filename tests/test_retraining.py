"""`memtool validate` and the retraining experiments under it."""

import numpy as np
import pandas as pd
import pytest
import torch

import memtool
from memtool import experiments
from memtool.cli import main


def test_t_interval_and_paired_summary_hand_computed():
    mean, lo, hi = experiments.t_interval([0.5, 0.7, 0.9])
    # sd 0.2, se 0.2 / sqrt(3), t(0.975, 2) = 4.302653
    assert mean == pytest.approx(0.7) and hi - mean == pytest.approx(4.302653 * 0.2 / np.sqrt(3), rel=1e-6)
    rec = pd.DataFrame({"variant": ["a"] * 4 + ["b"] * 4, "seed": [0, 0, 1, 1] * 2, "split": "test",
                        "sample_id": [0, 1] * 4, "correct": [1, 1, 1, 0, 0, 1, 1, 0]}).astype({"correct": bool})
    t = experiments.summarize(rec, {"first": np.array([True, False]), "both": np.array([True, True])}, baseline="a")
    row = t[(t.variant == "b") & (t.group == "both")].iloc[0]
    assert row.accuracy == pytest.approx(0.5) and row.n == 2 and row.seeds == 2
    assert row["diff"] == pytest.approx(-0.25)  # seed 0: 0.5 - 1.0, seed 1: 0.5 - 0.5
    first = t[(t.variant == "b") & (t.group == "first")].iloc[0]
    assert first.accuracy == pytest.approx(0.5) and first["diff"] == pytest.approx(-0.5)
    # the baseline lacks seed 1: the difference pairs seed 0 alone (one seed, no interval)
    t = experiments.summarize(rec[(rec.variant == "b") | (rec.seed == 0)], {"both": np.array([True, True])},
                              baseline="a")
    row = t[t.variant == "b"].iloc[0]
    assert row.seeds == 2 and row["diff"] == pytest.approx(-0.5) and np.isnan(row.diff_low)


def test_retrain_attacks_only_the_robust_splits_and_their_values_do_not_move(tmp_path):
    from memtool.recipe import Recipe

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (60, 1, 4, 4), dtype=torch.uint8, generator=g)
    y = torch.arange(60) % 3
    data = experiments.Data(x[:40], y[:40], x[40:], y[40:], 3)
    recipe = Recipe(model="mlp", hidden=8, epochs=2, batch_size=20, lr=0.1)
    kw = dict(seeds=1, robust_eps=0.3, robust_steps=2, progress=False)
    both = experiments.retrain(tmp_path / "both", data, recipe, {"full": []}, **kw)
    test_only = experiments.retrain(tmp_path / "test", data, recipe, {"full": []}, robust_splits=("test",), **kw)
    with np.load(tmp_path / "test" / "models" / "full-s0.npz") as z:
        assert set(z.files) == {"train_correct", "test_correct", "test_robust_correct", "device"}
        assert str(z["device"]) == "cpu"  # where the records were trained
    assert test_only[test_only.split == "train"]["robust_correct"].isna().all()
    pd.testing.assert_frame_equal(test_only[test_only.split == "test"].reset_index(drop=True),
                                  both[both.split == "test"].reset_index(drop=True), check_dtype=False)


def test_a_model_another_experiment_trained_is_copied_not_retrained(tmp_path, monkeypatch):
    """reuse=: finding (b)'s full-set models are finding (a)'s when data, recipe, seed, left-out
    samples and attack agree (the splits it reads attacked there); any difference retrains."""
    from memtool.recipe import Recipe

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (60, 1, 4, 4), dtype=torch.uint8, generator=g)
    y = torch.arange(60) % 3
    data = experiments.Data(x[:40], y[:40], x[40:], y[40:], 3)
    recipe = Recipe(model="mlp", hidden=8, epochs=2, batch_size=20, lr=0.1)
    kw = dict(seeds=2, robust_eps=0.3, robust_steps=2, progress=False, settings={"fingerprint": "f"})
    a = experiments.retrain(tmp_path / "a", data, recipe, {"full": [], "without": [0, 1]},
                            robust_splits={"full": ("train", "test"), "without": ("test",)}, **kw)
    trained, real = [], experiments.fit
    monkeypatch.setattr(experiments, "fit", lambda r, x, y, subsets, seeds, **k: (trained.append(len(seeds)),
                                                                                   real(r, x, y, subsets, seeds, **k))[1])
    b = experiments.retrain(tmp_path / "b", data, recipe, {"full": [], "other": [5]}, robust_splits=("test",),
                            reuse=tmp_path / "a", **kw)
    assert trained == [2]  # only "other": both seeds of "full" were copied
    with np.load(tmp_path / "b" / "models" / "full-s1.npz") as z:
        assert set(z.files) == {"train_correct", "test_correct", "test_robust_correct", "device"}
    pd.testing.assert_frame_equal(b[b.variant == "full"].reset_index(drop=True),
                                  a[(a.variant == "full")].assign(robust_correct=lambda t: t.robust_correct.where(
                                      t.split == "test")).reset_index(drop=True), check_dtype=False)
    # another recipe, or splits the other experiment did not attack: trained here
    experiments.retrain(tmp_path / "c", data, Recipe(model="mlp", hidden=8, epochs=3, batch_size=20, lr=0.1),
                        {"full": []}, reuse=tmp_path / "a", **kw)
    experiments.retrain(tmp_path / "d", data, recipe, {"without": [0, 1]}, reuse=tmp_path / "a", **kw)
    experiments.retrain(tmp_path / "e", data, recipe, {"full": []}, reuse=tmp_path / "a",
                        **{**kw, "settings": {"fingerprint": "other data"}})
    experiments.retrain(tmp_path / "f", data, recipe, {"full": []}, reuse=tmp_path / "a", **{**kw, "seeds": 3})
    assert trained == [2, 2, 2, 2, 1]  # other data: both seeds; seed 2, which "a" never trained: one


def test_validate_end_to_end_and_resume(digits_run, tmp_path, capsys, monkeypatch):
    run, _ = digits_run
    out = tmp_path / "v"
    assert main(["validate", str(run), "--seeds", "2", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "influenced test samples" in text and "wrote" in text
    table = memtool.rundir.read_table(out / "validate.parquet")
    assert set(table.variant) == {"full", "without high-influence", "without random"}
    assert {"accuracy", "ci_low", "ci_high", "diff", "diff_low", "diff_high", "n", "seeds"} <= set(table.columns)
    assert (table.seeds == 2).all() and (out / "validate.png").stat().st_size > 0
    assert "| without high-influence | influenced test samples | clean |" in (out / "validate.md").read_text()
    pairs = memtool.load_influence(run).query("high")
    infl_rows = table[table.group == "influenced test samples"]
    assert (infl_rows.n == pairs.test_id.nunique()).all()
    assert table.attrs["memtool"]["n_removed"] == pairs.train_id.nunique()
    # (whether removal hurts the influenced samples is the measurement, not a property: with 16 trials
    # the pairs are mostly noise; the reference runs report it)
    full = table[(table.variant == "full") & (table.group == "all test samples")].iloc[0]
    assert full.accuracy > 0.8 and full["diff"] == 0.0
    records = experiments.load_records(out, ["full", "without random"], 2)
    assert set(records.split) == {"train", "test"} and len(records) == 2 * 2 * (1437 + 360)
    fit = table[table.group == "own training samples"].set_index("variant")  # the fit, on the samples trained on
    assert fit.loc["full", "n"] == 1437 and fit.loc["without high-influence", "n"] == 1437 - pairs.train_id.nunique()
    own = records[(records.variant == "full") & (records.split == "train")].groupby("seed")["correct"].mean()
    assert fit.loc["full", "accuracy"] == pytest.approx(own.mean())
    # a second call trains nothing
    monkeypatch.setattr(experiments, "fit", lambda *a, **k: pytest.fail("retrained a finished model"))
    again = memtool.validate(run, out, seeds=2, progress=False)
    pd.testing.assert_frame_equal(again, table, check_like=True)


def test_validate_refuses_an_imported_run(tmp_path):
    memtool.rundir.write_json(tmp_path / "run.json", {"config": {"source": "feldman-zhang"}, "dataset": {}})
    with pytest.raises(ValueError, match="needs a `memtool estimate` run"):
        memtool.validate(tmp_path)


def test_model_accuracy_lists_each_model_and_shows_one_that_did_not_train():
    """Per model and split: the mean of its per-sample flags; an unattacked split shows '-'."""
    import pandas as pd

    from memtool.experiments import model_accuracy

    rows = []
    for seed, train_ok, test_ok in ((0, [1, 1, 1, 0], [1, 1, 0, 0]), (1, [1, 0, 0, 0], [0, 0, 0, 0])):
        rows.append(pd.DataFrame({"variant": "full", "seed": seed, "split": "train", "sample_id": range(4),
                                  "correct": pd.array(train_ok, dtype=bool), "robust_correct": pd.NA}))
        rows.append(pd.DataFrame({"variant": "full", "seed": seed, "split": "test", "sample_id": range(4),
                                  "correct": pd.array(test_ok, dtype=bool),
                                  "robust_correct": pd.array([True, False, False, False], dtype="boolean")}))
    table = model_accuracy(pd.concat(rows, ignore_index=True)).splitlines()
    assert table[0] == "| variant | seed | clean train % | clean test % | robust train % | robust test % |"
    assert table[2:4] == ["| full | 0 | 75.0 | 50.0 | - | 25.0 |", "| full | 1 | 25.0 | 0.0 | - | 25.0 |"]
    assert table[5] == ("**Did not train** (clean training accuracy more than 15 points below the median model's "
                        "50.0 %): full seed 1 (25.0 %).")  # seed 0 is 25 points above the median, not named
    first = pd.concat(rows[:2], ignore_index=True)
    assert "Did not train" not in model_accuracy(pd.concat([first, first.assign(seed=1)], ignore_index=True))


def test_retrain_leaves_a_variant_another_process_holds_and_trains_it_once_that_one_is_gone(tmp_path, monkeypatch):
    """Two processes may run one experiment: a variant whose claim a live process holds is
    skipped, the others trained, and the held one trained here after its owner died."""
    import json
    import socket
    import subprocess
    import sys
    import threading

    from memtool import sharing
    from memtool.recipe import Recipe

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (60, 1, 4, 4), dtype=torch.uint8, generator=g)
    y = torch.arange(60) % 3
    data = experiments.Data(x[:40], y[:40], x[40:], y[40:], 3)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)"])
    threading.Thread(target=owner.wait, daemon=True).start()
    (tmp_path / "claims").mkdir()
    (tmp_path / "claims" / "a.retrain.claim").write_text(json.dumps({"host": socket.gethostname(), "pid": owner.pid,
                                                                      "since": 0}))
    monkeypatch.setattr(sharing, "POLL_S", 0.05)
    order, real = [], experiments.fit
    monkeypatch.setattr(experiments, "fit", lambda recipe, x, y, subsets, *a, **k: (
        order.append((len(subsets[0]), owner.poll())), real(recipe, x, y, subsets, *a, **k))[1])
    records = experiments.retrain(tmp_path, data, Recipe(model="mlp", hidden=8, epochs=1, batch_size=20, lr=0.1),
                                  {"a": [0, 1], "b": [2]}, seeds=2, progress=False)
    assert [n for n, _ in order] == [39, 38]  # b first (a was held), each variant's stack once
    assert order[0][1] is None and order[1][1] is not None  # a only after its owner ended
    assert len(records) == 2 * 2 * (40 + 20) and not list((tmp_path / "claims").iterdir())


def test_holm_and_paired_contrasts_against_hand_computed_values():
    from scipy import stats

    from memtool.experiments import contrasts, holm

    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])  # 3p, then max(2p, prev), then max(p, prev)
    np.testing.assert_allclose(holm([0.5, 0.2]), [0.5, 0.4])
    d = pd.Series([0.1, 0.2, 0.3])
    t = contrasts({"a": d})
    half = stats.t.ppf(0.975, 2) * 0.1 / np.sqrt(3)  # sd 0.1 over 3 seeds
    assert t.loc[0, "diff"] == pytest.approx(0.2)
    assert (t.loc[0, "diff_low"], t.loc[0, "diff_high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert t.loc[0, "p"] == pytest.approx(2 * stats.t.sf(0.2 / (0.1 / np.sqrt(3)), 2))
    # adjusted: the smaller p of two at level 1 - 0.05/2, the larger at 1 - 0.05
    adj = contrasts({"a": d, "b": pd.Series([0.0, 0.1, -0.05])}, adjust=True).set_index("contrast")
    wide = stats.t.ppf(1 - 0.025 / 2, 2) * 0.1 / np.sqrt(3)
    assert adj.loc["a", "diff_high"] - 0.2 == pytest.approx(wide)
    assert adj.loc["a", "p_holm"] == pytest.approx(min(1, 2 * adj.loc["a", "p"]))
    # per-sample values, (seeds, samples): two seeds alike, samples 1, 1, 0, 0 (var 1/3 over 4):
    # the samples' normal interval 0.5 -+ 1.96 sqrt(1/12), and its z-test's p-value
    per_sample = contrasts({"c": np.array([[1.0, 1, 0, 0], [1, 1, 0, 0]])}).iloc[0]
    assert per_sample.seeds == 2 and (per_sample.diff_low, per_sample.diff_high) == pytest.approx(
        (0.5 - 1.96 * np.sqrt(1 / 12), 0.5 + 1.96 * np.sqrt(1 / 12)), abs=1e-3)
    assert per_sample.p == pytest.approx(2 * stats.norm.sf(0.5 / np.sqrt(1 / 12)), abs=1e-6)


def test_crossed_interval_hand_computed():
    """Three seeds on eight samples, mean 0.5833: the seeds' means (0.625, 0.5, 0.625) vary by
    0.005208 over 3 = 0.001736; the samples' means by 0.2460 over 8 = 0.030754; each seed's own
    sample variance (0.03348, 0.03571, 0.03348; mean 0.034226) exceeds that by 2 x 0.001736, the
    seeds' share, which leaves 0.029018 shared. 0.001736 + 0.029018 = 0.030754, with 0.030754^2 /
    (0.001736^2 / 2) = 628 degrees of freedom: 0.5833 -+ 1.9637 x 0.17537 = -+ 0.3444 (the floor,
    t over the seeds alone, t_2 x 0.04167 = 0.1793, is narrower). Two seeds on four samples,
    [[0, 0, 1, 1], [0, 1, 1, 1]]: Satterthwaite's 0.625 -+ 0.515 would be narrower than t over
    the 2 seeds, 12.706 x 0.125 = 1.588, which it takes. Equal samples: t over the seeds; one
    seed, or equal seeds: the samples' normal interval."""
    from memtool.experiments import crossed_interval

    d = np.array([[0.0, 1, 0, 1, 1, 0, 1, 1], [0, 1, 0, 1, 1, 0, 1, 0], [0, 1, 0, 1, 1, 0, 1, 1]])
    assert crossed_interval(d) == pytest.approx((0.5833, 0.5833 - 0.3444, 0.5833 + 0.3444), abs=1e-4)
    assert crossed_interval(np.array([[0.0, 0, 1, 1], [0, 1, 1, 1]])) == pytest.approx((0.625, 0.625 - 1.5883,
                                                                                         0.625 + 1.5883), abs=1e-4)
    # an accuracy cannot leave [0, 1]: its interval is cut there, the mean kept
    assert crossed_interval(np.array([[0.0, 0, 1, 1], [0, 1, 1, 1]]), bounds=(0, 1)) == pytest.approx((0.625, 0, 1))
    assert crossed_interval(d, bounds=(0, 1)) == pytest.approx(crossed_interval(d))  # inside: unchanged
    assert crossed_interval(np.array([[0.2] * 5, [0.4] * 5, [0.6] * 5])) == pytest.approx(
        (0.4, 0.4 - 4.3027 * np.sqrt(0.04 / 3), 0.4 + 4.3027 * np.sqrt(0.04 / 3)), abs=1e-4)
    samples = (0.5 - 1.96 * np.sqrt(1 / 12), 0.5 + 1.96 * np.sqrt(1 / 12))  # 1, 0, 1, 0: variance 1/3 over 4
    assert crossed_interval(np.array([[1.0, 0, 1, 0]]))[1:] == pytest.approx(samples, abs=1e-3)
    assert crossed_interval(np.array([[1.0, 0, 1, 0]] * 3))[1:] == pytest.approx(samples, abs=1e-3)
    with pytest.raises(ValueError, match="seeds, samples"):
        crossed_interval(np.zeros(3))


@pytest.mark.parametrize("seeds,tau", [(5, 0.0), (5, 0.3), (3, 0.1)])
def test_crossed_interval_covers_seeds_and_shared_test_samples(seeds, tau):
    """Simulated as in benchmarks/interval_coverage.py: every seed's model scored on the same 500
    test samples, sample i right under seed s when z_i + u_s + e_si > c, the samples'
    difficulty z ~ N(0, 9) (most right, or wrong, under every seed), the seeds' effect u ~ N(0,
    tau^2), noise e ~ N(0, 1), c at population accuracy 0.6. Over 400 repetitions the 95 %
    interval covers 0.6 92-99 % of the time; the t-interval over the seeds' accuracies, which
    holds the test samples fixed, does not come near where the seeds barely differ."""
    from scipy import stats

    from memtool.experiments import crossed_interval, t_interval

    rng = np.random.default_rng(seeds)
    c = -stats.norm.ppf(0.6) * np.sqrt(9 + tau ** 2 + 1)
    covered = seeds_only = 0
    for _ in range(400):
        z, u = rng.normal(0, 3, 500), rng.normal(0, tau, seeds)
        correct = (z[None] + u[:, None] + rng.normal(0, 1, (seeds, 500)) > c).astype(float)
        _, lo, hi = crossed_interval(correct)
        covered += lo <= 0.6 <= hi
        _, lo, hi = t_interval(correct.mean(1))
        seeds_only += lo <= 0.6 <= hi
    assert 0.92 <= covered / 400 <= 0.99
    if tau == 0:
        assert seeds_only / 400 < 0.7
