"""Evaluation: per-sample table and summary, resume after an interruption, no mixing of
settings; AutoAttack is at least as strong as PGD-20."""

import json

import numpy as np
import pandas as pd
import pytest

import memtool
from memtool.attacks import PGD
from memtool.cli import main
from memtool.rundir import RunMismatchError, read_table


def test_table_and_summary(digits_at, tmp_path):
    ckpt, _ = digits_at
    s = memtool.evaluate(ckpt, attacks="clean,fgsm,pgd10,cw10,pgd10-l2", eps=0.1, out=tmp_path, n_samples=300,
                         batch_size=128, progress=False)
    df = read_table(tmp_path / "per_sample.parquet")
    assert list(df.columns) == ["sample_id", "label", "clean", "fgsm", "pgd10", "cw10", "pgd10-l2", "worst_case"]
    assert len(df) == 300 and (df.sample_id == np.arange(300)).all()
    assert (df.label == memtool.load_dataset("digits").y_test[:300]).all()
    attacks = ["clean", "fgsm", "pgd10", "cw10", "pgd10-l2"]
    assert (df.worst_case == df[attacks].all(axis=1)).all()
    for a in attacks[1:]:
        assert not (df[a] & ~df.clean).any()  # robust implies clean-correct
    for a in attacks:
        r = s["attacks"][a]
        assert r["n"] == 300 and r["n_correct"] == int(df[a].sum()) and r["accuracy"] == pytest.approx(df[a].mean())
    assert s["attacks"]["pgd10"]["eps"] == 0.1 and s["attacks"]["pgd10"]["steps"] == 10
    assert s["attacks"]["pgd10"]["step_size"] == pytest.approx(0.025) and s["attacks"]["pgd10-l2"]["norm"] == "l2"
    assert s["attacks"]["pgd10"]["accuracy"] < s["attacks"]["clean"]["accuracy"]
    assert s["worst_case"]["n_correct"] == int(df.worst_case.sum())
    assert df.attrs["memtool"]["attacks"]["cw10"]["loss"] == "margin"  # the summary travels in the parquet
    assert json.loads((tmp_path / "summary.json").read_text()) == df.attrs["memtool"]


def test_defaults_come_from_the_checkpoint(digits_at, tmp_path):
    ckpt, _ = digits_at
    s = memtool.evaluate(ckpt / "checkpoint.pt", out=tmp_path, n_samples=50, progress=False)
    assert s["dataset"] == "digits" and s["eps"] == 0.1 and list(s["attacks"]) == ["clean", "pgd20"]


def test_interrupted_evaluation_resumes_where_it_stopped(digits_at, tmp_path, monkeypatch):
    ckpt, _ = digits_at
    kw = dict(attacks="clean,pgd10", eps=0.1, n_samples=360, batch_size=50, progress=False)
    memtool.evaluate(ckpt, out=tmp_path / "straight", **kw)

    real = PGD.perturb
    seen = {"sizes": [], "stop_at": 3}

    def perturb_then_stop(self, model, x, y, gen=None):
        seen["sizes"].append(len(x))
        if len(seen["sizes"]) == seen["stop_at"]:
            raise KeyboardInterrupt
        return real(self, model, x, y, gen)

    monkeypatch.setattr(PGD, "perturb", perturb_then_stop)
    with pytest.raises(KeyboardInterrupt):
        memtool.evaluate(ckpt, out=tmp_path / "resumed", **kw)
    with np.load(tmp_path / "resumed" / "state" / "pgd10.npz") as z:
        assert z["done"].sum() >= 100  # two batches of clean-correct samples (plus the clean-wrong ones)
    seen.update(sizes=[], stop_at=None)
    memtool.evaluate(ckpt, out=tmp_path / "resumed", **kw)
    n_clean = int(pd.read_parquet(tmp_path / "straight" / "per_sample.parquet").clean.sum())
    assert sum(seen["sizes"]) == n_clean - 100  # only the samples not done before were attacked
    a = pd.read_parquet(tmp_path / "straight" / "per_sample.parquet")
    b = pd.read_parquet(tmp_path / "resumed" / "per_sample.parquet")
    pd.testing.assert_frame_equal(a, b)  # same batch seeds: the same flags as the uninterrupted run


