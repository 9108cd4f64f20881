"""One-run proxies (memtool.proxies): known answers on a frozen model and on a planted
sequence of predictions, stacked = separate, recorded from the estimator's own trials
without changing them, and TracIn's cosine."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memtool
from memtool.attacks.base import margins_from_logits
from memtool.engine import _builder, fit
from memtool.proxies import PROXIES, ProxySettings, Recorder, mean_over_members
from memtool.recipe import Recipe, init_model

N = 120


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(N, 1, 6, 6, generator=g), torch.randint(0, 4, (N,), generator=g)


def test_a_frozen_model_gives_the_hand_computed_proxies():
    """With a learning rate of 1e-12 the model stays at its initialisation, so every visit's
    loss is the initial loss: csl = epochs * CE, learning_speed = -correct, aum = -margin,
    forgetting 0 for a sample it gets right and `epochs` for one it never does."""
    x, y = _data()
    r = Recipe.from_flat(model="mlp", hidden=16, epochs=3, batch_size=32, lr=1e-12, schedule="constant")
    rec = Recorder(x, y, [7], r, ProxySettings(el2n_at=0.5, input_every=1))
    fit(r, x, y, [np.arange(N)], [7], num_classes=4, recorder=rec)
    got = rec.result()
    model = init_model(_builder(r, x, 4), 7).eval()
    with torch.no_grad():
        logits = model(x)
    correct = (logits.argmax(1) == y).numpy()
    assert 0 < correct.sum() < N
    np.testing.assert_allclose(got["csl"][0], 3 * F.cross_entropy(logits, y, reduction="none").numpy(), rtol=1e-5)
    np.testing.assert_allclose(got["learning_speed"][0], -correct.astype(float))
    np.testing.assert_allclose(got["aum"][0], -margins_from_logits(logits, y).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["forgetting"][0], np.where(correct, 0.0, 3.0))
    e = F.softmax(logits, 1) - F.one_hot(y, 4)
    np.testing.assert_allclose(got["el2n"][0], e.norm(dim=1).numpy(), rtol=1e-5)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    np.testing.assert_allclose(got["grad_norm"][0], 3 * g.flatten(1).norm(dim=1).numpy(), rtol=1e-4)
    assert (got["curvature"][0] >= 0).all() and np.isfinite(got["curvature"][0]).all()


def _bias_model(bias):
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        m[1].weight.zero_()
        m[1].bias.copy_(torch.tensor(bias))
    return m.eval()


def test_forgetting_counts_a_planted_flip_sequence():
    """Predictions planted per epoch: class 0 at epochs 1, 2, 4 and class 1 at epochs 3, 5.
    Samples of label 0 are learned, forgotten at 3, relearned, forgotten at 5: two events;
    label-1 samples are forgotten once (at 4); a label-2 sample is never learned: 5."""
    x, y = torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 2])
    r = Recipe(epochs=5)
    rec = Recorder(x, y, [0], r, ProxySettings(el2n_at=0.2))
    for epoch, winner in enumerate([0, 0, 1, 0, 1], start=1):
        rec.visit([0], torch.arange(3), torch.ones(3))
        bias = [0.0, 0.0, 0.0]
        bias[winner] = 1.0
        rec.epoch_end([0], _bias_model(bias), epoch)
    got = rec.result()
    np.testing.assert_array_equal(got["forgetting"][0], [2, 1, 5])
    np.testing.assert_allclose(got["learning_speed"][0], [-3 / 5, -2 / 5, 0])
    np.testing.assert_array_equal(got["csl"][0], [5, 5, 5])
    # margins: +1 / -1 for the winner / a loser, so AUM = -(3 - 2) / 5 for label 0
    np.testing.assert_allclose(got["aum"][0], [-(3 - 2) / 5, -(2 - 3) / 5, 1.0], rtol=1e-6)


@pytest.mark.parametrize("method", ["standard", "pgd-at"])
def test_stacked_and_separate_runs_record_the_same_proxies(method):
    x, y = _data()
    adv = {} if method == "standard" else dict(eps=0.1, pgd_steps=2)
    r = Recipe.from_flat(model="mlp", hidden=16, epochs=2, batch_size=30, lr=0.05, method=method, **adv)
    subsets = [np.sort(np.random.default_rng(k).choice(N, 84, replace=False)) for k in range(3)]
    got = []
    for k in (3, 1):
        rec = Recorder(x, y, [1, 2, 3], r, ProxySettings(input_every=1))
        fit(r, x, y, subsets, [1, 2, 3], num_classes=4, ensemble_size=k, recorder=rec)
        got.append(rec.result())
    for name in PROXIES:
        np.testing.assert_allclose(got[0][name], got[1][name], rtol=2e-3, atol=2e-4, err_msg=name)
    member = np.zeros((3, N), bool)
    for k, s in enumerate(subsets):
        member[k, s] = True
    assert np.isnan(got[0]["csl"][~member]).all() and np.isfinite(got[0]["csl"][member]).all()


def test_mean_over_members():
    a = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, np.nan]])
    member = np.array([[True, False, True], [True, True, False]])
    np.testing.assert_allclose(mean_over_members(a, member), [2.0, 4.0, 3.0])
    assert np.isnan(mean_over_members(np.full((2, 1), np.nan)))[0]


def test_recording_proxies_leaves_the_trials_unchanged_and_fills_the_table(tmp_path):
    kw = dict(dataset="digits", limit=300, label_noise=0.1, trials=4, epochs=3, hidden=16, batch_size=32,
              progress=False)
    with pytest.warns(UserWarning, match="do not fit"):
        memtool.estimate(tmp_path / "plain", **kw)
        memtool.estimate(tmp_path / "px", record_proxies=True, **kw)
    a, b = memtool.load_scores(tmp_path / "plain"), memtool.load_scores(tmp_path / "px")
    np.testing.assert_array_equal(a["mem"], b["mem"])
    assert set(PROXIES) <= set(b.columns) and not set(PROXIES) & set(a.columns)
    trials = memtool.load_trials(tmp_path / "px")
    train = b[b["split"] == "train"]
    np.testing.assert_allclose(train["csl"], mean_over_members(trials.proxies["csl"], trials.member), rtol=1e-6)
    assert b.loc[b["split"] == "test", "csl"].isna().all()


def test_proxies_command_recovers_planted_noise_and_writes_tracin(tmp_path):
    from memtool.estimator.scores import auroc
    from memtool.hybrid import load_tracin

    table = memtool.proxies(tmp_path / "px", dataset="digits", label_noise=0.05, seeds=2, epochs=8, hidden=32,
                            batch_size=32, progress=False)
    tr = table[table["split"] == "train"]
    flipped = tr["label_corrupted"].to_numpy()
    assert flipped.sum() == round(0.05 * 1437)
    for name in ("csl", "learning_speed", "aum", "el2n"):
        assert auroc(tr[name].to_numpy(), flipped) > 0.9, name
    t = load_tracin(tmp_path / "px")
    cos = np.concatenate([t[f"cos_{c}"].ravel() for c in range(10)])
    assert np.abs(cos).max() <= 1 + 1e-5 and cos.size == sum(
        (t["train_label"] == c).sum() * (t["test_label"] == c).sum() for c in range(10))
    assert table.attrs["memtool"]["n_models"] == 2
    # resumes: the models are not retrained (their file is reused as it is)
    f = next((tmp_path / "px" / "models").glob("*.npz"))
    mtime = f.stat().st_mtime
    memtool.proxies(tmp_path / "px", dataset="digits", label_noise=0.05, seeds=2, epochs=8, hidden=32,
                    batch_size=32, progress=False)
    assert f.stat().st_mtime == mtime
