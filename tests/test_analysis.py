import numpy as np
import pandas as pd
import pytest

import memtool
from memtool.analysis import accuracy_by_group, atypical_test, atypical_train, wilson_interval


def _tables():
    scores = pd.DataFrame({
        "sample_id": [0, 1, 2, 3, 0, 1, 2, 3],
        "split": ["train"] * 4 + ["test"] * 4,
        "mem": [0.1, 0.3, np.nan, 0.25] + [np.nan] * 4,
    })
    infl = pd.DataFrame({  # (train_id, test_id) pairs as influence.parquet stores them
        "train_id":    [1,   3,    1,   3,    0],
        "test_id":     [0,   1,    2,   3,    3],
        "train_label": [5,   6,    5,   6,    6],
        "test_label":  [5,   6,    7,   6,    6],
        "mem":         [0.3, 0.25, 0.3, 0.25, 0.1],
        "infl":        [0.2, 0.1,  0.5, 0.15, 0.9],
    })
    infl.attrs["memtool"] = {"thresholds": {"mem": 0.25, "infl": 0.15, "top_k": 10}}
    return scores, infl


def test_atypical_train_is_mem_at_or_above_the_threshold():
    scores, _ = _tables()
    assert atypical_train(scores).tolist() == [False, True, False, True]  # NaN (no estimate): typical
    assert atypical_train(scores, 0.3).tolist() == [False, True, False, False]


def test_atypical_test_needs_a_same_class_pair_above_both_thresholds():
    scores, infl = _tables()
    # test 0: mem 0.3, infl 0.2, same class. test 1: infl 0.1 too low. test 2: other class.
    # test 3: (3, 3) has mem 0.25 and infl 0.15 exactly; (0, 3) has a typical train sample.
    assert atypical_test(scores, infl).tolist() == [True, False, False, True]
    assert atypical_test(scores, infl, infl_threshold=0.2).tolist() == [True, False, False, False]
    assert atypical_test(scores, infl, mem_threshold=0.3).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="memtool scores RUN --mem-threshold 0.1 --infl-threshold 0.15"):
        atypical_test(scores, infl, mem_threshold=0.1)


def test_wilson_interval_matches_hand_computed_values():
    lo, hi = wilson_interval(8, 10)  # z = 1.96: center 0.71674, half-width 0.22658
    assert (lo, hi) == (pytest.approx(0.49016, abs=1e-5), pytest.approx(0.94332, abs=1e-5))
    lo, hi = wilson_interval(0, 20)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.16113, abs=1e-5)
    assert np.isnan(wilson_interval(0, 0)[0])


def test_accuracy_by_group_counts_each_column_per_group():
    atypical = pd.Series([True, False, False, True], index=[0, 1, 2, 3])
    per_sample = pd.DataFrame({"sample_id": [0, 1, 2, 3], "label": [5, 6, 7, 6],
                               "clean": [True, True, True, False], "pgd20": [False, True, False, False]})
    table = accuracy_by_group(per_sample, atypical).set_index(["column", "group"])
    assert table.loc[("clean", "atypical"), ["n", "n_correct", "accuracy"]].tolist() == [2, 1, 0.5]
    assert table.loc[("clean", "typical"), ["n", "n_correct", "accuracy"]].tolist() == [2, 2, 1.0]
    assert table.loc[("pgd20", "typical"), "n_correct"] == 1
    assert table.loc[("clean", "atypical"), "ci_low"] < 0.5 < table.loc[("clean", "atypical"), "ci_high"]
    with pytest.raises(ValueError, match="1 sample ids"):
        accuracy_by_group(pd.DataFrame({"sample_id": [9], "clean": [True]}), atypical)


def test_planted_noisy_labels_are_found_atypical(digits_run):
    """The digits run flips 5 % of the labels: nearly all of them must come out atypical, and
    atypical test samples must exist and be classified worse than typical ones."""
    run, _ = digits_run
    scores, infl = memtool.load_scores(run), memtool.load_influence(run)
    train = scores[scores["split"] == "train"].set_index("sample_id")
    atyp = atypical_train(scores)
    flipped = train["label_corrupted"]
    assert atyp[flipped].mean() >= 0.9
    assert atyp[~flipped].mean() < 0.2
    test_atyp = atypical_test(scores, infl)
    acc = scores[scores["split"] == "test"].set_index("sample_id")["acc_out"]
    assert 0 < test_atyp.sum() < len(test_atyp)
    assert acc[test_atyp].mean() < acc[~test_atyp].mean()
