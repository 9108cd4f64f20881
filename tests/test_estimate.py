"""The estimator end to end on the 8x8 digits: resumable, reproducible, self-describing."""

import json

import numpy as np
import pandas as pd
import pytest

import memtool
from memtool.cli import main
from memtool.estimator import run as run_mod
from memtool.estimator.store import load_trials
from memtool.rundir import RunMismatchError, read_table, write_table

from conftest import DIGITS_FAST


def test_planted_label_noise_is_recovered(digits_run):
    out, summary = digits_run
    assert summary["status"] == "complete" and summary["n_trials"] == 16
    assert summary["n_label_corrupted"] == round(0.05 * 1437)
    assert summary["noise_auroc_mem"] >= 0.9
    assert summary["noise_auroc_margin_mem"] >= 0.9
    scores = memtool.load_scores(out)
    train = scores[scores["split"] == "train"]
    # flipped labels are memorized: high mem, and correctly predicted only when trained on
    assert train.loc[train.label_corrupted, "mem"].median() > 0.5
    assert train.loc[~train.label_corrupted, "mem"].median() < 0.1


def test_score_table_columns_and_run_files(digits_run):
    out, summary = digits_run
    scores = memtool.load_scores(out)
    for col in ["sample_id", "split", "label", "n_in", "n_out", "acc_in", "acc_out", "mem", "mem_se",
                "margin_mem", "margin_mem_se", "label_corrupted", "original_label"]:
        assert col in scores.columns
    assert "cscore" not in scores.columns  # one subset ratio: acc_out, not the C-score (memtool/cscore.py)
    train, test = scores[scores.split == "train"], scores[scores.split == "test"]
    assert len(train) == 1437 and len(test) == 360
    assert (train.n_in + train.n_out == 16).all() and (test.n_out == 16).all() and test.mem.isna().all()
    # samples with no held-out trial have no estimate (NaN), never 0
    assert train.loc[train.n_out == 0, "mem"].isna().all()
    assert scores.attrs["memtool"]["config"]["recipe"]["hidden"] == 256
    meta = json.loads((out / "run.json").read_text())
    assert meta["dataset"]["fingerprint"] == memtool.load_dataset("digits", label_noise=0.05).fingerprint
    assert {"spearman_mem", "jaccard_high_mem", "jaccard_high_pairs"} <= set(meta["summary"]["split_half"])
    infl = memtool.load_influence(out)
    high = infl[infl.high]
    assert (high.train_label == high.test_label).all() and (high.mem >= 0.25).all()
    assert infl.high.equals(infl.high_ash) and (high.infl_ash.notna()).all()  # the default estimator
    assert (infl[infl.high_probit].infl_probit >= 0.15).all() and (infl[infl.high_fz].infl >= 0.15).all()
    assert not infl.high_fz.equals(infl.high_ash) and not infl.high_probit.equals(infl.high_ash)
    assert infl.groupby("test_id")["rank"].max().eq(9).all()  # top-10 of every test sample
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    assert json.loads((out / "log.jsonl").read_text())["device"] == "cpu"


def test_load_trials_gives_masks_and_records(digits_run):
    out, _ = digits_run
    t = memtool.load_trials(out)
    assert t.member.shape == (16, 1437) and t.member.dtype == bool
    assert (t.member.sum(1) == round(0.7 * 1437)).all()
    assert t.test_margin.shape == (16, 360)
    np.testing.assert_array_equal(t.train_correct, t.train_margin > 0)


