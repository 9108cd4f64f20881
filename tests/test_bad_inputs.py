"""Bad inputs get one error line that names the parameter, the value and what is allowed:
no traceback, nothing written."""

import numpy as np
import pandas as pd
import pytest

from memtool.cli import main
from memtool.recipe import Recipe

EST = ["estimate", "--dataset", "digits", "--epochs", "1", "--quiet"]
TRAIN = ["train", "--dataset", "digits", "--epochs", "1", "--quiet"]


@pytest.mark.parametrize("args, message", [
    (EST + ["--method", "pgd-at", "--eps", "-1"], "eps must be >= 0 (or None), got -1.0"),
    (EST + ["--method", "pgd-at", "--pgd-steps", "0"], "pgd_steps must be an integer >= 1, got 0"),
    (EST + ["--trials", "1"], "trials must be an integer >= 2, got 1"),
    (EST + ["--ratio", "1.5"], "ratio must be in (0, 1), got 1.5"),
    (EST + ["--ratio", "0"], "ratio must be in (0, 1), got 0.0"),
    (EST + ["--lr", "0"], "lr must be > 0, got 0.0"),
    (EST + ["--method", "trades", "--eps-warmup", "2"], "eps_warmup must be in [0, 1], got 2.0"),
    (EST + ["--model", "resnet50"], "model 'resnet50' is not registered in this process: choose one of cnn, mlp, preact-resnet18, wrn-D-W"),
    (EST + ["--beta", "3"], "beta does not apply to method 'standard' (it applies to trades, mart)"),
    (EST + ["--robust", "--robust-eps", "-0.1"], "robust_eps must be >= 0 (or None), got -0.1"),
    (EST + ["--shard", "2/2"], "shard index must be in 0..N-1, got 2/2"),
    (TRAIN + ["--method", "mart", "--beta", "-1"], "beta must be >= 0, got -1.0"),
    (TRAIN + ["--label-noise", "1"], "label_noise must be in [0, 1), got 1.0"),
    (TRAIN + ["--eval-samples", "-1"], "eval_samples must be an integer >= 0, got -1"),
    (TRAIN + ["--select", "best-pgd"], "select best-pgd needs --val-samples N"),
])
def test_bad_flags_are_named(tmp_path, capsys, args, message):
    assert main(args + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_argparse_refuses_wrong_types_and_unknown_methods(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(EST + ["--epochs", "2.5", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "invalid int value: '2.5'" in capsys.readouterr().err
    # methods are open (register_method, entry points): an unknown one is named with the known ones
    assert main(EST + ["--method", "fgsm-at", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "method must be one of standard, pgd-at, trades, mart, gairat, bat, got 'fgsm-at'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line, message", [
    ("epochs: 2.5", "epochs must be an integer >= 1, got 2.5"),
    ("method: fgsm-at", "method must be one of standard, pgd-at, trades, mart, gairat, bat, got 'fgsm-at'"),
    ("trials: 1", "trials must be an integer >= 2, got 1"),
    ("learning_rate: 0.1", "unknown EstimateConfig setting(s) ['learning_rate']"),
    ("method: bat\nlambda: -1", "lam must be >= 0"),  # a key named as its flag (--lambda) is taken
])
def test_bad_config_file_settings_are_named(tmp_path, capsys, line, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: digits\n{line}\n")
    assert main(["estimate", "--config", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_weights_file_for_other_data_is_named(tmp_path, capsys):
    w = tmp_path / "w.parquet"
    pd.DataFrame({"sample_id": np.arange(60000), "weight": 1.0}).to_parquet(w)  # MNIST-sized, not digits
    assert main(TRAIN + ["--weights", str(w), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "must list every training sample id 0..1436 once" in err and "it has 60000 rows" in err


def test_sample_files_in_another_format_name_the_file_and_the_formats(tmp_path, capsys):
    """A CSV given as weights (or as a .parquet id file) is one line naming the file and the
    formats taken, not pyarrow's "Parquet magic bytes not found in footer"."""
    csv = tmp_path / "w.csv"
    pd.DataFrame({"sample_id": np.arange(1437), "weight": 1.0}).to_csv(csv, index=False)
    fake = tmp_path / "ids.parquet"
    fake.write_text("sample_id\n1\n2\n")
    for flag, path, formats in (("--weights", csv, "parquet with sample_id and weight columns"),
                                ("--exclude-ids", fake, "text with one sample id per line, or parquet with a "
                                                        "sample_id column")):
        assert main(TRAIN + [flag, str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert f"{path} is not a parquet file" in err and formats in err, err
        assert "magic bytes" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_api_validation_names_the_parameter():
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 2.5"):
        Recipe(epochs=2.5)
    with pytest.raises(ValueError, match="schedule must be one of constant, linear, onecycle, multistep, cosine, got 'step'"):
        Recipe(schedule="step")
    with pytest.raises(ValueError, match="momentum must be in"):
        Recipe(momentum=1.5)


def test_bad_run_directories_and_files_are_named(tmp_path, capsys):
    assert main(["scores", str(tmp_path)]) == 2
    assert "is not a memtool run directory (no run.json)" in capsys.readouterr().err
    (tmp_path / "run.json").write_text("{ edited by hand")
    assert main(["scores", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "run.json is not valid JSON" in err and "Traceback" not in err
    (tmp_path / "run.json").write_text('{"config": {}}')
    assert main(["scores", str(tmp_path)]) == 2
    assert "lacks ['dataset']" in capsys.readouterr().err
    pickled = tmp_path / "not-fz.npy"  # holds a pickled object: refused, never unpickled
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["import-fz", str(pickled), "--out", str(tmp_path / "fz")]) == 2
    err = capsys.readouterr().err
    assert "is not one of Feldman & Zhang's .npz files" in err and "Traceback" not in err


@pytest.mark.parametrize("code, message", [(28, "the disk is full"), (30, "the output directory is not writable")])
def test_full_disk_or_read_only_output_is_named_and_nothing_half_written(tmp_path, capsys, monkeypatch, code,
                                                                        message):
    import os

    from memtool import rundir

    calls = {"n": 0}
    real = os.fsync

    def failing(fd):  # the third file written fails: ENOSPC (28) or EROFS (30)
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(rundir.os, "fsync", failing)
    out = tmp_path / "out"
    assert main(TRAIN + ["--epochs", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "nothing was half-written" in err and str(out) in err and "Traceback" not in err
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no temporary file left
    monkeypatch.setattr(rundir.os, "fsync", real)
    assert main(TRAIN + ["--epochs", "3", "--out", str(out)]) == 0  # the same command then finishes the run


class Crafted:
    """An object a crafted checkpoint pickles (weights_only=True refuses to rebuild it)."""


def test_reliability_probe_is_answered_in_one_line_before_any_training(tmp_path, capsys, digits_run):
    import json as _json
    import shutil

    import torch

    from memtool.cli import main

    def fails(args, *messages):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and all(m in err for m in messages), err

    (tmp_path / "file").write_text("x")
    fails(["proxies", "--dataset", "digits", "--out", str(tmp_path / "file"), "--quiet"], "is a file")
    fails(["proxies", "--dataset", "digits", "--calibrate", str(tmp_path / "nowhere"), "--out", str(tmp_path / "px"),
           "--quiet"], "no run directory there")
    assert not (tmp_path / "px" / "models").exists()  # refused before any proxy model trained
    cfg = tmp_path / "study.yaml"
    cfg.write_text("name: s\nestimate: {dataset: digits, trials: 2}\nvalidate: {sedes: 2}\n")
    fails(["figures", "--config", str(cfg), "--out", str(tmp_path / "f")], str(cfg), "section validate",
          "unknown setting(s) ['sedes']")
    fails(["estimate", "--config", str(_write(tmp_path / "e.yaml", "dataset: digits\ntrails: 3\n")), "--out",
           str(tmp_path / "e")], "'trails'", "'trials'", "'n_jobs'")
    torch.save({"settings": Crafted()}, tmp_path / "crafted.pt")
    fails(["evaluate", str(tmp_path / "crafted.pt"), "--out", str(tmp_path / "ev")], "never unpickles")
    run, _ = digits_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "scores.parquet").unlink()
    fails(["compare", str(run), str(copy)], f"memtool scores {copy}")
    assert main(["compare", str(run), str(run), "--json"]) == 0
    _json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))
    meta = _json.loads((copy / "run.json").read_text())
    meta["config"]["dataset"], meta["dataset"]["name"] = "fashion-mnist", "fashion-mnist"
    (copy / "run.json").write_text(_json.dumps(meta))
    fails(["scores", str(copy)], "no longer describes its trials")
    assert not (copy / "scores.parquet").exists()


def _write(path, text):
    path.write_text(text)
    return path


def test_scores_on_a_read_only_run_does_not_suggest_out():
    from memtool.rundir import storage_error

    e = PermissionError(13, "Permission denied", "RUN/scores.parquet")
    assert "--out" not in storage_error(e, out_flag=False) and "--out" in storage_error(e)


def test_a_misspelled_flag_gets_the_subcommands_usage_and_the_flag_meant(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(EST + ["--trails", "4", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: memtool estimate" in err
    assert "unrecognized arguments: --trails 4 (did you mean --trials?)" in err
    assert not (tmp_path / "out").exists()


def test_api_settings_misspelled_or_from_the_command_line_are_named(tmp_path):
    import memtool

    with pytest.raises(ValueError, match=r"\['epoch'\] \(epoch: did you mean epochs\?\)"):
        memtool.estimate(tmp_path / "out", dataset="digits", epoch=3)
    with pytest.raises(ValueError, match=r"quiet=True is progress=False"):
        memtool.estimate(tmp_path / "out", dataset="digits", quiet=True)
    assert not (tmp_path / "out").exists()


def test_an_output_path_that_is_a_file_and_a_missing_gpu_are_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("mine")
    assert main(EST + ["--trials", "2", "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "a file stands where the output directory should be; choose another --out" in err
    assert "Traceback" not in err and (tmp_path / "taken").read_text() == "mine"
    assert main(EST + ["--device", "cudax", "--out", str(tmp_path / "gpu")]) == 2
    assert "device 'cudax' is not a device torch knows" in capsys.readouterr().err
    if not __import__("torch").cuda.is_available():
        for args in (EST + ["--device", "cuda"], TRAIN + ["--device", "cuda:0"]):
            assert main(args + ["--out", str(tmp_path / "gpu")]) == 2
            assert "CUDA GPU(s) here" in capsys.readouterr().err and not (tmp_path / "gpu").exists()
        from memtool.estimator.run import Execution
        Execution(device="cuda", scheduler="tcp://scheduler:8786", ensemble_size=1)  # a Dask client: its workers' GPUs
    assert not (tmp_path / "gpu").exists()


def test_bat_scores_that_are_not_a_score_table_are_named(tmp_path, capsys):
    infl = tmp_path / "influence.parquet"
    pd.DataFrame({"train_id": [0], "test_id": [1], "infl": [0.5]}).to_parquet(infl)
    assert main(TRAIN + ["--method", "bat", "--scores", str(infl), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{infl} is not a score table" in err and "give the run directory or its scores.parquet" in err
    assert "Traceback" not in err


def test_scores_of_a_run_kept_without_its_trials_says_the_tables_are_final(tmp_path, capsys):
    import shutil
    from pathlib import Path

    ref = Path(__file__).resolve().parents[1] / "references" / "mnist"
    for name in ("run.json", "scores.parquet", "influence.parquet", "labels.npz"):
        shutil.copy(ref / name, tmp_path / name)
    assert main(["scores", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no finished trials: its score tables were kept without them" in err and "Traceback" not in err
