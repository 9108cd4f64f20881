"""BAT: loss and weights by hand, reduction to PGD-AT, score tables checked against the data,
a short run that trains and logs."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import memtool
from memtool.cli import main
from memtool.engine import fit
from memtool.methods import BAT, PGDAT, Batch, weighted_mean
from memtool.recipe import Recipe
from memtool.rundir import write_table

P = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])  # softmax of the logits below
Y = torch.tensor([0, 0, 2])
ATYPICAL = torch.tensor([False, True, True])


class Fixed(nn.Module):
    """Logits log(P[i]) for sample i, whatever the perturbation (its pixel holds i / 10)."""

    def forward(self, x):
        return P.log()[(10 * x.flatten(1)[:, 0]).round().long()] + 0 * x.flatten(1).sum(1, keepdim=True)


def _bat(**kw):
    m = BAT(eps=0.0, pgd_steps=1, eps_warmup=0.0, bat_warmup=0.0, **kw)
    object.__setattr__(m, "atypical", ATYPICAL)
    return m


def _loss(method):
    x = torch.arange(3.0).view(3, 1, 1, 1) / 10
    out = method.loss(Fixed(), x, Y, Batch(torch.arange(3), 0, 0.5, [torch.Generator().manual_seed(0)], False))
    total = weighted_mean(out.per_sample, out.weight) + (0 if out.extra is None else out.extra)
    return out, float(total)


def test_soft_weights_and_loss_by_hand():
    # h: sample 1 (y=0) puts 0.7 on class 1, sample 2 (y=2) puts 0.1 on another class
    out, total = _loss(_bat(gamma=1.0, lam=0.5))
    assert out.weight.tolist() == pytest.approx([1.0, 0.3, 0.9])
    ce = [-math.log(0.6), -math.log(0.2), -math.log(0.8)]
    expected = (ce[0] + 0.3 * ce[1] + 0.9 * ce[2]) / 2.2 + 0.5 * (ce[1] + ce[2]) / 3
    assert total == pytest.approx(expected, rel=1e-6)
    (wn, wd), (hn, hd) = out.stats["atypical_weight"], out.stats["harmful_fraction"]
    assert float(wn / wd) == pytest.approx(0.6) and float(hn / hd) == pytest.approx(0.5)
    out2, _ = _loss(_bat(gamma=2.0, lam=0.0))
    assert out2.weight.tolist() == pytest.approx([1.0, 0.09, 0.81]) and out2.extra is None


def test_benign_factor_and_judged_harm_by_hand():
    out, _ = _loss(_bat(gamma=1.0, lam=0.0, benign=2.0))  # the typical sample keeps 1; atypical: 2 (1 - h)
    assert out.weight.tolist() == pytest.approx([1.0, 0.6, 1.8])
    judged = _bat(gamma=1.0, lam=0.0)  # fixed h from reference models in place of the current model's 0.7, 0.1
    object.__setattr__(judged, "judged", torch.tensor([0.0, 0.1, 0.9]))
    out, _ = _loss(judged)
    assert out.weight.tolist() == pytest.approx([1.0, 0.9, 0.1])
    assert float(out.stats["harmful_fraction"][0]) == 1.0  # sample 2 (h 0.9), not sample 1


def test_hard_rule_by_hand():
    out, total = _loss(_bat(eta=0.5, lam=0.0))
    assert out.weight.tolist() == [1.0, 0.0, 1.0]
    assert total == pytest.approx((-math.log(0.6) - math.log(0.8)) / 2, rel=1e-6)


def test_before_the_warmup_it_is_pgd_at():
    m = _bat(lam=1.0)
    object.__setattr__(m, "bat_warmup", 0.9)  # progress 0.5 < 0.9
    out, total = _loss(m)
    assert out.weight is None and out.extra is None
    assert total == pytest.approx(np.mean([-math.log(0.6), -math.log(0.2), -math.log(0.8)]), rel=1e-6)


def test_with_every_sample_typical_bat_is_pgd_at_exactly():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(200, 1, 8, 8, generator=g), torch.randint(0, 10, (200,), generator=g)
    common = dict(eps=0.1, pgd_steps=2)
    bat = BAT(bat_warmup=0.0, lam=1.0, **common)
    object.__setattr__(bat, "atypical", torch.zeros(200, dtype=torch.bool))
    subsets = [np.arange(150), np.arange(50, 200)]
    runs = [fit(Recipe(model="mlp", hidden=16, epochs=2, batch_size=32, method=m), x, y, subsets, [1, 2],
                num_classes=10).margins(x, y) for m in (bat, PGDAT(**common))]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("rule", ["soft", "hard", "judged"])
def test_trained_bat_weights_land_on_the_atypical_samples_by_hand(rule):
    """Through the engine: two stacked models, shuffled batches, given per-sample weights and
    every third sample atypical. At eps 0 and a learning rate too small to move a parameter
    every batch sees the initial models, so each model's epoch loss and the logged statistics
    follow from the formula (bat.py / methods.BAT) in numpy: wrong samples weighted, wrong
    ones counted atypical or given weights dropped all change them."""
    from functools import partial

    from memtool.models import build_model
    from memtool.recipe import epoch_order, init_model

    g = torch.Generator().manual_seed(0)
    n, m, bs, seeds = 120, 90, 20, [3, 4]
    x, y = torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)
    atypical = torch.arange(n) % 3 == 0
    given = 0.5 + (torch.arange(n) % 4) * 0.25
    subsets = [np.sort(np.random.default_rng(s).choice(n, m, replace=False)) for s in seeds]
    build = partial(build_model, "mlp", (1, 8, 8), 10, 16)
    p = np.stack([torch.softmax(init_model(build, s)(x), -1).detach().double().numpy() for s in seeds])  # (K, n, C)
    yn, a = y.numpy(), atypical.numpy()
    true = p[:, np.arange(n), yn]
    h = np.where(np.eye(10, dtype=bool)[yn], 0.0, p).max(-1)  # largest other-class probability
    judged = np.random.default_rng(1).uniform(0, 1, n)  # fixed h of reference models, by sample id
    if rule == "soft":
        params, w_bat, harmful = {"gamma": 2.0}, np.where(a, (1 - h) ** 2, 1.0), h >= 0.5
    elif rule == "judged":  # the benign half: up-weighted by 2, by the judges' h, the same in both models
        params, w_bat, harmful = {"gamma": 1.0, "benign": 2.0}, np.where(a, 2 * (1 - judged), 1.0)[None].repeat(2, 0), \
            (judged >= 0.5)[None].repeat(2, 0)
    else:  # eta between two neighbouring h of the atypical samples: about half of them weigh 0
        hs = np.sort(np.concatenate([h[k][subsets[k]][a[subsets[k]]] for k in range(2)]))
        i = len(hs) // 2
        assert hs[i] - hs[i - 1] > 1e-5  # far from float noise
        eta = float(hs[i - 1] + hs[i]) / 2
        params, w_bat, harmful = {"eta": eta}, np.where(a & (h >= eta), 0.0, 1.0), h >= eta
    method = BAT(eps=0.0, pgd_steps=1, eps_warmup=0.0, bat_warmup=0.0, lam=0.5, **params)
    object.__setattr__(method, "atypical", atypical)
    if rule == "judged":
        object.__setattr__(method, "judged", torch.tensor(judged, dtype=torch.float32))
    recipe = Recipe(model="mlp", hidden=16, epochs=1, batch_size=bs, lr=1e-30, schedule="constant", method=method)
    logged = {}
    models = fit(recipe, x, y, subsets, seeds, num_classes=10, weights=given, ensemble_size=2,
                 on_epoch=lambda epoch, model, opt, stats: logged.update(stats))
    for k, s in enumerate(seeds):  # the premise: the models did not move
        assert all(torch.equal(u, v) for u, v in zip(models[k].state_dict().values(),
                                                     init_model(build, s).state_dict().values()))

    ce, gw = -np.log(true), given.numpy()
    loss, num, den, hit = np.zeros(2), 0.0, 0.0, 0.0
    for k, s in enumerate(seeds):
        order = subsets[k][epoch_order(m, s, 0).numpy()]
        batches = [order[i : i + bs] for i in range(0, m, bs)]
        for b in batches:
            wb = gw[b] * w_bat[k, b]
            loss[k] += (wb * ce[k, b]).sum() / wb.sum() + 0.5 * ce[k, b][a[b]].sum() / len(b)
            num, den, hit = num + w_bat[k, b][a[b]].sum(), den + a[b].sum(), hit + harmful[k, b][a[b]].sum()
        loss[k] /= len(batches)
    np.testing.assert_allclose(logged["loss"].numpy(), loss, rtol=1e-5)
    assert logged["atypical_weight"] == pytest.approx(num / den, rel=1e-5)
    assert logged["harmful_fraction"] == pytest.approx(hit / den, rel=1e-5)
    assert 0 < num / den < (2 if rule == "judged" else 1)


def test_bat_needs_its_scores_bound():
    with pytest.raises(ValueError, match="method bat needs scores"):
        BAT().bind(memtool.load_dataset("digits"))
    with pytest.raises(RuntimeError, match="not bound to the data"):
        _loss(BAT(eps=0.0, pgd_steps=1))


def test_a_score_table_of_other_data_is_refused(digits_run, tmp_path):
    run, _ = digits_run
    digits = memtool.load_dataset("digits", label_noise=0.05)  # the run's data
    assert BAT(scores=str(run)).bind(digits).atypical.sum() > 0
    with pytest.raises(ValueError, match="belongs to other data: its dataset fingerprint is"):
        BAT(scores=str(run)).bind(memtool.load_dataset("digits"))  # without the planted noise
    # a table without a fingerprint (an imported one) is checked by size and labels
    table = memtool.load_scores(run)
    write_table(table, tmp_path / "no-fp.parquet", {"dataset": {"fingerprint": None}})
    assert BAT(scores=str(tmp_path / "no-fp.parquet")).bind(digits).atypical.sum() > 0
    with pytest.raises(ValueError, match=r"training labels differ from digits \(first at sample"):
        BAT(scores=str(tmp_path / "no-fp.parquet")).bind(memtool.load_dataset("digits"))
    short = table[(table.split == "test") | (table.sample_id < 100)]
    write_table(short, tmp_path / "short.parquet", {})
    with pytest.raises(ValueError, match="has 100 training rows, digits as loaded here has 1437"):
        BAT(scores=str(tmp_path / "short.parquet")).bind(digits)
    # a table without any mem estimate (an imported C-score table) would make BAT plain PGD-AT: refused
    write_table(table.assign(mem=np.nan), tmp_path / "cscore.parquet", {})
    with pytest.raises(ValueError, match="no mem estimate for any training sample .*import-cscore"):
        BAT(scores=str(tmp_path / "cscore.parquet")).bind(digits)


def test_a_harmfulness_table_is_read_by_sample_id_and_checked(digits_run, tmp_path):
    run, _ = digits_run
    digits = memtool.load_dataset("digits", label_noise=0.05)
    atypical = BAT(scores=str(run)).bind(digits).atypical.numpy()
    ids = np.flatnonzero(atypical)
    h = np.random.default_rng(0).uniform(0, 1, len(ids))
    harm = tmp_path / "harmfulness.parquet"
    order = np.random.default_rng(1).permutation(len(ids))  # rows in any order: read by sample id
    write_table(pd.DataFrame({"sample_id": ids[order], "label": digits.y_train[ids][order], "h": h[order]}), harm, {})
    judged = BAT(scores=str(run), judges=str(harm)).bind(digits).judged.numpy()
    np.testing.assert_allclose(judged[ids], h, rtol=1e-6)
    assert (judged[~atypical] == 0).all()
    write_table(pd.DataFrame({"sample_id": ids[1:], "label": digits.y_train[ids[1:]], "h": h[1:]}), harm, {})
    with pytest.raises(ValueError, match=f"lacks 1 of the {len(ids)} atypical training samples"):
        BAT(scores=str(run), judges=str(harm)).bind(digits)
    write_table(pd.DataFrame({"sample_id": ids, "label": (digits.y_train[ids] + 1) % 10, "h": h}), harm, {})
    with pytest.raises(ValueError, match="labels differ"):
        BAT(scores=str(run), judges=str(harm)).bind(digits)


def test_short_bat_run_trains_and_logs(digits_run, tmp_path, capsys):
    run, _ = digits_run
    args = ["train", "--method", "bat", "--scores", str(run), "--dataset", "digits", "--label-noise", "0.05",
            "--hidden", "64", "--epochs", "4", "--batch-size", "64", "--eps", "0.1", "--pgd-steps", "2",
            "--bat-warmup", "0.25", "--gamma", "2", "--lambda", "0.5", "--eval-samples", "200", "--eval-steps", "5",
            "--out", str(tmp_path / "bat")]
    assert main(args) == 0
    log = [json.loads(line) for line in (tmp_path / "bat" / "log.jsonl").read_text().splitlines()]
    assert "atypical_weight" not in log[0]  # epoch 1 is the warm-up: plain PGD-AT
    for r in log[1:]:
        assert 0 < r["atypical_weight"] <= 1 and 0 <= r["harmful_fraction"] <= 1
    assert log[-1]["clean_acc"] > 0.5 and log[-1]["robust_acc"] > 0.2
    method = json.loads((tmp_path / "bat" / "config.json").read_text())["config"]["recipe"]["method"]
    assert method["name"] == "bat" and method["gamma"] == 2.0 and method["lam"] == 0.5


def test_bat_without_any_atypical_sample_to_weight_is_refused_as_pgd_at(digits_run, tmp_path):
    run, _ = digits_run
    scores = memtool.load_scores(run)
    atypical = scores[(scores.split == "train") & (scores.mem >= 0.25)].sample_id.to_numpy()
    common = dict(method="bat", scores=str(run), dataset="digits", label_noise=0.05, eps=0.1, pgd_steps=1, epochs=1,
                  progress=False)
    with pytest.raises(ValueError, match=f"none of the {len(atypical)} atypical training samples .* is trained on"):
        memtool.train(out=tmp_path / "a", exclude_ids=atypical, **common)
    assert not (tmp_path / "a").exists()
    memtool.train(out=tmp_path / "b", exclude_ids=atypical[1:], **common)  # one left to weight: trains


def test_bat_run_refuses_to_resume_on_changed_scores(digits_run, tmp_path):
    """The score table is named by path, so a re-estimate into the same place must not reuse a
    model trained on the old atypical set (its content is part of the settings check)."""
    from memtool.rundir import RunMismatchError

    run, _ = digits_run
    table = memtool.load_scores(run)
    scores = tmp_path / "scores.parquet"
    write_table(table, scores, table.attrs["memtool"])
    kw = dict(method="bat", scores=str(scores), dataset="digits", label_noise=0.05, hidden=16, epochs=1,
              batch_size=64, eps=0.1, pgd_steps=1, eval_samples=100, progress=False)
    memtool.train(out=tmp_path / "bat", **kw)
    memtool.train(out=tmp_path / "bat", **kw)  # same scores: finished, reused
    write_table(table.assign(mem=1 - table["mem"]), scores, table.attrs["memtool"])
    with pytest.raises(RunMismatchError, match="atypical_sha"):
        memtool.train(out=tmp_path / "bat", **kw)
