import numpy as np
import pandas as pd
import pytest

from memtool.analysis import atypical_test, atypical_train


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


def test_atypical_test_of_an_ash_table_follows_its_call_and_wants_its_threshold():
    scores, infl = _tables()
    infl["high_ash"] = [False, True, True, False, True]  # its calls, whatever the F&Z column says
    infl.attrs["memtool"]["thresholds"]["pairs"] = "ash"
    # test 1: called, same class, mem 0.25. test 2: other class. test 3: called only with a typical train sample
    assert atypical_test(scores, infl).tolist() == [False, True, False, False]
    assert atypical_test(scores, infl, mem_threshold=0.3).tolist() == [False, False, False, False]
    with pytest.raises(ValueError, match="memtool scores RUN --infl-threshold 0.2"):
        atypical_test(scores, infl, infl_threshold=0.2)