def test_more_samples_extend_an_evaluation(digits_at, tmp_path, monkeypatch):
    ckpt, _ = digits_at
    memtool.evaluate(ckpt, attacks="clean,pgd5", eps=0.1, out=tmp_path, n_samples=100, progress=False)
    seen = []
    real = PGD.perturb
    monkeypatch.setattr(PGD, "perturb", lambda self, m, x, y, gen=None: seen.append(len(x)) or real(self, m, x, y, gen))
    s = memtool.evaluate(ckpt, attacks="clean,pgd5", eps=0.1, out=tmp_path, n_samples=200, progress=False)
    df = pd.read_parquet(tmp_path / "per_sample.parquet")
    assert len(df) == 200 and s["attacks"]["pgd5"]["n"] == 200
    assert sum(seen) == int(df.clean[100:].sum())  # only the new samples were attacked


def test_other_settings_are_refused(digits_at, tmp_path):
    ckpt, _ = digits_at
    memtool.evaluate(ckpt, attacks="clean,pgd5", eps=0.1, out=tmp_path, n_samples=20, progress=False)
    with pytest.raises(RunMismatchError, match="eps: run has 0.1, this call asks for 0.2"):
        memtool.evaluate(ckpt, attacks="clean,pgd5", eps=0.2, out=tmp_path, n_samples=20, progress=False)
    with pytest.raises(RunMismatchError, match="attacks"):
        memtool.evaluate(ckpt, attacks="clean,pgd5,cw5", eps=0.1, out=tmp_path, n_samples=20, progress=False)
    with pytest.raises(ValueError, match="n_samples must be in 1..360"):
        memtool.evaluate(ckpt, out=tmp_path / "x", n_samples=1000, progress=False)
    with pytest.raises(ValueError, match="unknown attack 'pgdx'"):
        memtool.evaluate(ckpt, attacks="clean,pgdx", out=tmp_path / "y", progress=False)
    # an L2 attack never takes the training eps (an L-inf radius) for its own
    with pytest.raises(ValueError, match="attacks pgd5-l2 are L2: give their radius with --eps"):
        memtool.evaluate(ckpt, attacks="clean,pgd5-l2", out=tmp_path / "z", progress=False)
    assert not (tmp_path / "z").exists()


def test_autoattack_is_no_weaker_than_pgd20_and_resumable(digits_at, tmp_path):
    """AutoAttack (pyautoattack) on 60 test digits of a small PGD-AT model, in one batch: its
    fixed budget (5000 Square queries, 9 x 100 APGD-T and FAB-T iterations) makes each batch
    cost about 10 s of Python overhead even on 8x8 images."""
    pytest.importorskip("pyautoattack")
    ckpt, _ = digits_at
    s = memtool.evaluate(ckpt, attacks="clean,pgd20,autoattack", eps=0.1, out=tmp_path, n_samples=60,
                         batch_size=60, progress=False)
    aa, pgd = s["attacks"]["autoattack"], s["attacks"]["pgd20"]
    assert aa["accuracy"] <= pgd["accuracy"] and aa["backend"] == "pyautoattack"
    assert s["worst_case"]["n_correct"] <= aa["n_correct"]
    with np.load(tmp_path / "state" / "autoattack.npz") as z:
        assert z["done"][:60].all() and not z["done"][60:].any()


@pytest.mark.slow
def test_autoattack_backends_on_mnist(mnist_at, tmp_path):
    """Both packages on 300 samples: both at most PGD-20, and within 2 points of each other."""
    pytest.importorskip("torchattacks")
    ckpt, _ = mnist_at
    acc = {}
    for backend in ("pyautoattack", "torchattacks"):
        s = memtool.evaluate(ckpt, attacks="clean,pgd20,autoattack", eps=0.1, out=tmp_path / backend,
                             n_samples=300, progress=False, attack_options={"autoattack": {"backend": backend}})
        acc[backend] = s["attacks"]["autoattack"]["accuracy"]
        assert acc[backend] <= s["attacks"]["pgd20"]["accuracy"]
    assert abs(acc["pyautoattack"] - acc["torchattacks"]) <= 0.02


