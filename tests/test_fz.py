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
