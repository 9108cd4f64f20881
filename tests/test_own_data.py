"""A user's own data and network through every job (docs/own-model.md): arrays of any
shape with floats kept, torch Datasets, image folders, npz files by absolute path; a resume
with another model or other data refused before anything is written; attacks refused on data
without an input range."""

import functools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import memtool
from memtool.cli import main
from memtool.datasets import DatasetFileError, load_dataset
from memtool.rundir import RunMismatchError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples import mynets  # noqa: E402

FAST = dict(epochs=15, batch_size=32, lr=0.1, trials=8, progress=False)


def test_feature_arrays_stay_floats_and_go_through_estimate_and_scores(tmp_path):
    x_train, y_train, x_test, y_test = mynets.breast_cancer()
    data = memtool.ArrayData(x_train, y_train, x_test, y_test, name="breast-cancer")
    assert data.input_range is None and data.image_shape == (30,) and data.x_train.dtype == np.float32
    assert len(np.unique(data.x_train)) > 10_000  # no uint8 rounding (221 values were left before)
    s = memtool.estimate(tmp_path / "bc", dataset=data, model=mynets.tabular_mlp, **FAST)
    meta = json.loads((tmp_path / "bc" / "run.json").read_text())
    assert meta["config"]["dataset"] == "breast-cancer" and meta["config"]["recipe"]["model"] == "examples.mynets:tabular_mlp"
    assert meta["model"]["digest"] and s["n_train"] == 455 and s["test_acc"] > 0.9
    # a resume with another architecture is refused, naming both, and adds nothing: other kwargs, and the
    # same spec building another network (the user's code changed: here a partial of the factory)
    before = sorted((tmp_path / "bc" / "trials").iterdir())
    with pytest.raises(RunMismatchError, match=r"model_kwargs: run has None, this call asks for \{.hidden.: 8\}"):
        memtool.estimate(tmp_path / "bc", dataset=data, model=mynets.tabular_mlp, model_kwargs={"hidden": 8},
                         **{**FAST, "trials": 16})
    with pytest.raises(RunMismatchError, match=r"made with model examples.mynets:tabular_mlp \(digest \w+, 2,242 "
                                                r"parameters\), but this call builds examples.mynets:tabular_mlp"):
        memtool.estimate(tmp_path / "bc", dataset=data, model=functools.partial(mynets.tabular_mlp, hidden=8),
                         **{**FAST, "trials": 16})
    with pytest.raises(RunMismatchError, match="dataset.fingerprint"):
        other = memtool.ArrayData(x_train[::-1].copy(), y_train[::-1].copy(), x_test, y_test, name="breast-cancer")
        memtool.estimate(tmp_path / "bc", dataset=other, model=mynets.tabular_mlp, **{**FAST, "trials": 16})
    assert sorted((tmp_path / "bc" / "trials").iterdir()) == before
    # attacks need an input range
    with pytest.raises(ValueError, match="declares none"):
        memtool.train(out=tmp_path / "at", dataset=data, model=mynets.tabular_mlp, method="pgd-at", eps=0.1, epochs=1,
                      progress=False)


def test_bad_arrays_get_one_clear_line():
    x, y = np.random.rand(10, 4).astype(np.float32), np.arange(10) % 3
    cases = [((x, y[:9], x, y), "10 train samples in x_train but 9 labels"),
             ((x, y, x, y + 5), r"y_test labels must be in 0..2; sample 0 has 5"),
             ((np.where(np.arange(10)[:, None] == 3, np.nan, x), y, x, y), r"NaN or infinite values in 1 samples \(first: sample 3\)"),
             ((x, y.astype(float), x, y), "integer labels")]
    for args, message in cases:
        with pytest.raises(DatasetFileError, match=message):
            memtool.ArrayData(*args, num_classes=3)