def test_cli_evaluate(digits_at, tmp_path, capsys):
    ckpt, _ = digits_at
    args = ["evaluate", str(ckpt), "--attacks", "clean,pgd5,cw5", "--eps", "0.05", "--n-samples", "80",
            "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "pgd5" in out and "/80" in out and "worst case" in out and "per_sample.parquet" in out
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["eps"] == 0.05 and s["n_samples"] == 80 and set(s["attacks"]) == {"clean", "pgd5", "cw5"}
    assert main(args[:5] + ["0.1"] + args[6:]) == 2
    assert "eps: run has 0.05" in capsys.readouterr().err


def test_an_attack_leaving_the_ball_is_not_recorded(digits_at, tmp_path, monkeypatch):
    ckpt, _ = digits_at
    monkeypatch.setattr(PGD, "perturb", lambda self, m, x, y, gen=None: (x + 2 * self.eps).clamp(0, 1))
    with pytest.raises(RuntimeError, match="left the eps-ball"):
        memtool.evaluate(ckpt, attacks="clean,pgd5", eps=0.1, out=tmp_path, n_samples=50, progress=False)


def test_robustbench_record_fields(digits_at, tmp_path):
    out, _ = digits_at
    pytest.importorskip("pyautoattack")
    memtool.evaluate(out, tmp_path / "ev", attacks="clean,pgd10,autoattack", n_samples=20, progress=False)
    rec = json.loads((tmp_path / "ev" / "robustbench.json").read_text())
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert rec["dataset"] == "digits" and rec["threat_model"] == "Linf" and rec["eps"] == 0.1
    assert rec["n_test_samples"] == 20 and rec["attack_seed"] == 0 and "seed" not in rec and rec["train_seed"] == 0
    assert rec["clean_acc"] == summary["attacks"]["clean"]["accuracy"]
    assert rec["autoattack_acc"] == summary["attacks"]["autoattack"]["accuracy"] <= rec["clean_acc"]
    assert rec["attack_version"].startswith("AutoAttack standard (apgd-ce, apgd-t, fab-t, square; pyautoattack 0.2")
    assert rec["checkpoint_rule"].startswith("last epoch (4)") and rec["method"] == "pgd-at"
    assert set(rec["other_attacks"]) == {"pgd10"}
    memtool.evaluate(out, tmp_path / "pgd", attacks="clean,pgd10", n_samples=20, progress=False)
    assert json.loads((tmp_path / "pgd" / "robustbench.json").read_text())["autoattack_acc"] is None


def test_clean_accuracy_needs_no_eps_and_the_attacks_say_they_do(tmp_path, capsys):
    """A standard model on a user dataset (no standard eps): --attacks clean runs without
    --eps and records none; an attack without an eps is refused, naming what it needs."""
    rng = np.random.default_rng(0)
    data = tmp_path / "toy.npz"
    np.savez(data, x_train=rng.random((64, 8, 8)), y_train=rng.integers(0, 3, 64), x_test=rng.random((20, 8, 8)),
             y_test=rng.integers(0, 3, 20))
    memtool.train(out=tmp_path / "st", dataset=str(data), hidden=8, epochs=1, eval_samples=0, progress=False)
    assert main(["evaluate", str(tmp_path / "st"), "--attacks", "clean", "--out", str(tmp_path / "ev"), "--quiet"]) == 0
    assert "clean only, no eps" in capsys.readouterr().out
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["eps"] is None and list(s["attacks"]) == ["clean"] and s["attacks"]["clean"]["n"] == 20
    assert main(["evaluate", str(tmp_path / "st"), "--attacks", "clean,pgd5", "--out", str(tmp_path / "ev2"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "attacks pgd5 need an eps and the model was trained without one" in err and "--eps" in err


def test_chosen_sample_ids_are_the_first_n_evaluations_rows(digits_at, tmp_path):
    """An evaluation on chosen test samples (as the comparison's: the first typical ones and
    every atypical one) records exactly those ids, with the flags a first-N evaluation gives
    them (clean is deterministic); the record says which samples; asking for both is an error."""
    ckpt, _ = digits_at
    full = memtool.evaluate(ckpt, tmp_path / "all", attacks="clean", n_samples=60, progress=False)
    assert full["test_samples"] == "the first 60 of the test set"
    first = pd.read_parquet(tmp_path / "all" / "per_sample.parquet").set_index("sample_id")
    ids = [41, 3, 17, 3, 59]
    s = memtool.evaluate(ckpt, tmp_path / "some", attacks="clean", sample_ids=ids, progress=False)
    some = pd.read_parquet(tmp_path / "some" / "per_sample.parquet")
    assert some["sample_id"].tolist() == [3, 17, 41, 59] and s["n_samples"] == 4
    assert some["clean"].tolist() == first.loc[[3, 17, 41, 59], "clean"].tolist()
    assert some["label"].tolist() == first.loc[[3, 17, 41, 59], "label"].tolist()
    rec = json.loads((tmp_path / "some" / "robustbench.json").read_text())
    assert rec["test_samples"] == "4 chosen test samples (ids 3 to 59)" and rec["n_test_samples"] == 4
    with pytest.raises(ValueError, match="n_samples .* or sample_ids .*, not both"):
        memtool.evaluate(ckpt, tmp_path / "x", attacks="clean", n_samples=5, sample_ids=ids, progress=False)
    with pytest.raises(ValueError, match=r"sample_ids must be test sample ids in 0\.\.\d+"):
        memtool.evaluate(ckpt, tmp_path / "y", attacks="clean", sample_ids=[5, 10**6], progress=False)
