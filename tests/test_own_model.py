"""A user's own model: the registry, MODULE:FUNCTION specs that only the user's call imports,
digests that refuse another model, torch.func stacks of any module (BatchNorm + residual),
and the recipe's AdamW / cosine / label smoothing / fp16."""

import functools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import user_models
from memtool.engine import fit
from memtool.ensemble import FuncEnsemble
from memtool.models import (ModelSpecError, check_output, create_model, model_digest, register_model,
                            registered_factory, resolve_model)
from memtool.recipe import Recipe, lr_at

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples import mynets  # noqa: E402  (the user's networks)

N = 240


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(N, 1, 8, 8, generator=g), torch.randint(0, 10, (N,), generator=g)


def _subsets(k=3, m=160):
    rng = np.random.default_rng(0)
    return [np.sort(rng.choice(N, m, replace=False)) for _ in range(k)]


def _recipe(method="standard", **kw):
    adv = {} if method == "standard" else dict(eps=0.1, pgd_steps=2)
    base = dict(model=functools.partial(mynets.bn_cnn, width=8), epochs=2, batch_size=40, lr=0.05, schedule="onecycle", method=method)
    return Recipe.from_flat(**{**base, **adv, **kw})


@pytest.mark.parametrize("method,attack_bn", [("standard", None), ("pgd-at", "eval"), ("pgd-at", "train")])
def test_func_stack_of_a_batchnorm_resnet_equals_separate_runs(method, attack_bn):
    """Any module stacks through torch.func: K BN + residual networks trained as one vmap
    stack equal K one-at-a-time runs, logits and per-model running statistics, clean and
    under PGD (attack in eval mode, and in train mode with the statistics restored)."""
    x, y = _data()
    r = _recipe(method, **({} if attack_bn is None else {"attack_bn": attack_bn}))
    stacked = fit(r, x, y, _subsets(), [11, 22, 33], num_classes=10, ensemble_size=3)
    single = fit(r, x, y, _subsets(), [11, 22, 33], num_classes=10, ensemble_size=1)
    assert isinstance(stacked.stacks[0][1], FuncEnsemble) and len(single.stacks) == 3
    torch.testing.assert_close(stacked.margins(x, y), single.margins(x, y), atol=1e-4, rtol=1e-4)
    # PGD's sign steps can flip where a gradient component is at rounding level: 1e-3-sized margin differences
    torch.testing.assert_close(stacked.margins(x, y, robust=0.1), single.margins(x, y, robust=0.1),
                               atol=5e-3, rtol=5e-3)
    for k in range(3):
        a, b = stacked[k].state_dict(), single[k].state_dict()
        assert a["block.bn1.running_mean"].abs().sum() > 0  # the statistics moved during training
        for name in a:
            torch.testing.assert_close(a[name].float(), b[name].float(), atol=1e-4, rtol=1e-4)


def test_default_stacks_user_models_only_where_asked_on_cpu():
    x, y = _data()
    models = fit(_recipe(epochs=1), x, y, _subsets(2), [1, 2], num_classes=10)
    assert len(models.stacks) == 2  # one at a time: vmap stacks of conv nets are slower on a CPU


@pytest.fixture
def tiny():
    """A registered user model, removed from the registry afterwards."""
    from memtool import models

    @register_model(name="test-tiny")
    def tiny(in_shape, num_classes, width=4):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes))

    yield tiny
    models._REGISTRY.pop("test-tiny")


def test_registry_and_specs_name_the_problem(tiny):
    assert registered_factory("test-tiny") is tiny
    assert Recipe(model=tiny).model == "test-tiny"  # a registered factory is recorded by its name
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda s, c: None, name="test-tiny")
    assert resolve_model("examples.mynets:bn_cnn") is mynets.bn_cnn
    net = create_model("cnn", (1, 8, 8), 10)
    check_output(net, "cnn", (1, 8, 8), 10)
    for spec, message in [("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
                          ("user_models:nothing", "has no attribute 'nothing'"),
                          ("user_models:not_callable", "is not callable"),
                          ("bad spec!", "MODULE:FUNCTION")]:
        with pytest.raises(ModelSpecError, match=message):
            resolve_model(spec)
    with pytest.raises(ModelSpecError, match=r"raised RuntimeError: out of ideas"):
        create_model(user_models.raises, (1, 8, 8), 10)
    with pytest.raises(ModelSpecError, match="no parameters"):
        create_model(user_models.no_parameters, (1, 8, 8), 10)
    with pytest.raises(ModelSpecError, match=r"gave output \(2, 11\); it must return logits of shape \(batch, 10\)"):
        check_output(create_model(user_models.wrong_output, (1, 8, 8), 10), "wrong_output", (1, 8, 8), 10)


def test_a_spec_read_back_is_never_imported():
    """A recipe from a run directory names user code; building it asks the user to name it."""
    r = Recipe.from_dict(_recipe(model=mynets.bn_cnn).to_dict())
    assert r.model == "examples.mynets:bn_cnn" and r.factory is None and "factory" not in r.to_dict()
    with pytest.raises(ModelSpecError, match="never imports code named in a run directory.*--model examples.mynets:bn_cnn"):
        r.build((1, 8, 8), 10)
    net = r.with_factory(mynets.bn_cnn).build((1, 8, 8), 10)
    assert model_digest(net) == model_digest(mynets.bn_cnn((1, 8, 8), 10))
    assert model_digest(net) != model_digest(mynets.bn_cnn((1, 8, 8), 10, width=4))
    with pytest.raises(ModelSpecError, match=r"model given \(examples.mynets:tabular_mlp\).*\(examples.mynets:bn_cnn\)"):
        r.with_factory(mynets.tabular_mlp)


def test_model_kwargs_reach_the_factory():
    r = Recipe(model="examples.mynets:bn_cnn", model_kwargs='{"width": 4}').with_factory(mynets.bn_cnn)
    assert r.model_kwargs == {"width": 4} and r.build((1, 8, 8), 10).fc.in_features == 4
    with pytest.raises(ValueError, match="model_kwargs must be a JSON object"):
        Recipe(model_kwargs="{width: 4}")


def test_cosine_schedule_and_adamw():
    assert lr_at("cosine", 0.1, 0, 100) == pytest.approx(0.1)
    assert lr_at("cosine", 0.1, 50, 100) == pytest.approx(0.05)
    assert lr_at("cosine", 0.1, 100, 100) == pytest.approx(0.0)
    p = nn.Parameter(torch.ones(3))
    opt = Recipe(optimizer="adamw", weight_decay=0.5, lr=0.1).make_optimizer([p])
    assert isinstance(opt, torch.optim.AdamW)
    p.grad = torch.zeros(3)
    opt.step()  # zero gradient: only the decoupled decay moves the weights, by lr * wd
    torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 0.1 * 0.5))


