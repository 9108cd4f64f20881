"""The ensemble trainer equals K separate sequential runs with the same seeds."""

from functools import partial

import numpy as np
import pytest
import torch

from memtool.attacks.base import margins_from_logits
from memtool.ensemble import ensemble_margins, train_ensemble, train_single
from memtool.models import build_model
from memtool.recipe import TrainRecipe


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("train", ["standard", "pgd-at"])
def test_ensemble_matches_sequential_runs(model, train):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(300, 1, 8, 8, generator=g), torch.randint(0, 10, (300,), generator=g)
    recipe = TrainRecipe(model=model, hidden=32, epochs=2, batch_size=40, lr=0.05, schedule="onecycle",
                         train=train, eps=0.1, pgd_steps=2)
    build = partial(build_model, model, (1, 8, 8), 10, 32)
    rng = np.random.default_rng(0)
    members = np.stack([np.sort(rng.choice(300, 210, replace=False)) for _ in range(3)])
    seeds = [11, 22, 33]
    margins = ensemble_margins(train_ensemble(build, x, y, members, seeds, recipe), x, y, recipe)
    for k in range(3):
        single = train_single(build, x, y, members[k], seeds[k], recipe)
        with torch.no_grad():
            expected = margins_from_logits(single(x), y)
        torch.testing.assert_close(margins[k], expected, atol=1e-5, rtol=1e-5)


def test_trial_result_does_not_depend_on_its_ensemble_neighbours():
    x, y = torch.rand(200, 1, 8, 8), torch.randint(0, 10, (200,))
    recipe = TrainRecipe(hidden=16, epochs=1, batch_size=50)
    build = partial(build_model, "mlp", (1, 8, 8), 10, 16)
    members = np.stack([np.arange(140), np.arange(60, 200)])
    both = ensemble_margins(train_ensemble(build, x, y, members, [5, 6], recipe), x, y, recipe)
    alone = ensemble_margins(train_ensemble(build, x, y, members[1:], [6], recipe), x, y, recipe)
    torch.testing.assert_close(both[1], alone[0], atol=1e-6, rtol=1e-6)


def test_bf16_autocast_path_learns_like_fp32():
    """The GPU mixed-precision path, exercised on the CPU: same accuracy within 3 points."""
    from memtool.datasets import load_dataset

    ds = load_dataset("digits")
    x, y = torch.from_numpy(ds.x_train).float() / 255, torch.from_numpy(ds.y_train)
    xt, yt = torch.from_numpy(ds.x_test).float() / 255, torch.from_numpy(ds.y_test)
    build = partial(build_model, "mlp", (1, 8, 8), 10, 64)
    members = np.stack([np.arange(len(y))] * 2)
    acc = {}
    for precision in ("fp32", "bf16"):
        r = TrainRecipe(hidden=64, epochs=10, batch_size=32, lr=0.1, precision=precision)
        acc[precision] = (ensemble_margins(train_ensemble(build, x, y, members, [1, 2], r), xt, yt, r) > 0).float().mean()
    assert acc["fp32"] > 0.9 and abs(acc["fp32"] - acc["bf16"]) < 0.03
