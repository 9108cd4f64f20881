"""Training losses: TRADES and MART against hand-computed values and the official batch
formulas; the adversaries respect the threat model; the weighted reduction."""

from math import log
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from memtool.losses import (LOSSES, Step, mart_per_sample, trades_adversary, trades_per_sample,
                            weighted_mean)
from memtool.models import build_model

# Two samples, three classes. Logits are log-probabilities, so the softmaxes are exactly
#   clean:       p(x1) = (0.7, 0.2, 0.1)   p(x2) = (0.1, 0.6, 0.3)
#   adversarial: p(x1') = (0.5, 0.3, 0.2)  p(x2') = (0.2, 0.3, 0.5)
P_NAT = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], dtype=torch.float64)
P_ADV = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], dtype=torch.float64)
Y = torch.tensor([0, 1])
KL1 = 0.7 * log(0.7 / 0.5) + 0.2 * log(0.2 / 0.3) + 0.1 * log(0.1 / 0.2)  # = 0.0851228
KL2 = 0.1 * log(0.1 / 0.2) + 0.6 * log(0.6 / 0.3) + 0.3 * log(0.3 / 0.5)  # = 0.1933259


def test_trades_matches_hand_computed_values():
    # l_i = CE(f(x_i), y_i) + beta * KL(p(x_i) || p(x_i'))
    expected = [-log(0.7) + 6 * KL1, -log(0.6) + 6 * KL2]
    assert expected == pytest.approx([0.8674119, 1.6707810], abs=1e-6)
    got = trades_per_sample(P_NAT.log(), P_ADV.log(), Y, beta=6.0)
    assert got.tolist() == pytest.approx(expected, abs=1e-9)
    assert trades_per_sample(P_NAT.log(), P_ADV.log(), Y, beta=0.0).tolist() == pytest.approx([-log(0.7), -log(0.6)])


def test_mart_matches_hand_computed_values():
    # sample 1: y = 0 is the adversarial top class, so the most likely wrong class is 1 (p' = 0.3)
    # sample 2: y = 1, the adversarial top class is 2 (p' = 0.5)
    # l_i = -log p'_y - log(1.0001 - p'_wrong + 1e-12) + beta * KL(p || p') * (1.0000001 - p_y)
    expected = [-log(0.5) - log(1.0001 - 0.3 + 1e-12) + 6 * KL1 * (1.0000001 - 0.7),
                -log(0.3) - log(1.0001 - 0.5 + 1e-12) + 6 * KL2 * (1.0000001 - 0.6)]
    assert expected == pytest.approx([1.2029004, 2.3609023], abs=1e-6)
    got = mart_per_sample(P_NAT.log(), P_ADV.log(), Y, beta=6.0)
    assert got.tolist() == pytest.approx(expected, abs=1e-9)


def _official_trades_batch(logits_nat, logits_adv, y, beta):
    """The batch loss as yaodongyu/TRADES trades.py computes it (KLDivLoss summed, / batch)."""
    kl = torch.nn.KLDivLoss(reduction="sum")(F.log_softmax(logits_adv, 1), F.softmax(logits_nat, 1))
    return F.cross_entropy(logits_nat, y) + beta * kl / len(y)


def _official_mart_batch(logits_nat, logits_adv, y, beta):
    """The batch loss as YisenWang/MART mart.py computes it."""
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits_nat, dim=1)
    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
    kl = torch.nn.KLDivLoss(reduction="none")(torch.log(adv_probs + 1e-12), nat_probs)
    loss_robust = (1.0 / len(y)) * torch.sum(torch.sum(kl, dim=1) * (1.0000001 - true_probs))
    return loss_adv + float(beta) * loss_robust


@pytest.mark.parametrize("beta", [1.0, 6.0])
def test_batch_mean_equals_the_official_batch_loss(beta):
    g = torch.Generator().manual_seed(0)
    nat, adv = torch.randn(32, 10, generator=g) * 3, torch.randn(32, 10, generator=g) * 3
    y = torch.randint(0, 10, (32,), generator=g)
    torch.testing.assert_close(trades_per_sample(nat, adv, y, beta).mean(), _official_trades_batch(nat, adv, y, beta))
    torch.testing.assert_close(mart_per_sample(nat, adv, y, beta).mean(), _official_mart_batch(nat, adv, y, beta))
    # and the gradients agree too (MART lets the gradient flow through p_y(x), as the official code does)
    for ours, official in ((trades_per_sample, _official_trades_batch), (mart_per_sample, _official_mart_batch)):
        a, b = nat.clone().requires_grad_(), nat.clone().requires_grad_()
        ours(a, adv, y, beta).mean().backward()
        official(b, adv, y, beta).backward()
        torch.testing.assert_close(a.grad, b.grad)


def test_weighted_mean():
    loss = torch.tensor([1.0, 2.0, 4.0])
    assert weighted_mean(loss, None).item() == pytest.approx(7 / 3)
    assert weighted_mean(loss, torch.tensor([1.0, 0.0, 3.0])).item() == pytest.approx((1 + 12) / 4)
    assert weighted_mean(loss, torch.tensor([2.0, 2.0, 2.0])).item() == pytest.approx(7 / 3)
    assert weighted_mean(loss, torch.zeros(3)).item() == 0.0


def _setup(method, eps=0.1):
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, 32).train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    cfg = SimpleNamespace(method=method, pgd_steps=5, beta=6.0)
    return model, x, y, Step(ids=torch.arange(16), epoch=0, eps=eps, alpha=2.5 * eps / 5, config=cfg)


@pytest.mark.parametrize("method", ["standard", "pgd-at", "trades", "mart"])
def test_every_method_gives_per_sample_losses_and_keeps_train_mode(method):
    model, x, y, step = _setup(method)
    out = LOSSES[method](model, x, y, step)
    assert out.per_sample.shape == (16,) and torch.isfinite(out.per_sample).all() and (out.per_sample >= 0).all()
    assert model.training  # the adversary ran in eval mode and gave the mode back
    out.per_sample.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_trades_with_beta_zero_is_clean_cross_entropy():
    model, x, y, step = _setup("trades")
    step.config.beta = 0.0
    torch.testing.assert_close(LOSSES["trades"](model, x, y, step).per_sample,
                               F.cross_entropy(model(x), y, reduction="none"))


def test_trades_adversary_stays_in_the_ball_and_raises_the_kl():
    model, x, y, step = _setup("trades", eps=0.2)
    x_adv = trades_adversary(model, x, step)
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        p = F.log_softmax(model(x), 1)
        kl_adv = F.kl_div(F.log_softmax(model(x_adv), 1), p.exp(), reduction="none").sum(1)
        x_rand = (x + 0.2 * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
        kl_rand = F.kl_div(F.log_softmax(model(x_rand), 1), p.exp(), reduction="none").sum(1)
    assert kl_adv.mean() > 2 * kl_rand.mean()
