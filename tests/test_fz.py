"""Import of Feldman & Zhang's released files (synthetic files with the published keys)."""

import numpy as np

import memtool
from memtool.cli import main


def _fake_release(tmp_path):
    tr_labels, tt_labels = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1])
    tr_mem = np.array([0.9, 0.1, 0.3, 0.0, 0.5])
    z = {"tr_mem": tr_mem, "tr_labels": tr_labels, "tt_labels": tt_labels}
    z["infl_matrix_class0"] = np.array([[0.4], [0.9]])  # train 0,1 x test 0
    z["tr_classidx_0"], z["tt_classidx_0"] = np.array([0, 1]), np.array([0])
    z["infl_matrix_class1"] = np.array([[0.2, 0.0], [0.5, 0.1], [0.16, 0.3]])  # train 2,3,4 x test 1,2
    z["tr_classidx_1"], z["tt_classidx_1"] = np.array([2, 3, 4]), np.array([1, 2])
    np.savez(tmp_path / "cifar100_infl_matrix.npz", **z)
    np.savez(tmp_path / "pairs.npz", tr_idx=np.array([0, 4]), tt_idx=np.array([0, 2]),
             infl=np.array([0.4, 0.3]), mem=np.array([0.9, 0.5]))


def test_import_matrix_file(tmp_path):
    _fake_release(tmp_path)
    assert main(["import-fz", str(tmp_path / "cifar100_infl_matrix.npz"), "--out", str(tmp_path / "run"),
                 "--top-k", "1"]) == 0
    scores = memtool.load_scores(tmp_path / "run")
    train = scores[scores.split == "train"]
    np.testing.assert_array_equal(train.mem, [0.9, 0.1, 0.3, 0.0, 0.5])
    infl = memtool.load_influence(tmp_path / "run")
    high = {(int(i), int(j)) for i, j in infl.loc[infl.high, ["train_id", "test_id"]].to_numpy()}
    # mem >= 0.25 and infl >= 0.15: (0,0) 0.4; (2,1) 0.2; (4,1) 0.16; (4,2) 0.3. Not (1,0): mem 0.1
    assert high == {(0, 0), (2, 1), (4, 1), (4, 2)}
    top = infl[infl["rank"] == 0].set_index("test_id")["train_id"].to_dict()
    assert top == {0: 1, 1: 3, 2: 4}
    assert scores.attrs["memtool"]["summary"]["n_high_pairs"] == 4


def test_import_pairs_file(tmp_path):
    _fake_release(tmp_path)
    memtool.fz.import_fz([tmp_path / "pairs.npz"], tmp_path / "p")
    infl = memtool.load_influence(tmp_path / "p")
    assert infl[["train_id", "test_id"]].to_numpy().tolist() == [[0, 0], [4, 2]]


def test_import_cscore_checks_labels_against_the_dataset(tmp_path, capsys):
    ds = memtool.load_dataset("digits")
    scores = np.linspace(0, 1, len(ds.y_train))
    np.savez(tmp_path / "digits-cscores.npz", labels=ds.y_train, scores=scores)
    assert main(["import-cscore", str(tmp_path / "digits-cscores.npz"), "--dataset", "digits",
                 "--out", str(tmp_path / "run")]) == 0
    table = memtool.load_scores(tmp_path / "run")
    np.testing.assert_allclose(table["cscore"], scores)
    assert table["mem"].isna().all() and (table["label"].to_numpy() == ds.y_train).all()
    assert table.attrs["memtool"]["dataset"]["fingerprint"] == ds.fingerprint
    # one label off: refused, naming the sample
    wrong = ds.y_train.copy()
    wrong[7] = (wrong[7] + 1) % 10
    np.savez(tmp_path / "bad.npz", labels=wrong, scores=scores)
    assert main(["import-cscore", str(tmp_path / "bad.npz"), "--dataset", "digits", "--out", str(tmp_path / "b")]) == 2
    assert "1 of 1437 labels differ from the digits training set (first at sample 7" in capsys.readouterr().err
    np.savez(tmp_path / "short.npz", labels=ds.y_train[:100], scores=scores[:100])
    assert main(["import-cscore", str(tmp_path / "short.npz"), "--dataset", "digits", "--out", str(tmp_path / "c")]) == 2
    assert "holds 100 labels" in capsys.readouterr().err
    np.savez(tmp_path / "other.npz", tr_mem=scores)
    assert main(["import-cscore", str(tmp_path / "other.npz"), "--dataset", "digits", "--out", str(tmp_path / "d")]) == 2
    assert "is not a C-score file" in capsys.readouterr().err