def test_label_smoothing_changes_only_the_training_loss():
    x, y = _data()
    plain = fit(Recipe(model="mlp", hidden=16, epochs=1, batch_size=40), x, y, _subsets(1), [5], num_classes=10)
    smooth = fit(Recipe(model="mlp", hidden=16, epochs=1, batch_size=40, label_smoothing=0.2), x, y, _subsets(1), [5],
                 num_classes=10)
    assert not torch.allclose(plain.margins(x, y), smooth.margins(x, y))
    with pytest.raises(ValueError, match="label_smoothing applies to .* not to trades"):
        Recipe.from_flat(method="trades", label_smoothing=0.1)


def test_fp16_with_a_gradient_scaler_trains():
    x, y = _data()
    m = fit(Recipe(model="mlp", hidden=16, epochs=3, batch_size=40, precision="fp16"), x, y, _subsets(1), [5],
            num_classes=10)
    assert torch.isfinite(m.margins(x, y)).all()


def test_a_spec_naming_the_builtin_mlp_takes_the_builtin_path():
    """--model memtool.models:mlp is the registered mlp: same name in run.json, same stacking
    default (bar B's hand-written ensemble), so the same cost."""
    from memtool.engine import default_ensemble_size
    from memtool.recipe import user_settings

    r = Recipe.from_flat(**user_settings({"model": "memtool.models:mlp"}))
    assert r.model == "mlp" and r.to_dict() == Recipe(model="mlp").to_dict()
    assert default_ensemble_size(r, "cpu", 784) == default_ensemble_size(Recipe(model="mlp"), "cpu", 784) == 16


def test_factories_a_run_cannot_name_and_errors_inside_the_users_module_are_told_apart(tmp_path, monkeypatch):
    with pytest.raises(ModelSpecError, match="a lambda or nested function has no name a run can record"):
        Recipe(model=lambda in_shape, num_classes: nn.Linear(4, num_classes))
    with pytest.raises(ModelSpecError, match="not a built Linear: every model is trained from a fresh one"):
        Recipe(model=nn.Linear(4, 3))
    (tmp_path / "broken_user_module.py").write_text("import no_such_dependency_xyz\n\ndef build(s, c):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelSpecError, match="No module named 'no_such_dependency_xyz'.*the error is inside that module"):
        resolve_model("broken_user_module:build")
    with pytest.raises(ModelSpecError, match="is it in the current directory"):
        resolve_model("no_such_module_xyz:build")


def test_plain_weights_with_factory_kwargs_or_from_data_parallel_load_and_misfits_say_why(tmp_path, monkeypatch, capsys):
    from memtool.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    common = ["evaluate", "--model", "examples.mynets:tabular_mlp", "--dataset", "examples.mynets:breast_cancer",
              "--attacks", "clean", "--quiet"]
    net = mynets.tabular_mlp((30,), 2, hidden=8)
    torch.save(net.state_dict(), tmp_path / "w8.pt")
    torch.save(nn.DataParallel(net).state_dict(), tmp_path / "dp.pt")  # keys module.0.weight, ...
    torch.save(net, tmp_path / "whole.pt")
    kw8 = ["--model-kwargs", '{"hidden": 8}']
    assert main(common + kw8 + ["--weights", str(tmp_path / "w8.pt"), "--out", str(tmp_path / "e1")]) == 0
    assert main(common + kw8 + ["--weights", str(tmp_path / "dp.pt"), "--out", str(tmp_path / "e2")]) == 0
    a, b = (__import__("json").loads((tmp_path / e / "summary.json").read_text()) for e in ("e1", "e2"))
    assert a["attacks"]["clean"]["n_correct"] == b["attacks"]["clean"]["n_correct"]
    assert main(common + ["--weights", str(tmp_path / "w8.pt"), "--out", str(tmp_path / "e3")]) == 2
    err = capsys.readouterr().err  # the default hidden=64: which tensors misfit, not only the first line
    assert "size mismatch for 0.weight" in err and "torch.Size([8, 30])" in err
    assert main(common + ["--weights", str(tmp_path / "whole.pt"), "--out", str(tmp_path / "e4")]) == 2
    assert "save the network's model.state_dict(), not the module" in capsys.readouterr().err
