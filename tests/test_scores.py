"""Score formulas against hand-computed answers."""

import numpy as np
import pytest

from memtool.estimator import scores as S

# 4 trials x 3 training samples. Sample 2 is in every trial: never held out.
MEMBER = np.array([[1, 0, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]], dtype=bool)
CORRECT = np.array([[1, 1, 1], [1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=bool)


def test_memorization_hand_computed():
    r = S.memorization(MEMBER, CORRECT)
    # sample 0: in trials 0,1 -> correct 1,1; out trials 2,3 -> correct 0,1
    assert r["n_in"].tolist() == [2, 2, 4] and r["n_out"].tolist() == [2, 2, 0]
    assert r["acc_in"][0] == 1.0 and r["acc_out"][0] == 0.5 and r["mem"][0] == 0.5
    # sample 1: in trials 1,2 -> 0,1 ; out trials 0,3 -> 1,0
    assert r["mem"][1] == 0.0
    # Agresti-Caffo: p1 = (2+1)/(2+2) = 0.75, p2 = (1+1)/(2+2) = 0.5
    assert r["mem_se"][0] == pytest.approx(np.sqrt(0.75 * 0.25 / 4 + 0.5 * 0.5 / 4))


def test_never_held_out_is_nan_not_zero():
    r = S.memorization(MEMBER, CORRECT)
    assert r["n_in"][2] == 4 and r["n_out"][2] == 0
    assert r["acc_in"][2] == 0.75
    assert np.isnan(r["acc_out"][2]) and np.isnan(r["mem"][2]) and np.isnan(r["mem_se"][2])
    never_in = S.memorization(~MEMBER[:, 2:], CORRECT[:, 2:])
    assert never_in["n_in"][0] == 0 and np.isnan(never_in["mem"][0])


def test_margin_memorization_hand_computed():
    margin = np.array([[2.0], [4.0], [-1.0], [1.0]])
    member = np.array([[1], [1], [0], [0]], dtype=bool)
    r = S.margin_memorization(member, margin)
    assert r["margin_in"][0] == 3.0 and r["margin_out"][0] == 0.0 and r["margin_mem"][0] == 3.0
    # Welch: var_in = 2, var_out = 2 (ddof 1) -> se = sqrt(2/2 + 2/2)
    assert r["margin_mem_se"][0] == pytest.approx(np.sqrt(2.0))


def test_influence_at_equals_dense_formula(rng):
    member = rng.random((40, 30)) < 0.7
    test_correct = rng.random((40, 25)) < 0.6
    dense = np.empty((30, 25))
    for i in range(30):
        for j in range(25):
            dense[i, j] = test_correct[member[:, i], j].mean() - test_correct[~member[:, i], j].mean()
    i, j = np.meshgrid(np.arange(30), np.arange(25), indexing="ij")
    infl, se = S.influence_at(member, test_correct, i.ravel(), j.ravel(), chunk=7)
    np.testing.assert_allclose(infl.reshape(30, 25), dense, atol=1e-12)
    assert np.all(se > 0)


def test_influence_pairs_thresholds_and_topk():
    # 4 trials, 2 training samples, 2 test samples; sample 0 drives test 0 completely.
    member = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=bool)
    test_correct = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=bool)
    mem = np.array([0.5, 0.1])
    p = S.influence_pairs(member, test_correct, np.array([3, 3]), np.array([3, 5]), mem,
                          mem_threshold=0.25, infl_threshold=0.15, top_k=1)
    pairs = {(i, j): (inf, h, r) for i, j, inf, h, r in zip(p["train_id"], p["test_id"], p["infl"], p["high"], p["rank"])}
    assert pairs[(0, 0)] == (1.0, True, 0)  # infl = 1 - 0, same class, mem 0.5
    # test 1 is class 5: no high pair, but its top-1 is training sample 1 (infl 1.0)
    assert pairs[(1, 1)][0] == 1.0 and pairs[(1, 1)][1] == False and pairs[(1, 1)][2] == 0  # noqa: E712
    assert sum(p["high"]) == 1


def test_auroc_and_agreement_helpers():
    assert S.auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert S.auroc(np.array([0.1, np.nan, 0.8]), np.array([1, 0, 0])) == 0.0
    assert S.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    assert S.spearman(np.array([1.0, 2, 3, np.nan]), np.array([3.0, 2, 1, 0])) == pytest.approx(-1.0)


def test_thresholds_hold_for_values_equal_up_to_rounding():
    assert 3 / 5 - 9 / 20 < 0.15 and 7 / 10 - 11 / 20 < 0.15  # both are exactly 3/20
    assert S.at_least(np.array([3 / 5 - 9 / 20, 7 / 10 - 11 / 20, 0.1499, np.nan]), 0.15).tolist() == [
        True, True, False, False]


def test_influence_pairs_equal_a_dense_reference(rng):
    """Random trials: the high pairs are exactly the dense formula's, and each test sample's
    top-k are its k largest influences, ties broken by the lower train id."""
    t, n_train, n_test, k = 30, 40, 25, 5
    member = rng.random((t, n_train)) < 0.7
    test_correct = rng.random((t, n_test)) < 0.6
    train_label, test_label = rng.integers(0, 3, n_train), rng.integers(0, 3, n_test)
    mem = rng.random(n_train) * 0.5
    dense = np.array([[test_correct[member[:, i], j].mean() - test_correct[~member[:, i], j].mean()
                       for j in range(n_test)] for i in range(n_train)])
    p = S.influence_pairs(member, test_correct, train_label, test_label, mem, 0.25, 0.1, top_k=k, chunk=7)
    got_high = set(zip(p["train_id"][p["high"]].tolist(), p["test_id"][p["high"]].tolist()))
    want_high = {(i, j) for i in range(n_train) for j in range(n_test)
                 if mem[i] >= 0.25 and train_label[i] == test_label[j] and dense[i, j] >= 0.1 - 1e-9}
    assert got_high == want_high and len(want_high) > 0
    np.testing.assert_allclose(p["infl"], dense[p["train_id"], p["test_id"]], atol=1e-12)
    for j in range(n_test):
        want = sorted(range(n_train), key=lambda i: (-round(dense[i, j], 9), i))[:k]
        sel = (p["test_id"] == j) & (p["rank"] >= 0)
        got = p["train_id"][sel][np.argsort(p["rank"][sel])].tolist()
        assert got == want
    top0 = S.influence_pairs(member, test_correct, train_label, test_label, mem, 0.25, 0.1, top_k=0)
    assert set(zip(top0["train_id"].tolist(), top0["test_id"].tolist())) == want_high
