"""memtool compare: agreement numbers on synthetic tables with known answers; tables of
other data are refused."""

import json

import numpy as np
import pandas as pd
import pytest

from memtool.cli import main
from memtool.compare import compare, pair_agreement
from memtool.rundir import write_table


def _table(path, mem, labels=None, fingerprint="abc", flipped=None, pairs=None):
    n = len(mem)
    labels = np.zeros(n, int) if labels is None else labels
    df = pd.DataFrame({"sample_id": np.arange(n), "split": "train", "label": labels, "mem": mem,
                       "label_corrupted": np.zeros(n, bool) if flipped is None else flipped})
    test = pd.DataFrame({"sample_id": [0], "split": "test", "label": [0], "mem": [np.nan], "label_corrupted": [False]})
    path.mkdir(parents=True, exist_ok=True)
    meta = {"dataset": {"fingerprint": fingerprint}}
    write_table(pd.concat([df, test], ignore_index=True), path / "scores.parquet", meta)
    if pairs is not None:
        write_table(pd.DataFrame({"train_id": [p[0] for p in pairs], "test_id": [p[1] for p in pairs],
                                  "high": True}), path / "influence.parquet", meta)
    return path


def test_known_spearman_auroc_and_precision(tmp_path):
    """A: 100 samples, the 10 with mem 0.5 are its high set. B ranks 8 of them on top, then
    2 typical samples, then the other 2 high ones: precision at 10 = 0.8; AUROC: each of the 2
    late high samples is beaten by 2 typical ones of 90 -> 1 - 4 / 900."""
    mem_a = np.r_[np.full(10, 0.5), np.linspace(0, 0.2, 90)]
    score_b = np.r_[np.arange(100, 92, -1.0), [50.0, 49.0], np.arange(90.0) - 100]
    score_b[[10, 11]] = [91.5, 91.0]  # two typical samples between the 8 and the 2
    flipped = np.zeros(100, bool)
    flipped[:5] = True
    a, b = _table(tmp_path / "a", mem_a, flipped=flipped), _table(tmp_path / "b", score_b)
    r = compare(a, b)
    assert r["k"] == 10 and r["precision_at_k"] == pytest.approx(0.8)
    assert r["auroc_high"] == pytest.approx(1 - 4 / 900)
    assert r["noise_auroc_a"] == pytest.approx(0.5 + 0.5 * (5 * 90) / (5 * 95))  # ties with the other 5 high
    r = compare(a, _table(tmp_path / "c", -mem_a))
    assert r["spearman"] == pytest.approx(-1.0) and r["pearson"] == pytest.approx(-1.0)
    assert compare(a, _table(tmp_path / "d", np.exp(mem_a)))["spearman"] == pytest.approx(1.0)


def test_pair_agreement_by_hand():
    a = {(1, 10), (2, 11), (3, 12), (4, 12)}
    b = {(1, 10), (2, 11), (5, 13)}
    r = pair_agreement(a, b)
    assert r["pairs_precision"] == pytest.approx(2 / 3) and r["pairs_recall"] == pytest.approx(2 / 4)
    assert r["pairs_jaccard"] == pytest.approx(2 / 5) and r["atypical_test_jaccard"] == pytest.approx(2 / 4)


def test_other_data_is_refused_naming_the_mismatch(tmp_path):
    a = _table(tmp_path / "a", np.zeros(5))
    with pytest.raises(ValueError, match="fingerprints abc and xyz"):
        compare(a, _table(tmp_path / "b", np.zeros(5), fingerprint="xyz"))
    with pytest.raises(ValueError, match="5 training samples, .* has 6"):
        compare(a, _table(tmp_path / "c", np.zeros(6), fingerprint=None))
    with pytest.raises(ValueError, match="1 training labels differ \\(first at sample 3\\)"):
        compare(a, _table(tmp_path / "d", np.zeros(5), labels=np.array([0, 0, 0, 1, 0]), fingerprint=None))
    with pytest.raises(ValueError, match="no column 'csl'"):
        compare(a, a, column_b="csl")


def test_compare_command_prints_json_with_pairs(tmp_path, capsys):
    a = _table(tmp_path / "a", np.r_[0.5, 0.5, np.zeros(8)], pairs=[(0, 0), (1, 0)])
    b = _table(tmp_path / "b", np.r_[0.4, 0.0, 0.3, np.zeros(7)], pairs=[(0, 0)])
    assert main(["compare", str(a), str(b), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["precision_at_k"] == 0.5 and r["pairs_precision"] == 1.0 and r["pairs_recall"] == 0.5
    assert main(["compare", str(a), str(tmp_path / "nope")]) == 2
