"""Training methods: TRADES and MART against hand-computed values and the official batch
formulas; the adversaries respect the threat model; the weighted reduction; the BatchNorm
convention of the training attack."""

from math import log

import pytest
import torch
import torch.nn.functional as F

from memtool.attacks.pgd import pgd, project
from memtool.methods import (METHODS, Batch, build_method, ce, gair_weights, mart_per_sample, trades_per_sample,
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
    # per model: the last axis is the batch
    two = weighted_mean(torch.stack([loss, 2 * loss]), torch.tensor([[1.0, 0.0, 3.0], [0.0, 1.0, 0.0]]))
    assert two.tolist() == pytest.approx([13 / 4, 4.0])


def _batch(n=16, seed=0):
    return Batch(torch.arange(n), epoch=0, progress=1.0, gens=[torch.Generator().manual_seed(seed)], stacked=False)


def _setup(name, eps=0.1, **kw):
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, 32).train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    method = build_method(name, **({} if name == "standard" else dict(eps=eps, pgd_steps=5, eps_warmup=0.0, **kw)))
    if name == "bat":  # half the batch atypical, weights on from the start
        method = build_method(name, eps=eps, pgd_steps=5, eps_warmup=0.0, bat_warmup=0.0, **kw)
        object.__setattr__(method, "atypical", torch.arange(16) % 2 == 0)
    return model, x, y, method


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_gives_per_sample_losses_and_keeps_train_mode(name):
    model, x, y, method = _setup(name)
    out = method.loss(model, x, y, _batch())
    assert out.per_sample.shape == (16,) and torch.isfinite(out.per_sample).all() and (out.per_sample >= 0).all()
    assert model.training  # the adversary ran in eval mode and gave the mode back
    out.per_sample.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_trades_with_beta_zero_is_clean_cross_entropy():
    model, x, y, method = _setup("trades", beta=0.0)
    torch.testing.assert_close(method.loss(model, x, y, _batch()).per_sample,
                               F.cross_entropy(model(x), y, reduction="none"))