def test_parquet_round_trip_keeps_dtypes_and_metadata(tmp_path):
    df = pd.DataFrame({"sample_id": np.arange(3, dtype=np.int64), "mem": [0.1, np.nan, 0.5],
                       "label_corrupted": [True, False, True], "n_in": np.array([1, 2, 3], dtype=np.int64)})
    df["split"] = pd.Categorical(["train", "train", "test"], categories=["train", "test"])
    write_table(df, tmp_path / "t.parquet", {"config": {"lr": 0.1}})
    back = read_table(tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(back, df)
    assert back.attrs["memtool"] == {"config": {"lr": 0.1}}


def test_interrupted_run_resumes_to_identical_scores(tmp_path, monkeypatch):
    kw = dict(trials=12, ensemble_size=4, progress=False, label_noise=0.05, **{**DIGITS_FAST, "epochs": 5})
    full = memtool.estimate(tmp_path / "full", **kw)
    calls = {"n": 0}
    real = run_mod._run_batch

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(run_mod, "_run_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        memtool.estimate(tmp_path / "cut", **kw)
    (tmp_path / "cut" / "trials" / ".trials_000004-000007.npz.99.tmp").write_bytes(b"half a file")
    assert len(list((tmp_path / "cut" / "trials").glob("trials_*.npz"))) == 1
    monkeypatch.setattr(run_mod, "_run_batch", real)
    resumed = memtool.estimate(tmp_path / "cut", **kw)
    assert resumed["n_trials"] == 12
    pd.testing.assert_frame_equal(memtool.load_scores(tmp_path / "cut"), memtool.load_scores(tmp_path / "full"))
    assert resumed["split_half"] == full["split_half"]


def test_more_trials_and_other_ensemble_size_extend_a_run(tmp_path):
    kw = dict(progress=False, **{**DIGITS_FAST, "epochs": 3})
    memtool.estimate(tmp_path / "a", trials=4, ensemble_size=4, **kw)
    memtool.estimate(tmp_path / "a", trials=6, ensemble_size=2, **kw)  # adds trials 4, 5
    memtool.estimate(tmp_path / "b", trials=6, ensemble_size=3, **kw)
    ta, tb = load_trials(tmp_path / "a"), load_trials(tmp_path / "b")
    np.testing.assert_array_equal(ta.member, tb.member)
    np.testing.assert_allclose(ta.train_margin, tb.train_margin, atol=2e-2)  # float16 storage


def test_reopen_with_other_config_names_the_field(tmp_path):
    memtool.estimate(tmp_path / "r", trials=2, progress=False, **{**DIGITS_FAST, "epochs": 1})
    with pytest.raises(RunMismatchError, match=r"recipe\.lr: run has 0\.2, this call asks for 0\.05"):
        memtool.estimate(tmp_path / "r", trials=2, progress=False, **{**DIGITS_FAST, "epochs": 1, "lr": 0.05})
    with pytest.raises(RunMismatchError, match="limit"):
        memtool.estimate(tmp_path / "r", trials=2, progress=False, limit=1000, **{**DIGITS_FAST, "epochs": 1})


def test_shards_fill_one_run(tmp_path, capsys):
    kw = dict(trials=8, ensemble_size=2, progress=False, **{**DIGITS_FAST, "epochs": 1})
    first = memtool.estimate(tmp_path / "s", shard="0/2", **kw)
    assert first["status"] == "partial" and first["missing_trials"] == 4
    # tables made before the other shard finished say so (the run was asked for 8)
    assert main(["scores", str(tmp_path / "s")]) == 0
    assert "WARNING: 4 of the 8 trials the run was asked for are finished" in capsys.readouterr().out
    done = memtool.estimate(tmp_path / "s", shard="1/2", **kw)
    assert done["status"] == "complete" and done["n_trials"] == 8 and "unfinished" not in done


def test_joblib_workers_give_the_same_trials(tmp_path):
    kw = dict(trials=4, ensemble_size=2, progress=False, **{**DIGITS_FAST, "epochs": 2})
    memtool.estimate(tmp_path / "seq", **kw)
    memtool.estimate(tmp_path / "par", n_jobs=2, **kw)
    a, b = load_trials(tmp_path / "seq"), load_trials(tmp_path / "par")
    np.testing.assert_allclose(a.test_margin, b.test_margin, atol=2e-2)


def test_bad_settings_are_named_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="unknown EstimateConfig setting.*learning_rate"):
        memtool.estimate(tmp_path / "r", learning_rate=0.1)
    with pytest.raises(ValueError, match="schedule"):
        memtool.estimate(tmp_path / "r", dataset="digits", schedule="cosine-restarts", trials=2, progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="shard"):
        run_mod.parse_shard("3/2")


def test_cli_estimate_scores_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["estimate", "--dataset", "digits", "--label-noise", "0.05", "--trials", "4", "--epochs", "2",
               "--hidden", "32", "--batch-size", "64", "--lr", "0.1", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0 and "high-memorization samples" in text and "AUROC of mem" in text
    assert f"wrote {out / 'scores.parquet'}" in text
    assert main(["scores", str(out), "--mem-threshold", "0.5"]) == 0
    assert "mem >= 0.5" in capsys.readouterr().out
    rc = main(["estimate", "--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "x")])
    assert rc == 2 and "cifar-10-binary.tar.gz" in capsys.readouterr().err


def test_cli_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: digits\ntrials: 2\nepochs: 1\nhidden: 16\nbatch-size: 64\n")
    assert main(["estimate", "--config", str(cfg), "--lr", "0.3", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["config"]["recipe"]["lr"] == 0.3 and meta["config"]["recipe"]["batch_size"] == 64


def test_robust_estimation_records_robust_scores(tmp_path):
    """--method pgd-at: every trial is adversarially trained and scored clean and under PGD."""
    s = memtool.estimate(tmp_path / "rob", trials=4, progress=False, method="pgd-at", eps=0.1, pgd_steps=2,
                         **{**DIGITS_FAST, "epochs": 4, "hidden": 64})
    assert s["status"] == "complete" and 0.1 < s["rob_test_acc"] < s["test_acc"]
    scores = memtool.load_scores(tmp_path / "rob")
    for col in ["rob_acc_in", "rob_acc_out", "rob_mem", "rob_mem_se", "rob_margin_mem"]:
        assert col in scores.columns
    train = scores[scores.split == "train"]
    np.testing.assert_allclose(train.rob_mem, train.rob_acc_in - train.rob_acc_out)
    assert (train.rob_acc_in <= train.acc_in + 1e-9).mean() > 0.95  # PGD rarely helps
    infl = memtool.load_influence(tmp_path / "rob")
    assert {"rob_infl", "rob_infl_se", "rob_high", "rob_rank"} <= set(infl.columns)
    assert infl[["infl", "rob_infl"]].notna().all().all()
    t = memtool.load_trials(tmp_path / "rob")
    assert t.test_rob_margin.shape == t.test_margin.shape


def test_batchnorm_models_train_one_at_a_time(tmp_path):
    """A BatchNorm model (a WideResNet-10-1) trains one model at a time, robust records too."""
    s = memtool.estimate(tmp_path / "bn", trials=2, progress=False, dataset="digits", model="wrn-10-1",
                         epochs=4, batch_size=32, lr=0.05, robust=True, robust_eps=0.05)
    assert s["status"] == "complete" and s["test_acc"] > 0.5
    assert "rob_test_acc" in s


def test_bf16_scores_agree_with_fp32_within_standard_error(tmp_path):
    """The GPU path's mixed precision, run on the CPU: same mem within the estimator's error."""
    kw = dict(trials=8, progress=False, label_noise=0.05, **{**DIGITS_FAST, "epochs": 10, "hidden": 64})
    memtool.estimate(tmp_path / "fp32", **kw)
    memtool.estimate(tmp_path / "bf16", precision="bf16", **kw)
    a, b = (memtool.load_scores(tmp_path / r).query("split == 'train'") for r in ("fp32", "bf16"))
    ok = a.mem.notna() & b.mem.notna()
    diff = (a.mem - b.mem)[ok].abs()
    tol = 2 * np.sqrt(a.mem_se**2 + b.mem_se**2)[ok]
    assert (diff <= tol).mean() > 0.95
    assert abs(a.mem[ok].mean() - b.mem[ok].mean()) < 0.02


def test_dask_scheduler_runs_trial_batches(tmp_path):
    distributed = pytest.importorskip("distributed")
    kw = dict(trials=4, ensemble_size=2, progress=False, **{**DIGITS_FAST, "epochs": 2})
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as c:
        s = memtool.estimate(tmp_path / "dask", scheduler=c.scheduler_address, **kw)
    memtool.estimate(tmp_path / "local", **kw)
    assert s["status"] == "complete" and s["n_trials"] == 4
    a, b = load_trials(tmp_path / "dask"), load_trials(tmp_path / "local")
    np.testing.assert_allclose(a.test_margin, b.test_margin, atol=2e-2)


def test_a_damaged_trial_file_is_set_aside_and_its_trials_trained_again(tmp_path, capsys):
    kw = dict(trials=8, ensemble_size=4, progress=False, **{**DIGITS_FAST, "epochs": 2})
    memtool.estimate(tmp_path / "full", **kw)
    memtool.estimate(tmp_path / "r", **kw)
    bad = tmp_path / "r" / "trials" / "trials_000004-000007.npz"
    bad.write_bytes(bad.read_bytes()[:2000])  # truncated, as by a full disk or a killed copy
    with pytest.warns(UserWarning, match=r"trials_000004-000007.npz is truncated or corrupted: moved to .*damaged"):
        assert main(["scores", str(tmp_path / "r")]) == 2  # the 8-trial tables are not replaced by 4-trial ones
    err = capsys.readouterr().err
    assert "holds 4 whole trials, but its tables were made from 8" in err and "trials_000004-000007.npz" in err
    assert "--allow-fewer" in err and "Traceback" not in err
    assert memtool.load_scores(tmp_path / "r").attrs["memtool"]["summary"]["n_trials"] == 8  # untouched
    assert main(["scores", str(tmp_path / "r"), "--allow-fewer"]) == 0
    assert "trials: 4" in capsys.readouterr().out
    assert list((tmp_path / "r" / "trials" / "damaged").iterdir())
    resumed = memtool.estimate(tmp_path / "r", **kw)  # trains trials 4-7 again
    assert resumed["n_trials"] == 8
    pd.testing.assert_frame_equal(memtool.load_scores(tmp_path / "r"), memtool.load_scores(tmp_path / "full"))


def test_the_command_that_retrains_missing_trials_covers_every_shard_and_the_tables_trials(tmp_path):
    from memtool.estimator.tables import rerun_command

    argv = ["/x/.venv/bin/memtool", "estimate", "--dataset", "digits", "--trials", "8", "--shard", "1/2",
            "--model-kwargs", '{"w": 8}', "--out", "runs/b", "--quiet", "--trials=16", "--until-se", "0.05"]
    assert rerun_command(argv, tmp_path / "b", 40) == ("memtool estimate --dataset digits --model-kwargs '{\"w\": 8}' "
                                                       f"--quiet --trials 40 --out {(tmp_path / 'b').resolve()}")


def test_until_se_stops_on_precision_or_on_trials(tmp_path, capsys):
    from memtool.estimator.run import se_p95

    kw = dict(ensemble_size=8, **{**DIGITS_FAST, "epochs": 5})
    loose = memtool.estimate(tmp_path / "loose", trials=64, until_se=0.5, progress=False, **kw)
    assert loose["until_se"]["stopped_by"] == "precision" and loose["n_trials"] == 16  # the first round suffices
    assert se_p95(tmp_path / "loose", 16) <= 0.5
    assert main(["estimate", "--out", str(tmp_path / "tight"), "--trials=40", "--until-se=0.01", "--quiet",
                 "--ensemble-size=8", *[f"--{k.replace('_', '-')}={v}" for k, v in {**DIGITS_FAST, "epochs": 5}.items()]
                 ]) == 0
    assert "reached --trials 40 before the precision" in capsys.readouterr().out
    s = json.loads((tmp_path / "tight" / "run.json").read_text())["summary"]
    assert s["n_trials"] == 40 and se_p95(tmp_path / "tight", 40) > 0.01
    # in between: more trials than the first round, stopped as soon as the target holds
    mid = memtool.estimate(tmp_path / "mid", trials=400, until_se=0.2, progress=False, **kw)
    t = mid["until_se"]["trials"]
    assert mid["until_se"]["stopped_by"] == "precision" and 16 < t < 400 and se_p95(tmp_path / "mid", t) <= 0.2
    with pytest.raises(ValueError, match="until_se"):
        memtool.estimate(tmp_path / "x", trials=8, until_se=0.1, shard="0/2", **kw)


def test_until_pairs_stops_where_the_split_half_agreement_is_met(tmp_path, capsys):
    from memtool.estimator.run import pairs_half_jaccard
    from memtool.estimator.tables import Thresholds

    kw = dict(ensemble_size=8, **{**DIGITS_FAST, "epochs": 5})
    thr = Thresholds(pairs="fz")  # measured, F&Z's rule: 0.064 / 0.077 / 0.110 / 0.113 at 16 / 32 / 64 / 128 trials
    r = memtool.estimate(tmp_path / "p", trials=128, until_pairs=0.1, progress=False, pairs="fz", **kw)
    t, got = r["until_pairs"]["trials"], r["until_pairs"]["pairs_jaccard"]
    assert r["until_pairs"]["stopped_by"] == "agreement" and got >= 0.1 and r["n_trials"] == t
    assert got == pytest.approx(pairs_half_jaccard(tmp_path / "p", t, thr))
    assert 16 < t < 128 and pairs_half_jaccard(tmp_path / "p", t // 2, thr) < 0.1  # the round before did not reach it
    assert r["split_half"]["jaccard_high_pairs"] == pytest.approx(got)  # the summary's own split half
    probit = pairs_half_jaccard(tmp_path / "p", t, Thresholds(pairs="probit"))  # the rule decides (measured: 0.082)
    assert probit != got and 0 < probit < 1
    assert main(["estimate", "--out", str(tmp_path / "q"), "--trials=32", "--until-pairs=0.99", "--quiet", "--pairs=fz",
                 "--ensemble-size=8", *[f"--{k.replace('_', '-')}={v}" for k, v in {**DIGITS_FAST, "epochs": 5}.items()]
                 ]) == 0
    assert "reached --trials 32 before the agreement" in capsys.readouterr().out
    with pytest.raises(ValueError, match="one stopping rule"):
        memtool.estimate(tmp_path / "x", trials=8, until_se=0.1, until_pairs=0.5, **kw)


def test_a_trial_file_altered_but_still_a_valid_npz_is_caught(tmp_path):
    """The arrays' checksum, not only the zip CRCs: a file rewritten with changed margins is
    set aside and retrained."""
    kw = dict(trials=4, ensemble_size=4, progress=False, **{**DIGITS_FAST, "epochs": 2})
    memtool.estimate(tmp_path / "r", **kw)
    path = tmp_path / "r" / "trials" / "trials_000000-000003.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["test_margin"] = -arrays["test_margin"]  # flipped, and the file still a valid npz
    np.savez(path, **arrays)
    from memtool.estimator.store import finished_trials

    with pytest.warns(UserWarning, match="truncated or corrupted"):
        assert finished_trials(tmp_path / "r") == set()