def test_torch_datasets_are_materialized_once_and_bad_items_named(tmp_path):
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.rand(20, 1, 4, 4, generator=g), torch.arange(20) % 2)
    test = TensorDataset(torch.rand(6, 1, 4, 4, generator=g), torch.arange(6) % 2)
    a = memtool.ArrayData.from_torch(train, test, name="toy", cache=tmp_path / "cache", progress=False)
    assert not a.x_train.flags.owndata and a.input_range == (0.0, 1.0)  # a view of the memory-mapped cache
    np.testing.assert_array_equal(a.x_train, train.tensors[0].numpy())
    b = memtool.ArrayData.from_torch([], [], name="toy", cache=tmp_path / "cache", progress=False)  # from the cache
    assert b.fingerprint == a.fingerprint

    class Triples(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(2), 0, "extra"

    with pytest.raises(DatasetFileError, match=r"sample 0 is tuple of length 3; a dataset must return \(x, y\) pairs"):
        memtool.ArrayData.from_torch(Triples(), Triples(), name="bad", progress=False)


def test_digits_image_folder_with_a_batchnorm_cnn_through_the_command_line(tmp_path, monkeypatch, capsys):
    """The guide's first half: estimate, scores, validate on imagefolder:DIR with the user's
    BN CNN named MODULE:FUNCTION; the run records absolute paths; a reopen without the model
    says how to give it."""
    monkeypatch.chdir(ROOT)
    folder = mynets.write_digits_folder(tmp_path / "digits")
    ds = load_dataset(f"imagefolder:{folder}")
    ref = load_dataset("digits")
    for split in ("train", "test"):  # the same pixels; ImageFolder's order: by class, then by file name
        order = np.argsort(getattr(ref, f"y_{split}"), kind="stable")
        np.testing.assert_array_equal(getattr(ds, f"x_{split}"), getattr(ref, f"x_{split}")[order])
        np.testing.assert_array_equal(getattr(ds, f"y_{split}"), getattr(ref, f"y_{split}")[order])
    run = tmp_path / "run"
    args = ["estimate", "--dataset", f"imagefolder:{folder}", "--model", "examples.mynets:bn_cnn", "--model-kwargs",
            '{"width": 8}', "--epochs", "3", "--batch-size", "64", "--lr", "0.05", "--trials", "4", "--limit", "300",
            "--out", str(run), "--quiet"]
    assert main(args) == 0
    cfg = json.loads((run / "run.json").read_text())["config"]
    assert cfg["dataset"] == f"imagefolder:{folder.resolve()}" and cfg["recipe"]["model_kwargs"] == {"width": 8}
    assert main(["scores", str(run), "--pairs", "probit"]) == 0  # 4 trials: the default (ash) rightly calls no pair
    # validate retrains the user's model only when the user names it
    assert main(["validate", str(run), "--seeds", "1", "--quiet"]) == 2
    assert "--model examples.mynets:bn_cnn" in capsys.readouterr().err


def test_tabular_train_and_clean_evaluate_on_the_command_line(tmp_path, monkeypatch, capsys):
    """The guide's second half: `memtool train` with the user's model on a MODULE:FUNCTION
    dataset, `memtool evaluate --attacks clean` of its checkpoint and of a plain state_dict."""
    monkeypatch.chdir(ROOT)
    common = ["--dataset", "examples.mynets:breast_cancer", "--model", "examples.mynets:tabular_mlp"]
    run = tmp_path / "run"
    assert main(["estimate", *common, "--epochs", "10", "--batch-size", "32", "--trials", "4", "--out", str(run),
                 "--pairs", "probit", "--quiet"]) == 0  # 4 trials: the default (ash) rightly calls no pair
    assert main(["figures", str(run), "--dataset", "examples.mynets:breast_cancer", "--out", str(tmp_path / "f")]) == 0
    assert sorted(p.name for p in (tmp_path / "f").glob("*.png")) == ["mem_hist.png"]  # features: no galleries
    assert main(["validate", str(run), *common, "--seeds", "1", "--quiet"]) == 0
    assert main(["validate", str(run), *common, "--model-kwargs", '{"hidden": 8}', "--seeds", "1", "--out",
                 str(tmp_path / "v2"), "--quiet"]) == 0  # another learner on the run's pairs: allowed, says so
    assert "not the run's recipe" in (tmp_path / "v2" / "validate.md").read_text()
    with pytest.raises(RunMismatchError, match="architectures differ"):
        memtool.validate(run, tmp_path / "v3", seeds=1, model=functools.partial(mynets.tabular_mlp, hidden=8),
                         dataset="examples.mynets:breast_cancer", progress=False)
    assert main(["train", *common, "--epochs", "5", "--batch-size", "32", "--optimizer", "adamw", "--lr", "0.01",
                 "--weight-decay", "0.01", "--schedule", "cosine", "--eval-samples", "0", "--out", str(tmp_path / "t"),
                 "--quiet"]) == 0
    assert f"memtool.load_model({str(tmp_path / 't')!r}, model='examples.mynets:tabular_mlp')" in capsys.readouterr().out
    assert main(["evaluate", str(tmp_path / "t"), "--model", "examples.mynets:tabular_mlp", "--dataset",
                 "examples.mynets:breast_cancer", "--attacks", "clean", "--out", str(tmp_path / "e"), "--quiet"]) == 0
    acc = json.loads((tmp_path / "e" / "summary.json").read_text())["attacks"]["clean"]["accuracy"]
    assert acc > 0.9
    model = memtool.load_model(tmp_path / "t", model="examples.mynets:tabular_mlp")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    assert main(["evaluate", *common, "--weights", str(tmp_path / "plain.pt"), "--attacks", "clean", "--out",
                 str(tmp_path / "e2"), "--quiet"]) == 0
    assert json.loads((tmp_path / "e2" / "summary.json").read_text())["attacks"]["clean"]["accuracy"] == acc
    assert main(["evaluate", *common, "--weights", str(tmp_path / "plain.pt"), "--attacks", "clean,pgd20", "--out",
                 str(tmp_path / "e3"), "--quiet"]) == 2
    assert "declares none" in capsys.readouterr().err
    # a checkpoint of the user's model without the model named: one line saying how
    assert main(["evaluate", str(tmp_path / "t"), "--attacks", "clean", "--dataset", "examples.mynets:breast_cancer",
                 "--out", str(tmp_path / "e4"), "--quiet"]) == 2
    assert "never imports code" in capsys.readouterr().err


def test_npz_runs_record_an_absolute_path(tmp_path, monkeypatch):
    x, y = np.random.default_rng(0).random((60, 8, 8)).astype(np.float32), np.arange(60) % 3
    np.savez(tmp_path / "d.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    monkeypatch.chdir(tmp_path)
    memtool.estimate(tmp_path / "r", dataset="d.npz", model="mlp", hidden=16, epochs=2, trials=2, progress=False)
    cfg = json.loads((tmp_path / "r" / "run.json").read_text())["config"]
    assert cfg["dataset"] == f"npz:{tmp_path / 'd.npz'}"
    monkeypatch.chdir(ROOT)  # opened from another directory
    assert memtool.load_scores(tmp_path / "r")["mem"].notna().any()


SEEN = {}


def plain_loop(data, subset_ids, seed):
    """A user's own training loop: full-batch gradient descent on a linear model."""
    SEEN[seed] = np.asarray(subset_ids).copy()
    torch.manual_seed(seed % 2**31)
    x = torch.as_tensor(data.x_train[subset_ids], dtype=torch.float32)
    y = torch.as_tensor(data.y_train[subset_ids])
    model = torch.nn.Linear(x.shape[1], data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(50):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_train_fn_is_the_users_loop_on_memtools_plan(tmp_path):
    from memtool.estimator import plan
    from memtool.recipe import trial_seed

    data = memtool.ArrayData(*mynets.breast_cancer(), name="breast-cancer")
    SEEN.clear()
    s = memtool.estimate(tmp_path / "r", dataset=data, train_fn=plain_loop, trials=6, progress=False)
    assert s["status"] == "complete" and s["test_acc"] > 0.9
    for t in range(6):  # trial t trained on exactly the plan's subset, with the plan's seed
        np.testing.assert_array_equal(SEEN[trial_seed(0, t)], plan.subset_indices(455, 0.7, 0, [t])[0])
    cfg = json.loads((tmp_path / "r" / "run.json").read_text())["config"]
    assert cfg["train_fn"] == "test_own_data:plain_loop"
    with pytest.raises(ValueError, match="never imports code named in a run directory.*--train-fn test_own_data:plain_loop"):
        memtool.estimate(tmp_path / "r", config=memtool.EstimateConfig.from_dict(cfg), trials=8, progress=False)


def test_data_in_host_memory_gives_the_identical_trials(tmp_path):
    """--data-on-host (batches moved one at a time, uint8 kept) and the data on the device
    give the same trial files, bit for bit."""
    from memtool.estimator import load_trials

    kw = dict(dataset="digits", model="mlp", hidden=32, epochs=3, batch_size=64, trials=4, progress=False)
    memtool.estimate(tmp_path / "device", **kw)
    memtool.estimate(tmp_path / "host", data_on_host=True, **kw)
    a, b = load_trials(tmp_path / "device"), load_trials(tmp_path / "host")
    np.testing.assert_array_equal(a.train_margin, b.train_margin)
    np.testing.assert_array_equal(a.test_margin, b.test_margin)


def test_a_registered_method_trains_and_its_run_reopens(tmp_path):
    from dataclasses import dataclass
    from typing import ClassVar

    from memtool.methods import METHODS, LossOutput, ce

    @dataclass(frozen=True)
    class Confident(memtool.Method):
        """Cross-entropy plus an entropy penalty (a user's method)."""

        weight: float = 0.1
        name: ClassVar[str] = "test-confident"

        def loss(self, model, x, y, batch):
            logits = model(x)
            p = logits.softmax(-1)
            return LossOutput(ce(logits, y) + self.weight * -(p * p.clamp_min(1e-12).log()).sum(-1))

    memtool.register_method(Confident)
    try:
        kw = dict(dataset="digits", model="mlp", hidden=32, epochs=2, batch_size=64, progress=False, method="test-confident")
        memtool.estimate(tmp_path / "r", trials=2, **kw)
        assert json.loads((tmp_path / "r" / "run.json").read_text())["config"]["recipe"]["method"] == \
            {"name": "test-confident", "weight": 0.1}
        assert memtool.estimate(tmp_path / "r", trials=4, **kw)["n_trials"] == 4  # reopened, extended
    finally:
        METHODS.pop("test-confident")
    with pytest.raises(ValueError, match="got 'test-confident' .*register_method"):
        memtool.estimate(tmp_path / "r", trials=6, **kw)


def test_adversarial_training_of_a_users_batchnorm_cnn_on_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "at"
    assert main(["train", "--dataset", "digits", "--model", "examples.mynets:bn_cnn", "--model-kwargs", '{"width": 4}',
                 "--method", "pgd-at", "--eps", "0.1", "--pgd-steps", "2", "--epochs", "1", "--limit", "300",
                 "--eval-samples", "50", "--out", str(out), "--quiet"]) == 0
    assert main(["evaluate", str(out), "--model", "examples.mynets:bn_cnn", "--attacks", "clean,pgd5",
                 "--n-samples", "50", "--out", str(out / "eval"), "--quiet"]) == 0
    record = json.loads((out / "eval" / "robustbench.json").read_text())
    assert record["architecture"] == "examples.mynets:bn_cnn" and "attack_seed" in record


    def edited(in_shape, num_classes, width=4):  # the user's bn_cnn after an edit: another architecture
        return mynets.bn_cnn(in_shape, num_classes, 2 * width)

    edited.__module__, edited.__qualname__ = "examples.mynets", "bn_cnn"
    with pytest.raises(RunMismatchError, match="made with model examples.mynets:bn_cnn .*architectures differ"):
        memtool.load_model(out, model=edited)


def test_labels_that_leave_a_class_without_training_samples_are_refused():
    x, y = np.random.rand(12, 4).astype(np.float32), np.arange(12) % 3
    with pytest.raises(DatasetFileError, match=r"no training sample has class 0, 1, 2, 3, 4: give labels 0..K-1"):
        memtool.ArrayData(x, y + 5, x, y)  # train 5..7, test 0..2: no class in common
    with pytest.raises(DatasetFileError, match=r"classes 0..3 .* no training sample has class 0:"):
        memtool.ArrayData(x, y + 1, x, y + 1)  # 1-based labels
    with pytest.raises(DatasetFileError, match="no training sample has class 3:"):
        memtool.ArrayData(x, y, x, np.r_[y[:-1], 3])  # a class only the test set has
    assert memtool.ArrayData(x, y + 1, x, y + 1, num_classes=4).num_classes == 4  # declared: kept



def test_integer_pixels_are_told_to_be_uint8(tmp_path):
    x, y = np.random.default_rng(0).integers(0, 256, (12, 1, 4, 4)), np.arange(12) % 3
    np.savez(tmp_path / "int.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    with pytest.raises(DatasetFileError, match=r"got dtype int64: pixels 0..255 as x.astype\(np.uint8\)"):
        load_dataset(f"npz:{tmp_path / 'int.npz'}")
    with pytest.raises(DatasetFileError, match=r"rescale to \[0, 1\] \(pixels 0..255: give them as uint8\)"):
        memtool.ArrayData(x, y, x, y)


def two_outputs(data, subset_ids, seed):
    return torch.nn.Linear(data.x_train.shape[1], 2)


def two_arguments(data, subset_ids):
    return torch.nn.Linear(data.x_train.shape[1], 3)


def test_a_train_fn_with_the_wrong_signature_or_outputs_is_named(tmp_path):
    x, y = np.random.rand(30, 4).astype(np.float32), np.arange(30) % 3
    data = memtool.ArrayData(x, y, x, y, name="three-classes")
    with pytest.raises(TypeError, match=r"train_fn test_own_data:two_arguments must take \(dataset, subset_ids, "
                                        r"seed\)"):
        memtool.estimate(tmp_path / "sig", dataset=data, train_fn=two_arguments, trials=2, progress=False)
    assert not (tmp_path / "sig").exists()  # refused before the run directory is made
    with pytest.raises(ValueError, match=r"returned by train_fn test_own_data:two_outputs: .* gave output \(2, 2\)"):
        memtool.estimate(tmp_path / "out", dataset=data, train_fn=two_outputs, trials=2, progress=False)


def test_a_run_made_from_arrays_in_python_reopens_from_an_npz_of_the_same_arrays(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 1, 8, 8), dtype=np.uint8), np.arange(40) % 3
    data = memtool.ArrayData(x[:30], y[:30], x[30:], y[30:], name="reopen-from-npz")
    memtool.estimate(tmp_path / "r", dataset=data, model="mlp", hidden=16, epochs=2, trials=2, progress=False)
    np.savez(tmp_path / "same.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])
    np.savez(tmp_path / "other.npz", x_train=x[:30][::-1], y_train=y[:30][::-1], x_test=x[30:], y_test=y[30:])
    from memtool.userdata import _IN_MEMORY
    _IN_MEMORY.pop("reopen-from-npz")  # a new process: the arrays given in Python are gone
    assert main(["figures", str(tmp_path / "r"), "--dataset", f"npz:{tmp_path / 'other.npz'}", "--out",
                 str(tmp_path / "f")]) == 2
    assert "are not those" in capsys.readouterr().err
    assert "reopen-from-npz" not in _IN_MEMORY  # the other data were not kept under the run's name
    assert main(["figures", str(tmp_path / "r"), "--dataset", f"npz:{tmp_path / 'same.npz'}", "--out",
                 str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "most_memorized.png").exists()
