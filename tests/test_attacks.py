"""Attacks: the threat model is respected, the settings are what the names say, and the
numbers agree with an independent implementation (torchattacks)."""

import numpy as np
import pytest
import torch
from torch import nn

from memtool.attacks import CW, FGSM, PGD, AutoAttack, build_attack, eval_mode, margin_loss
from memtool.attacks.base import attacked_logits, margins_from_logits
from memtool.datasets import load_dataset
from memtool.models import build_model


def _toy(seed=0, n=64):
    """An untrained model on 8x8 inputs with many pixels at exactly 0 or 1 (where clamping bites)."""
    torch.manual_seed(seed)
    model = build_model("mlp", (1, 8, 8), 10, 32)
    x = torch.rand(n, 1, 8, 8)
    x[x < 0.3], x[x > 0.7] = 0.0, 1.0
    return model, x, torch.randint(0, 10, (n,))


def _mnist_test(n):
    ds = load_dataset("mnist")
    return torch.from_numpy(ds.x_test[:n]).float() / 255, torch.from_numpy(ds.y_test[:n])


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_names_parse_into_settings():
    p = build_attack("pgd20", eps=0.3)
    assert isinstance(p, PGD) and (p.steps, p.norm, p.restarts) == (20, "linf", 1)
    assert p.alpha == pytest.approx(2.5 * 0.3 / 20)  # the default step size
    assert build_attack("pgd40-l2-r3", eps=1.5).describe() == {
        "attack": "pgd", "eps": 1.5, "steps": 40, "step_size": 2.5 * 1.5 / 40, "norm": "l2", "restarts": 3,
        "random_start": True, "loss": "ce"}
    cw = build_attack("cw20", eps=0.1)
    assert isinstance(cw, CW) and cw.describe()["loss"] == "margin" and cw.steps == 20
    assert build_attack("pgd10", eps=0.1, step_size=0.01).alpha == 0.01
    assert isinstance(build_attack("fgsm", eps=0.1), FGSM)
    assert build_attack("clean", eps=0.3).describe()["eps"] == 0.0
    aa = build_attack("autoattack", eps=8 / 255)
    assert isinstance(aa, AutoAttack) and aa.describe()["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    with pytest.raises(ValueError, match="'pgd'"):
        build_attack("pgd", eps=0.3)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        build_attack("pgd0", eps=0.3)
    with pytest.raises(ValueError, match="norm must be one of"):
        PGD(eps=0.3, norm="l1")
    with pytest.raises(ValueError, match="eps must be >= 0, got -0.1"):  # memtool.config's validators
        PGD(eps=-0.1)
    with pytest.raises(ValueError, match=r"step_size must be > 0 \(or None\), got 0"):
        PGD(eps=0.1, step_size=0)


@pytest.mark.parametrize("name", ["fgsm", "pgd10", "pgd5-r3", "cw10"])
@pytest.mark.parametrize("eps", [0.03, 0.3])
def test_linf_attacks_stay_in_the_eps_ball_and_the_unit_box(name, eps):
    model, x, y = _toy()
    x_adv = build_attack(name, eps, step_size=eps) if name != "fgsm" else build_attack(name, eps)
    x_adv = x_adv(model, x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > 0.5 * eps  # it did move


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_l2_pgd_stays_in_the_l2_ball_and_the_unit_box(eps):
    model, x, y = _toy(1)
    x_adv = PGD(eps=eps, steps=10, norm="l2", step_size=eps / 2)(model, x, y)
    norms = (x_adv - x).flatten(1).norm(dim=1)
    assert norms.max() <= eps * (1 + 1e-5)
    assert norms.max() > 0.5 * eps
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_model_is_attacked_in_eval_mode_and_its_mode_is_restored():
    seen = []
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.Linear(32, 10))
    model[3].register_forward_hook(lambda m, i, o: seen.append(m.training))
    model.train()
    model[2].eval()  # a mixed state must come back as it was
    _, x, y = _toy()
    PGD(eps=0.1, steps=3)(model, x, y)
    assert seen and not any(seen)
    assert model.training and model[3].training and not model[2].training
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model[3].training


def test_restarts_keep_the_restart_that_fools(mnist_at):
    """With the same seed, restart 1 of a 3-restart run is the 1-restart run; every sample it
    fooled stays fooled and later restarts only add fooled samples."""
    _, model = mnist_at
    x, y = _mnist_test(300)
    fooled = {}
    for r in (1, 3):
        torch.manual_seed(0)
        x_adv = PGD(eps=0.1, steps=5, restarts=r)(model, x, y)
        with torch.no_grad():
            fooled[r] = (model(x_adv).argmax(1) != y).numpy()
    assert (fooled[3] >= fooled[1]).all()
    assert fooled[3].sum() >= fooled[1].sum()


def test_pgd_agrees_with_torchattacks(mnist_at):
    """PGD-20 robust accuracy within 1.5 points of torchattacks.PGD with the same settings
    (eps, step size, steps, uniform random start) on 1000 MNIST test samples."""
    torchattacks = pytest.importorskip("torchattacks")
    _, model = mnist_at
    x, y = _mnist_test(1000)
    ours = PGD(eps=0.1, steps=20)
    torch.manual_seed(0)
    acc_ours = _accuracy(model, ours(model, x, y), y)
    torch.manual_seed(1)
    ref = torchattacks.PGD(model, eps=0.1, alpha=ours.alpha, steps=20, random_start=True)
    acc_ref = _accuracy(model, ref(x, y), y)
    assert abs(acc_ours - acc_ref) <= 0.015, (acc_ours, acc_ref)
    assert acc_ours < _accuracy(model, x, y) - 0.1  # and the attack does something


def test_cw_pushes_the_margin_down(mnist_at):
    _, model = mnist_at
    x, y = _mnist_test(300)
    torch.manual_seed(0)
    with torch.no_grad():
        m_clean = margins_from_logits(model(x), y)
        m_cw = margins_from_logits(model(CW(eps=0.1, steps=20)(model, x, y)), y)
        m_pgd = margins_from_logits(model(PGD(eps=0.1, steps=20)(model, x, y)), y)
    assert (m_cw <= m_clean + 1e-4).float().mean() > 0.99
    assert m_cw.mean() < m_pgd.mean()  # it optimizes the margin itself
    logits = torch.tensor([[2.0, 1.0, -1.0]])
    assert margin_loss(logits, torch.tensor([1])).item() == pytest.approx(1.0)


def test_a_stacked_model_is_attacked_model_by_model_with_its_own_generator():
    """PGD on a stacked model (a leading model axis, one generator per model) gives model k
    what attacking model k alone with generator k gives, and leaves the global RNG alone."""
    from memtool.ensemble import Ensemble

    def build():
        return build_model("mlp", (1, 8, 8), 10, 16)

    torch.manual_seed(0)
    members = [build() for _ in range(3)]
    stack = Ensemble(members, build)
    _, x, y = _toy(4, n=40)
    xs, ys = x.expand(3, *x.shape), y.expand(3, -1)
    attack = PGD(eps=0.1, steps=3)

    def gens():
        return [torch.Generator().manual_seed(s) for s in (7, 8, 9)]

    state = torch.get_rng_state()
    stacked = attacked_logits(attack, stack, xs, ys, gens())
    assert torch.equal(torch.get_rng_state(), state)
    for k, g in enumerate(gens()):
        torch.testing.assert_close(stacked[k], attacked_logits(attack, members[k], x, y, g), atol=1e-5, rtol=1e-5)
    assert not torch.equal(stacked[0], attacked_logits(attack, members[0], x, y, gens()[1]))  # the seed matters
    with pytest.raises(ValueError, match="L-inf PGD and one restart"):
        PGD(eps=0.1, restarts=2)(stack, xs, ys, gens())


def test_attacked_logits_refuses_examples_outside_the_threat_model(monkeypatch):
    model, x, y = _toy(5, n=8)
    monkeypatch.setattr(PGD, "perturb", lambda self, m, x, y, gen=None: (x + 2 * self.eps).clamp(0, 1))
    with pytest.raises(RuntimeError, match="attack pgd left the eps-ball"):
        attacked_logits(PGD(eps=0.1, steps=1), model, x, y)


def test_fgsm_is_one_full_step():
    model, x, y = _toy(2)
    x_adv = FGSM(eps=0.05)(model, x, y)
    moved = (x_adv - x).abs()
    inner = (x > 0.05) & (x < 0.95)
    # one signed step of size eps: every interior pixel with a nonzero gradient moved by eps exactly
    assert torch.allclose(moved[inner & (moved > 0)], torch.tensor(0.05), atol=1e-6)


@pytest.mark.slow
def test_autoattack_backends_are_in_the_ball_and_not_weaker_than_pgd(digits_at):
    """Both AutoAttack packages on a small digits model: inside the ball, at most PGD-20's accuracy.
    (The default suite runs AutoAttack once, in test_evaluate.py.)"""
    pytest.importorskip("pyautoattack")
    out, model = digits_at
    ds = load_dataset("digits")
    x, y = torch.from_numpy(ds.x_test[:64]).float() / 255, torch.from_numpy(ds.y_test[:64])
    torch.manual_seed(0)
    acc_pgd = _accuracy(model, PGD(eps=0.1, steps=20)(model, x, y), y)
    backends = ["pyautoattack"] + (["torchattacks"] if _has("torchattacks") else [])
    for backend in backends:
        x_adv = AutoAttack(eps=0.1, backend=backend)(model, x, y)
        assert (x_adv - x).abs().max() <= 0.1 + 1e-5 and x_adv.min() >= 0 and x_adv.max() <= 1
        assert _accuracy(model, x_adv, y) <= acc_pgd, backend
    assert model.training is False


def _has(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def test_unknown_autoattack_backend_is_named():
    with pytest.raises(ValueError, match="backend must be one of .* got 'foolbox'"):
        AutoAttack(eps=0.1, backend="foolbox")


def test_restarts_only_attack_samples_not_yet_fooled():
    calls = []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = build_model("mlp", (1, 8, 8), 10, 16)

        def forward(self, x):
            calls.append(len(x))
            return self.net(x)

    model, (_, x, y) = Counting(), _toy(3, n=32)
    torch.manual_seed(0)
    with torch.no_grad():
        y = model(x).argmax(1)  # all correct before the attack
    calls.clear()
    PGD(eps=1.0, steps=2, restarts=3)(model, x, y)  # eps 1: everything is fooled at once
    assert calls[:3] == [32, 32, 32]  # restart 1: two steps and the check of which samples it fooled
    assert np.sum(calls) < 3 * 3 * 32  # later restarts saw fewer samples (or none)


def test_apgd_is_the_standard_autoattacks_first_two_attacks():
    """apgd (APGD-CE + APGD-T, the standard budget, same seed) runs exactly the standard
    version's first two attacks: every sample standard AutoAttack leaves robust, apgd does too,
    and apgd is at most as strong as standard."""
    pytest.importorskip("pyautoattack")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    ds = load_dataset("digits")
    x, y = torch.from_numpy(ds.x_test[:24]).float() / 255, torch.from_numpy(ds.y_test[:24])
    with torch.no_grad():  # label the points by the model itself, so that some stay robust
        y = model(x).argmax(1)
    robust = {}
    for name in ("apgd", "autoattack"):
        attack = build_attack(name, eps=0.05)
        x_adv = attack(model, x, y)
        assert (x_adv - x).abs().max() <= 0.05 + 1e-5
        with torch.no_grad():
            robust[name] = model(x_adv).argmax(1) == y
    assert 0 < int(robust["autoattack"].sum()) and bool((robust["apgd"] | ~robust["autoattack"]).all())
    assert build_attack("apgd", eps=0.1).describe()["attacks"] == ["apgd-ce", "apgd-t"]
    with pytest.raises(ValueError, match="apgd version runs with backend pyautoattack only"):
        build_attack("apgd", eps=0.1, backend="torchattacks")
