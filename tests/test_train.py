"""`memtool train`: learns, resumes exactly, refuses mixed settings, leaves out and weights
the samples its files name, equals the estimator's trial, saves weights_only checkpoints."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import memtool
from memtool import training
from memtool.attacks import PGD
from memtool.checkpoints import load_model
from memtool.cli import main
from memtool.engine import fit
from memtool.estimator import plan
from memtool.recipe import Recipe, lr_at, trial_seed
from memtool.rundir import RunMismatchError
from memtool.training import TrainConfig, train

from conftest import DIGITS_AT, MNIST_AT

TINY = dict(dataset="digits", model="mlp", hidden=32, epochs=3, batch_size=64, lr=0.1, eval_samples=100, eval_steps=2)
ADV = dict(eps=0.1, pgd_steps=2)
N_DIGITS = 1437


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_short_pgd_at_run_on_mnist_is_robust(mnist_at):
    """MNIST_AT (MLP, 2000 training samples, 5 epochs of PGD-5 training at eps 0.1, eps ramped
    over the first 30 %). Chance is 0.1; the thresholds leave room for BLAS rounding."""
    out, model = mnist_at
    log = _log(out)
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5]
    assert log[-1]["robust_acc"] >= 0.5 and log[-1]["clean_acc"] >= 0.8
    assert log[-1]["eval_attack"] == "pgd10" and log[-1]["eval_n"] == 500 and log[-1]["eval_eps"] == 0.1


@pytest.mark.slow
def test_readme_pgd_at_cnn_command_leaves_chance_level(tmp_path):
    """The README's `memtool train --method pgd-at --dataset mnist --model cnn --eps 0.3` with
    the default recipe and eps warm-up, shortened to 2000 samples and 4 epochs (64 steps).
    Measured: clean 0.718, PGD-20 0.326 on the first 500 test samples (chance 0.1; without a
    warm-up PGD-AT at eps 0.3 stays at 0.099: benchmarks/eps_warmup.py)."""
    train(out=tmp_path / "run", dataset="mnist", model="cnn", method="pgd-at", eps=0.3, limit=2000, epochs=4,
          eval_samples=500, progress=False)
    last = _log(tmp_path / "run")[-1]
    assert last["robust_acc"] >= 0.2 and last["clean_acc"] >= 0.5


def test_checkpoint_loads_with_weights_only_and_rebuilds_the_model(mnist_at):
    out, model = mnist_at
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 5 and ck["settings"]["config"]["recipe"] == TrainConfig.from_kwargs(**MNIST_AT).recipe.to_dict()
    assert ck["settings"]["dataset"]["name"] == "mnist" and ck["settings"]["dataset"]["n_train"] == 2000
    assert json.loads((out / "config.json").read_text()) == ck["settings"]
    x = torch.rand(8, 1, 28, 28)
    for path in (out, out / "checkpoint.pt"):
        loaded = memtool.load_model(path)
        assert not loaded.training
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_model(out / "nothing-here")


def test_resume_gives_the_same_model_as_an_uninterrupted_run(tmp_path, monkeypatch):
    cfg = TrainConfig.from_kwargs(method="pgd-at", **TINY, **ADV)
    straight = train(cfg, tmp_path / "a", progress=False)
    calls = {"n": 0}
    real_check = training.epoch_check

    def interrupt_in_epoch_2(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_check(*args, **kw)

    monkeypatch.setattr(training, "epoch_check", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", progress=False)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(training, "epoch_check", real_check)
    resumed = train(cfg, tmp_path / "b", progress=False)
    assert _same(straight.state_dict(), resumed.state_dict())
    strip = lambda r: {k: v for k, v in r.items() if not k.endswith("_s")}  # noqa: E731
    assert [strip(r) for r in _log(tmp_path / "a")] == [strip(r) for r in _log(tmp_path / "b")]
    # a finished run is not trained again
    assert _same(train(cfg, tmp_path / "b", progress=False).state_dict(), straight.state_dict())


def test_another_config_is_refused_naming_the_field(tmp_path):
    kw = dict(TINY, method="standard", epochs=1)
    train(out=tmp_path, progress=False, **kw)
    with pytest.raises(RunMismatchError, match=r"config\.recipe\.lr: run has 0\.1, this call asks for 0\.2"):
        train(out=tmp_path, progress=False, **{**kw, "lr": 0.2})
    with pytest.raises(RunMismatchError, match=r"samples\.weights_sha"):
        train(out=tmp_path, weights=np.full(N_DIGITS, 2.0), progress=False, **kw)
    with pytest.raises(RunMismatchError, match=r"samples\.n_excluded: run has 0, this call asks for 2"):
        train(out=tmp_path, exclude_ids=[3, 4], progress=False, **kw)


def test_lr_schedules():
    assert lr_at("constant", 0.1, 50, 100) == 0.1
    assert lr_at("linear", 0.1, 50, 100) == pytest.approx(0.05)
    assert lr_at("onecycle", 0.1, 10, 100) == pytest.approx(0.05)
    assert lr_at("onecycle", 0.1, 20, 100) == pytest.approx(0.1)
    assert [lr_at("multistep", 1.0, s, 100) for s in (0, 49, 50, 74, 75, 99)] == [1, 1, 0.1, 0.1, 0.01, 0.01]


@pytest.mark.parametrize("method", ["standard", "pgd-at", "trades", "mart"])  # bat: tests/test_bat.py
def test_every_method_trains_on_digits(tmp_path, method):
    """Two epochs on the 8x8 digits, eps 0.1: every method learns (chance is 0.1)."""
    kw = {k: v for k, v in {**DIGITS_AT, "method": method, "epochs": 2, "eval_samples": 200}.items()
          if method != "standard" or k not in ("eps", "pgd_steps")}
    model = train(out=tmp_path, progress=False, **kw)
    log = _log(tmp_path)[-1]
    assert log["clean_acc"] >= 0.6 and np.isfinite(log["loss"])
    if method != "standard":
        assert log["robust_acc"] >= 0.3
    else:
        assert log["robust_acc"] is None  # no eps to check a standard model at, unless eval_eps is given
    assert not model.training


# ----------------------------------------------------------------------------- subsets and weights


@pytest.mark.parametrize("fmt", ["txt", "parquet"])
def test_exclude_ids_file_trains_on_the_rest(tmp_path, fmt):
    """--exclude-ids leaves the listed samples out: the model is the engine's model on the
    remaining ids, and the run records how many were left out."""
    excluded = np.arange(0, N_DIGITS, 3)
    path = tmp_path / f"ids.{fmt}"
    if fmt == "txt":
        path.write_text("# every third sample\n" + "\n".join(map(str, excluded)) + "\n")
    else:
        pd.DataFrame({"sample_id": excluded, "why": "test"}).to_parquet(path)
    kw = dict(TINY, method="standard", epochs=2)
    model = train(out=tmp_path / "run", exclude_ids=str(path), progress=False, **kw)
    ds = memtool.load_dataset("digits")
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    cfg = TrainConfig.from_kwargs(**kw)
    expected = fit(cfg.recipe, x, y, [np.setdiff1d(np.arange(N_DIGITS), excluded)], [0], num_classes=10)[0]
    assert _same(model.state_dict(), expected.state_dict())
    settings = json.loads((tmp_path / "run" / "config.json").read_text())
    assert settings["samples"]["n_excluded"] == len(excluded)


def test_weights_file_reaches_the_right_samples(tmp_path):
    """weight 0 on every class-0 sample: class 0 is never predicted, the others are."""
    ds = memtool.load_dataset("digits")
    path = tmp_path / "w.parquet"
    rng = np.random.default_rng(0)
    ids = rng.permutation(N_DIGITS)  # any row order
    pd.DataFrame({"sample_id": ids, "weight": (ds.y_train[ids] != 0).astype(float)}).to_parquet(path)
    model = train(out=tmp_path / "run", weights=str(path), progress=False,
                  **dict(TINY, method="standard", epochs=10, hidden=64, batch_size=32))
    with torch.no_grad():
        pred = model(torch.from_numpy(ds.x_test).float() / 255).argmax(1).numpy()
    assert (pred[ds.y_test == 0] == 0).mean() < 0.2 and (pred[ds.y_test != 0] == ds.y_test[ds.y_test != 0]).mean() > 0.85


def test_bad_sample_files_are_named(tmp_path):
    kw = dict(TINY, method="standard", epochs=1)
    bad = tmp_path / "bad.txt"
    bad.write_text("1\n2\nthree\n")
    with pytest.raises(ValueError, match=r"exclude_ids file .*bad.txt: every line must be one integer"):
        train(out=tmp_path / "r", exclude_ids=str(bad), progress=False, **kw)
    bad.write_text("5\n99999\n")
    with pytest.raises(ValueError, match=r"holds ids outside 0\.\.1436 \(the training set has 1437 samples\)"):
        train(out=tmp_path / "r", exclude_ids=str(bad), progress=False, **kw)
    w = tmp_path / "w.parquet"
    pd.DataFrame({"sample_id": np.arange(100), "weight": 1.0}).to_parquet(w)
    with pytest.raises(ValueError, match=r"weights file .*w.parquet must list every training sample id 0\.\.1436 once"):
        train(out=tmp_path / "r", weights=str(w), progress=False, **kw)
    pd.DataFrame({"sample_id": np.arange(N_DIGITS), "w": 1.0}).to_parquet(w)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['weight'\]"):
        train(out=tmp_path / "r", weights=str(w), progress=False, **kw)
    pd.DataFrame({"sample_id": np.arange(N_DIGITS), "weight": -1.0}).to_parquet(w)
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        train(out=tmp_path / "r", weights=str(w), progress=False, **kw)
    with pytest.raises(FileNotFoundError, match="weights file .*missing.parquet does not exist"):
        train(out=tmp_path / "r", weights=str(tmp_path / "missing.parquet"), progress=False, **kw)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_estimator_trial_and_train_give_the_same_pgd_at_model(tmp_path):
    """An estimator trial and `memtool train` on the same subset with the same seed and recipe
    are the same model (the estimator stores float16 margins, hence the tolerance)."""
    rkw = dict(dataset="digits", model="mlp", hidden=32, epochs=2, batch_size=64, lr=0.1, method="pgd-at", eps=0.1,
               pgd_steps=2)
    memtool.estimate(tmp_path / "est", trials=2, ensemble_size=2, progress=False, **rkw)
    t = memtool.load_trials(tmp_path / "est")
    member = plan.membership(N_DIGITS, 0.7, 0, [1])[0]
    assert np.array_equal(t.member[1], member)
    model = train(out=tmp_path / "train", seed=trial_seed(0, 1), exclude_ids=np.flatnonzero(~member), progress=False,
                  eval_samples=10, **rkw)
    ds = memtool.load_dataset("digits")
    with torch.no_grad():
        logits = model(torch.from_numpy(ds.x_test).float() / 255)
    from memtool.attacks.base import margins_from_logits

    np.testing.assert_allclose(margins_from_logits(logits, torch.from_numpy(ds.y_test)).numpy(), t.test_margin[1],
                               atol=2e-2, rtol=1e-2)


def test_cli_train_prints_progress_resumes_and_names_bad_input(tmp_path, capsys):
    args = ["train", "--method", "trades", "--dataset", "digits", "--model", "mlp", "--hidden", "32",
            "--epochs", "2", "--batch-size", "64", "--eps", "0.1", "--pgd-steps", "2", "--eval-samples", "100",
            "--eval-steps", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    text = capsys.readouterr()
    assert "epoch 2/2" in text.out + text.err and "pgd2@0.1" in text.out + text.err
    cfg = json.loads((tmp_path / "config.json").read_text())["config"]
    assert cfg["recipe"]["method"] == {"name": "trades", "eps": 0.1, "pgd_steps": 2, "step_size": None,
                                       "eps_warmup": 0.3, "attack_bn": "eval", "beta": 6.0}
    assert main(args) == 0
    assert "already trained for 2 epochs" in capsys.readouterr().out
    assert main(args[:-2] + ["--lr", "0.5", "--out", str(tmp_path)]) == 2
    assert "lr: run has 0.1, this call asks for 0.5" in capsys.readouterr().err


def test_train_help_describes_every_method_bat_included(capsys):
    from memtool.methods import METHODS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    listed = [line.split()[0] for line in text.split("methods (--method")[1].split("options:")[0].splitlines()[1:]
              if line.startswith("  ") and not line.startswith("   ")]
    assert listed == list(METHODS)
    assert "BAT, benign adversarial training" in text and "--scores SCORES" in text and "--bat-warmup" in text


def test_per_epoch_check_is_seeded_and_leaves_the_global_rng_alone(mnist_at):
    _, model = mnist_at
    ds = memtool.load_dataset("mnist")
    x, y = torch.from_numpy(ds.x_test[:100]), torch.from_numpy(ds.y_test[:100])
    state = torch.get_rng_state()
    runs = [training.epoch_check(model, x, y, eps=0.1, steps=3, seed=s, batch=40) for s in (5, 5)]
    assert runs[0] == runs[1] and torch.equal(torch.get_rng_state(), state)


def test_per_epoch_check_measures_clean_and_pgd_accuracy(mnist_at):
    out, model = mnist_at
    ds = memtool.load_dataset("mnist")
    x, y = torch.from_numpy(ds.x_test[:200]), torch.from_numpy(ds.y_test[:200])
    r = training.epoch_check(model, x, y, eps=0.1, steps=10, seed=0, batch=64)
    with torch.no_grad():
        clean = (model(x.float() / 255).argmax(1) == y).float().mean().item()
    assert r["clean_acc"] == pytest.approx(clean) and r["eval_n"] == 200 and r["eval_attack"] == "pgd10"
    assert r["robust_acc"] < r["clean_acc"]
    assert PGD(eps=0.1, steps=10).alpha == pytest.approx(0.025)
    assert Recipe().method.name == "standard"


def test_best_pgd_selection_keeps_the_best_validation_epoch(tmp_path):
    """--val-samples N holds out the N training samples after --limit (never trained on, never
    the test set); --select best-pgd keeps the epoch with the best PGD accuracy on them, and
    load_model and the RobustBench record use it."""
    from memtool.checkpoints import load_checkpoint, selected_epoch
    from memtool.datasets import load_dataset
    from memtool.training import validation_samples

    kw = dict(dataset="digits", limit=600, method="pgd-at", eps=0.1, pgd_steps=2, epochs=5, lr=0.1, hidden=32,
              batch_size=64, eval_samples=50, eval_every=2, eval_steps=3, val_samples=150, select="best-pgd")
    model = memtool.train(out=tmp_path / "m", progress=False, **kw)
    ck = load_checkpoint(tmp_path / "m")
    val = [r["val_robust_acc"] for r in ck["log"]]
    assert ck["best_epoch"] == 1 + int(np.argmax(val)) and ck["best_val"] == max(val)
    assert [("clean_acc" in r) for r in ck["log"]] == [False, True, False, True, True]  # every 2nd and the last
    epoch, rule = selected_epoch(ck)
    assert epoch == ck["best_epoch"] and "150 held-out training samples" in rule
    best = memtool.load_model(tmp_path / "m")
    for a, b in zip(best.state_dict().values(), ck["best_model"].values()):
        torch.testing.assert_close(a, b)
    for a, b in zip(model.state_dict().values(), ck["best_model"].values()):
        torch.testing.assert_close(a, b)
    # the validation samples: the 150 after the first 600, not the training set, not the test set
    full = load_dataset("digits")
    xv, yv = validation_samples(memtool.TrainConfig.from_kwargs(**kw), None, 600, "cpu")
    np.testing.assert_array_equal(xv.numpy(), full.x_train[600:750])
    np.testing.assert_array_equal(yv.numpy(), full.y_train[600:750])
    with pytest.raises(ValueError, match="needs --val-samples"):
        memtool.TrainConfig.from_kwargs(dataset="digits", limit=600, method="pgd-at", select="best-pgd")
    with pytest.raises(ValueError, match="needs --limit"):
        memtool.TrainConfig.from_kwargs(dataset="digits", method="pgd-at", val_samples=10)


def test_the_per_epoch_checks_do_not_change_the_model(tmp_path):
    """Checking every epoch, every 3rd, or never (``--eval-samples 0``) trains the same model:
    a study can turn the checks down to spend its time on training."""
    kw = dict(dataset="digits", method="pgd-at", eps=0.1, pgd_steps=2, epochs=3, hidden=32, batch_size=64, progress=False)
    models = [memtool.train(out=tmp_path / name, eval_samples=n, eval_every=k, **kw)
              for name, n, k in (("every", 100, 1), ("third", 100, 3), ("never", 0, 1))]
    for m in models[1:]:
        for a, b in zip(models[0].state_dict().values(), m.state_dict().values()):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    log = json.loads((tmp_path / "never" / "log.jsonl").read_text().splitlines()[-1])
    assert "clean_acc" not in log and log["epoch"] == 3 and log["device"] == "cpu"
