"""The engine: stacked models equal separate runs for every method, a model depends only on
its own seed and subset, training resumes to the identical model, weights land on the
samples they name, augmentation is reproducible from the seed."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from memtool import augment
from memtool.datasets import load_dataset
from memtool.engine import default_ensemble_size, fit
from memtool.methods import METHODS, LossOutput, Method, ce
from memtool.recipe import Recipe

N = 300


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(N, 1, 8, 8, generator=g), torch.randint(0, 10, (N,), generator=g)


def _subsets(k=3, m=210):
    rng = np.random.default_rng(0)
    return [np.sort(rng.choice(N, m, replace=False)) for _ in range(k)]


def _recipe(model="mlp", method="standard", **kw):
    adv = {} if method == "standard" else dict(eps=0.1, pgd_steps=2)
    if method == "bat":
        adv["bat_warmup"] = 0.0
    if method == "gairat":
        adv["gair_burnin"] = 0.0
    base = dict(model=model, hidden=32, epochs=2, batch_size=40, lr=0.05, schedule="onecycle", method=method)
    r = Recipe.from_flat(**{**base, **adv, **kw})
    if method == "bat":  # every third sample atypical
        object.__setattr__(r.method, "atypical", torch.arange(N) % 3 == 0)
    return r


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("method", list(METHODS))
def test_stacked_models_equal_separate_runs(model, method):
    """K models trained as one stack equal K one-at-a-time runs with the same seeds, clean
    and under PGD. TRADES's attack starts at x + 0.001 N(0, 1) where the KL gradient is ~0, so
    the sign of rounding-level components differs between batched and plain matmuls; its
    models agree to 1e-2 in margin instead of 1e-5."""
    x, y = _data()
    r = _recipe(model, method)
    stacked = fit(r, x, y, _subsets(), [11, 22, 33], num_classes=10, ensemble_size=3)
    single = fit(r, x, y, _subsets(), [11, 22, 33], num_classes=10, ensemble_size=1)
    assert len(stacked.stacks) == 1 and len(single.stacks) == 3
    tol = 2e-2 if method == "trades" else 1e-5
    torch.testing.assert_close(stacked.margins(x, y), single.margins(x, y), atol=tol, rtol=tol)
    torch.testing.assert_close(stacked.margins(x, y, robust=0.1), single.margins(x, y, robust=0.1),
                               atol=5 * tol, rtol=5 * tol)
    # and a stack member is the same plain module
    with torch.no_grad():
        torch.testing.assert_close(stacked[1](x), single[1](x), atol=tol, rtol=tol)


def test_robust_margins_are_the_evaluation_pgd_with_the_models_generator():
    """margins(robust=eps) is attacks.PGD through attacked_logits (the path of evaluate and of
    the per-epoch check), its random start from a generator of (seed, EVAL, key)."""
    from memtool.attacks import PGD
    from memtool.attacks.base import attacked_logits, margins_from_logits
    from memtool.recipe import EVAL, stream

    x, y = _data()
    models = fit(_recipe("mlp", "pgd-at"), x, y, _subsets(2), [4, 5], num_classes=10)
    got = models.margins(x, y, robust=0.1, key=3)
    for k, seed in enumerate([4, 5]):
        gen = torch.Generator().manual_seed(stream(seed, EVAL, 3))
        logits = attacked_logits(PGD(eps=0.1, steps=2), models[k], x, y, gen)  # the method's 2 steps
        torch.testing.assert_close(got[k], margins_from_logits(logits, y), atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, models.margins(x, y, robust=0.1, key=4))


def test_a_model_depends_on_its_seed_and_subset_not_on_its_neighbours():
    x, y = _data()
    r = _recipe("mlp", "pgd-at")
    subsets = [np.arange(140), np.arange(60, 200)]
    both = fit(r, x, y, subsets, [5, 6], num_classes=10).margins(x, y)
    alone = fit(r, x, y, subsets[1:], [6], num_classes=10).margins(x, y)
    torch.testing.assert_close(both[1], alone[0], atol=1e-5, rtol=1e-5)
    other_seed = fit(r, x, y, subsets[1:], [7], num_classes=10).margins(x, y)
    assert not torch.allclose(other_seed[0], alone[0], atol=1e-2)


def test_unequal_subsets_train_in_separate_stacks():
    x, y = _data()
    models = fit(_recipe(), x, y, [np.arange(200), np.arange(150), np.arange(10, 210)], [1, 2, 3], num_classes=10)
    assert sorted(len(p) for p, _ in models.stacks) == [1, 2] and models.margins(x, y).shape == (3, N)


@pytest.mark.parametrize("k", [1, 2])
def test_resumed_training_gives_the_identical_model(k):
    x, y = _data()
    r = _recipe("mlp", "pgd-at", epochs=3, augment=True)
    subsets, seeds = _subsets(k), [3, 4][:k]
    saved = {}

    def keep(epoch, model, opt, stats):
        saved[epoch] = {"model": {n: t.clone() for n, t in model.state_dict().items()},
                        "optimizer": _clone(opt.state_dict()), "epoch": epoch}

    straight = fit(r, x, y, subsets, seeds, num_classes=10, ensemble_size=k, on_epoch=keep)
    resumed = fit(r, x, y, subsets, seeds, num_classes=10, ensemble_size=k, start=saved[1])
    assert torch.equal(straight.margins(x, y), resumed.margins(x, y))


def _clone(obj):
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Recording(Method):
    """Standard training that records what the engine told it."""

    seen: list = None
    name = "recording"

    def loss(self, model, x, y, batch):
        self.seen.append((batch.ids.clone(), None if batch.weights is None else batch.weights.clone(), y.clone()))
        return LossOutput(ce(model(x), y))


@pytest.mark.parametrize("k", [1, 3])
def test_a_method_sees_the_weights_of_its_batch_samples(k):
    x, y = _data()
    w = torch.arange(N, dtype=torch.float32) / N + 0.5  # every sample its own weight
    seen = []
    r = Recipe(model="mlp", hidden=16, epochs=2, batch_size=50, method=Recording(seen=seen))
    subsets = _subsets(k)
    fit(r, x, y, subsets, list(range(k)), num_classes=10, weights=w, ensemble_size=k)
    assert len(seen) == 2 * 5  # 2 epochs x ceil(210 / 50) steps
    for ids, wb, yb in seen:
        torch.testing.assert_close(wb, w[ids])
        torch.testing.assert_close(yb, y[ids])
    for j in range(k):  # every model visits exactly its subset, once per epoch
        ids = torch.cat([ids if k == 1 else ids[j] for ids, _, _ in seen[:5]])
        assert sorted(ids.tolist()) == subsets[j].tolist()


@pytest.mark.parametrize("k", [1, 3])
def test_drop_last_skips_each_epochs_partial_batch_and_nothing_else(k):
    """210 samples, batches of 50: 4 full steps per epoch instead of 4 + a step of 10; the
    samples left out change from epoch to epoch, and the schedule counts the steps taken."""
    x, y = _data()
    seen = []
    r = Recipe(model="mlp", hidden=16, epochs=3, batch_size=50, drop_last=True, method=Recording(seen=seen))
    subsets = _subsets(k)
    fit(r, x, y, subsets, list(range(k)), num_classes=10, ensemble_size=k)
    assert len(seen) == 3 * 4 == r.steps(210) and r.batches(40) == 1  # fewer samples than a batch: one step
    assert all(ids.shape[-1] == 50 for ids, _, _ in seen)
    left_out = []
    for e in range(3):
        ids = torch.cat([ids if k == 1 else ids[0] for ids, _, _ in seen[4 * e: 4 * e + 4]]).tolist()
        assert len(set(ids)) == 200 and set(ids) <= set(subsets[0].tolist())
        left_out.append(set(subsets[0].tolist()) - set(ids))
    assert left_out[0] != left_out[1]
    assert "drop_last" not in Recipe().to_dict() and Recipe.from_dict(Recipe(drop_last=True).to_dict()).drop_last


def test_zero_weight_on_a_class_unlearns_that_class_only():
    """Digits, MLP: with weight 0 on every class-0 training sample, class-0 test accuracy falls
    to near 0 (the model never learns to say 0) while the other classes stay above 85 %."""
    ds = load_dataset("digits")
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    xt, yt = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
    r = Recipe(model="mlp", hidden=64, epochs=10, batch_size=32, lr=0.1)
    w = (y != 0).float()
    everything = np.arange(len(y))
    acc = {}
    for name, weights in (("plain", None), ("zero class 0", w)):
        correct = (fit(r, x, y, [everything], [0], num_classes=10, weights=weights).margins(xt, yt)[0] > 0).numpy()
        acc[name] = (correct[yt.numpy() == 0].mean(), correct[yt.numpy() != 0].mean())
    assert acc["plain"][0] > 0.9 and acc["plain"][1] > 0.85
    assert acc["zero class 0"][0] < 0.2 and acc["zero class 0"][1] > 0.85


def test_per_model_weights():
    """(K, n) weights: model 0 unweighted, model 1 never learns class 0."""
    ds = load_dataset("digits")
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    w = torch.stack([torch.ones(len(y)), (y != 0).float()])
    r = Recipe(model="mlp", hidden=64, epochs=10, batch_size=32, lr=0.1)
    everything = np.arange(len(y))
    m = fit(r, x, y, [everything, everything], [0, 0], num_classes=10, weights=w).margins(x, y)
    class0 = (y == 0).numpy()
    assert (m[0].numpy()[class0] > 0).mean() > 0.9 and (m[1].numpy()[class0] > 0).mean() < 0.2


def test_bad_inputs_are_named():
    x, y = _data()
    r = _recipe()
    with pytest.raises(ValueError, match=r"weights must have shape \(300,\) or \(1, 300\)"):
        fit(r, x, y, [np.arange(10)], [0], num_classes=10, weights=torch.ones(5))
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        fit(r, x, y, [np.arange(10)], [0], num_classes=10, weights=-torch.ones(N))
    with pytest.raises(ValueError, match=r"subset 0 must be a non-empty 1-D array of sample ids in 0\.\.299"):
        fit(r, x, y, [np.arange(290, 310)], [0], num_classes=10)
    with pytest.raises(ValueError, match="one seed per subset"):
        fit(r, x, y, [np.arange(10)], [0, 1], num_classes=10)


# ----------------------------------------------------------------------------- augmentation


def test_crop_flip_is_a_shifted_and_possibly_mirrored_window_reproducible_from_the_seed():
    x = torch.rand(2, 6, 3, 32, 32)

    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    a = augment.crop_flip(x, gens([1, 2]), stacked=True)
    assert torch.equal(a, augment.crop_flip(x, gens([1, 2]), stacked=True))
    assert not torch.equal(a, augment.crop_flip(x, gens([1, 3]), stacked=True))
    # model 1's images depend on its own generator only
    assert torch.equal(a[1], augment.crop_flip(x[1], gens([2]), stacked=False))
    padded = torch.nn.functional.pad(x[0, 0], (4, 4, 4, 4))
    windows = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
    assert any(torch.equal(a[0, 0], w) or torch.equal(a[0, 0], w.flip(-1)) for w in windows)
    assert augment.default_augment("cifar100") and not augment.default_augment("mnist")


def test_augmented_training_is_reproducible_and_stacks():
    x, y = torch.rand(N, 3, 8, 8), torch.randint(0, 10, (N,))
    r = Recipe.from_flat(model="mlp", hidden=16, epochs=2, batch_size=50, augment=True)
    a = fit(r, x, y, _subsets(2), [1, 2], num_classes=10).margins(x, y)
    b = fit(r, x, y, _subsets(2)[1:], [2], num_classes=10).margins(x, y)
    torch.testing.assert_close(a[1], b[0], atol=1e-5, rtol=1e-5)
    plain = fit(Recipe.from_flat(model="mlp", hidden=16, epochs=2, batch_size=50, augment=False), x, y,
                _subsets(2)[1:], [2], num_classes=10).margins(x, y)
    assert not torch.allclose(plain, b, atol=1e-3)


def test_bf16_autocast_path_learns_like_fp32():
    """The GPU mixed-precision path, exercised on the CPU: same accuracy within 3 points."""
    ds = load_dataset("digits")
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    xt, yt = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
    acc = {}
    for precision in ("fp32", "bf16"):
        r = Recipe(hidden=64, epochs=10, batch_size=32, lr=0.1, precision=precision)
        m = fit(r, x, y, [np.arange(len(y))] * 2, [1, 2], num_classes=10)
        acc[precision] = (m.margins(xt, yt) > 0).float().mean()
    assert acc["fp32"] > 0.9 and abs(acc["fp32"] - acc["bf16"]) < 0.03


def test_default_ensemble_size_stacks_more_small_models():
    small = Recipe(model="mlp", hidden=128, batch_size=32)  # digits: 0.26 M multiply-adds per step
    mnist = Recipe(model="mlp", hidden=256, batch_size=128)  # MNIST: 25.7 M
    assert default_ensemble_size(small, "cpu", 64) == 64
    assert default_ensemble_size(mnist, "cpu", 784) == 16
    assert default_ensemble_size(Recipe(model="cnn"), "cpu", 784) == 1
    assert default_ensemble_size(Recipe(model="cnn"), "cuda", 784) == 64
