"""Defaults that depend on the data or the method: the eps of every adversarial method and of
robust scores follows the dataset (one owner: datasets.standard_eps); standard training
defaults to a constant lr so that its models fit their subsets, and the estimator warns
when they do not."""

import warnings

import pytest

import memtool
from memtool.estimator.config import EstimateConfig
from memtool.methods import METHODS
from memtool.recipe import Recipe
from memtool.training import TrainConfig

ADVERSARIAL = [m for m, cls in METHODS.items() if cls.adversarial]
STANDARD = [("mnist", 0.3), ("fashion-mnist", 0.1), ("cifar10", 8 / 255), ("cifar100", 8 / 255),
            ("tiny-imagenet", 8 / 255)]


@pytest.mark.parametrize("dataset,eps", STANDARD)
@pytest.mark.parametrize("method", ADVERSARIAL)
def test_the_default_eps_follows_the_dataset_in_train_and_estimate(method, dataset, eps):
    extra = {"scores": "scores.parquet"} if method == "bat" else {}
    for cfg in (TrainConfig.from_kwargs(dataset=dataset, method=method, **extra),
                EstimateConfig.from_kwargs(dataset=dataset, method=method, **extra)):
        assert cfg.recipe.method.eps == pytest.approx(eps)
    assert EstimateConfig.from_kwargs(dataset=dataset, method=method, **extra).robust_eps == pytest.approx(eps)
    assert TrainConfig.from_kwargs(dataset=dataset, method=method, eps=0.05, **extra).recipe.method.eps == 0.05


@pytest.mark.parametrize("dataset,eps", STANDARD)
def test_robust_scores_of_standard_training_default_to_the_dataset_eps(dataset, eps):
    cfg = EstimateConfig.from_kwargs(dataset=dataset, robust=True)
    assert cfg.robust_eps == pytest.approx(eps) and cfg.recipe.schedule == "constant"


def test_a_user_dataset_needs_an_explicit_eps():
    with pytest.raises(ValueError, match="'mine.npz' has no standard eps .* --eps"):
        TrainConfig.from_kwargs(dataset="mine.npz", method="pgd-at")
    assert TrainConfig.from_kwargs(dataset="mine.npz", method="pgd-at", eps=0.2).recipe.method.eps == 0.2
    with pytest.raises(ValueError, match="method pgd-at has no eps"):
        _ = Recipe.from_flat(method="pgd-at").method.alpha


def test_the_schedule_default_follows_the_method():
    assert Recipe().schedule == "constant"
    assert {m: Recipe.from_flat(method=m, **({"scores": "s"} if m == "bat" else {})).schedule
            for m in ADVERSARIAL} == {m: "onecycle" for m in ADVERSARIAL}
    assert Recipe.from_flat(method="pgd-at", schedule="constant").schedule == "constant"


def test_the_fit_warning_fires_on_an_under_trained_recipe_only(tmp_path):
    kw = dict(dataset="digits", limit=400, trials=4, hidden=64, batch_size=32, progress=False)
    with pytest.warns(UserWarning, match=r"reach only 0\.\d+ mean accuracy .* Train longer \(--epochs, now 1\) or "
                                         r"at a constant learning rate \(--schedule constant, now onecycle\)"):
        s = memtool.estimate(tmp_path / "under", epochs=1, lr=0.05, schedule="onecycle", **kw)
    assert s["train_acc_in_subset"] < 0.99 and "fit_warning" in s
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = memtool.estimate(tmp_path / "fits", epochs=30, lr=0.1, **kw)
    assert s["train_acc_in_subset"] >= 0.99 and "fit_warning" not in s
    assert not [w for w in caught if "do not fit" in str(w.message)]