def test_trades_adversary_stays_in_the_ball_and_raises_the_kl():
    model, x, y, method = _setup("trades", eps=0.2)
    with torch.no_grad():
        p = F.log_softmax(model(x), 1)

    def kl(logits, _y):
        return F.kl_div(F.log_softmax(logits, 1), p.exp(), reduction="none").sum(1)

    x_adv = method.pgd(model, x, None, _batch(), kl, start="normal")
    assert (x_adv - x).abs().max() <= 0.2 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        x_rand = (x + 0.2 * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
        assert kl(model(x_adv), y).mean() > 2 * kl(model(x_rand), y).mean()


def test_eps_warmup_ramps_eps_and_step_size_over_a_fraction_of_training():
    m = build_method("pgd-at", eps=0.3, pgd_steps=10, eps_warmup=0.5)
    assert m.radius(0.0) == (0.0, 0.0)
    assert m.radius(0.25) == pytest.approx((0.15, 0.0375))
    assert m.radius(0.5) == pytest.approx((0.3, 0.075)) and m.radius(0.9) == pytest.approx((0.3, 0.075))
    assert build_method("pgd-at", eps=0.3, eps_warmup=0.0).radius(0.0) == pytest.approx((0.3, 0.075))


def test_method_parameters_belong_to_their_method():
    assert build_method("trades").beta == 6.0 and build_method("mart", beta=3).beta == 3
    with pytest.raises(ValueError, match=r"beta does not apply to method 'pgd-at' \(it applies to trades, mart\)"):
        build_method("pgd-at", beta=1.0)
    with pytest.raises(ValueError, match="method must be one of standard, pgd-at, trades, mart, gairat, bat, got 'fgsm-at'"):
        build_method("fgsm-at")
    with pytest.raises(ValueError, match="eps does not apply to method 'standard'"):
        build_method("standard", eps=0.3)


# ----------------------------------------------------------------------------- BatchNorm


class _BNNet(torch.nn.Module):
    """Tiny BatchNorm net whose output depends strongly on batch vs running statistics."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _bn_setup():
    torch.manual_seed(0)
    net = _BNNet()
    with torch.no_grad():  # running statistics far from any batch's
        net.bn.running_mean.fill_(3.0)
        net.bn.running_var.fill_(9.0)
    return net.train(), torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))


def _bn_state(net):
    return [t.clone() for t in (net.bn.running_mean, net.bn.running_var, net.bn.num_batches_tracked)]


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_training_attack_batchnorm_convention(mode):
    """attack_bn='eval' attacks the network with its running statistics, 'train' with batch
    statistics; either way the attack leaves the running statistics untouched and the model
    in train mode."""
    net, x, y = _bn_setup()
    method = build_method("pgd-at", eps=0.2, pgd_steps=3, eps_warmup=0.0, attack_bn=mode)
    before = _bn_state(net)
    x_adv = method.pgd(net, x, y, _batch(seed=5))
    assert net.training and all(torch.equal(a, b) for a, b in zip(before, _bn_state(net)))
    # the same attack by hand on a copy set to the mode the convention names
    reference = _BNNet()
    reference.load_state_dict(net.state_dict())
    reference.train(mode == "train")
    g = torch.Generator().manual_seed(5)
    x0 = project(x + (torch.rand(x.shape, generator=g) * 2 - 1) * 0.2, x, 0.2, "linf")
    torch.testing.assert_close(x_adv, pgd(reference, x, y, ce, 0.2, method.alpha, 3, "linf", x0))
    other = build_method("pgd-at", eps=0.2, pgd_steps=3, eps_warmup=0.0,
                         attack_bn="train" if mode == "eval" else "eval").pgd(net, x, y, _batch(seed=5))
    assert not torch.allclose(x_adv, other)  # the two conventions really differ on this net


def test_gair_weights_equal_the_official_formula():
    """GAIR (official GAIRAT.py) on a tiny batch, 10 steps, Lambda -1: half = 5 and
    z = -1 + (5 - kappa) * 5 / 5 = 4 - kappa, weights normalised to mean 1."""
    kappa = torch.tensor([0.0, 5.0, 10.0])
    z = torch.tensor([4.0, -1.0, -6.0])
    for function, raw in (("tanh", (z.tanh() + 1) / 2), ("sigmoid", z.sigmoid()),
                          ("discrete", (11 - kappa) / 11)):
        got = gair_weights(kappa, 10, -1.0, function)
        torch.testing.assert_close(got, raw * 3 / raw.sum())
        assert float(got.mean()) == pytest.approx(1.0)
    tanh = gair_weights(kappa, 10, -1.0)
    assert tanh[0] > tanh[1] > tanh[2]  # flipped at once (kappa 0) weighs most
    # numbers by hand: tanh(4) = 0.999329, tanh(-1) = -0.761594, tanh(-6) = -0.999988
    raw = torch.tensor([(0.999329 + 1) / 2, (1 - 0.761594) / 2, (1 - 0.999988) / 2])
    torch.testing.assert_close(tanh, raw * 3 / raw.sum(), atol=1e-5, rtol=1e-5)


def _official_ga_pgd(model, x, y, eps, step_size, steps, x0):
    """The official GA_PGD loop (category Madry, eval mode): Kappa counts the iterates the
    model classifies correctly, checked before every step."""
    kappa = torch.zeros(len(x))
    x_adv = x0.clone()
    for _ in range(steps):
        x_adv.requires_grad_()
        output = model(x_adv)
        kappa += (output.argmax(1) == y).float()
        loss = F.cross_entropy(output, y)
        (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv, kappa


def test_gairat_loss_is_the_official_weighted_loss():
    model, x, y, method = _setup("gairat", eps=0.3, gair_burnin=0.0)
    model.eval()  # so the official loop sees the same function
    gen = torch.Generator().manual_seed(5)
    x0 = project(x + (torch.rand(x.shape, generator=gen) * 2 - 1) * 0.3, x, 0.3, "linf")
    x_adv, kappa = _official_ga_pgd(model, x, y, 0.3, method.alpha, 5, x0)
    assert 0 < kappa.sum() < 5 * len(y)  # some samples flip, not all at once
    out = method.loss(model, x, y, Batch(None, 0, 0.5, [torch.Generator().manual_seed(5)], False))
    torch.testing.assert_close(out.per_sample, F.cross_entropy(model(x_adv), y, reduction="none"))
    torch.testing.assert_close(out.weight, gair_weights(kappa, 5, -1.0))
    official = (F.cross_entropy(model(x_adv), y, reduction="none") * gair_weights(kappa, 5, -1.0)).mean()
    torch.testing.assert_close(weighted_mean(out.per_sample, out.weight), official)
    # before the burn-in ends it is PGD-AT: no weights
    burn = build_method("gairat", eps=0.3, pgd_steps=5, eps_warmup=0.0)
    assert burn.loss(model, x, y, Batch(None, 0, 0.4, [torch.Generator().manual_seed(5)], False)).weight is None
