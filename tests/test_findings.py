"""The findings' analyses end to end at tiny size: schema, figures, resume."""

from pathlib import Path

import numpy as np
import pytest

from analyses import finding_a
from memtool.recipe import Recipe
from memtool.rundir import read_table

SMALL = Recipe(model="mlp", hidden=64, epochs=8, batch_size=64, lr=0.1)


def test_finding_a_tables_and_figure(digits_run, tmp_path):
    run, _ = digits_run
    out = tmp_path / "a"
    table = finding_a.run(run, out, seeds=2, eps=0.1, recipe=SMALL, pgd_steps=3, progress=False)
    assert set(table.method) == {"ST", "AT"} and set(table.metric) == {"clean", "robust"}
    assert set(table.group) == {"atypical test", "typical test", "atypical train", "typical train"}
    test = table[~table.group.str.endswith("train")]
    assert set(test.variant) == set(finding_a.VARIANTS) and (test.seeds == 2).all()
    assert test[["accuracy", "ci_low", "ci_high", "diff"]].notna().all().all()
    assert set(table[table.group == "atypical train"].variant) == {"full"}
    # AT is more robust than ST on the typical test samples (digits, eps 0.1)
    rob = test[(test.metric == "robust") & (test.variant == "full") & (test.group == "typical test")]
    assert rob.set_index("method").accuracy["AT"] > rob.set_index("method").accuracy["ST"]
    saved = read_table(out / "finding_a.parquet")
    assert saved.attrs["memtool"]["n_atypical_train"] > 0 and saved.attrs["memtool"]["eps"] == 0.1
    assert (out / "finding_a.png").stat().st_size > 0 and "## AT" in (out / "finding_a.md").read_text()
    # the contrasts are the table's paired differences, and their differences (means of paired differences)
    con = {c["contrast"]: c["diff"] for c in saved.attrs["memtool"]["contrasts"]}
    d = table[(table.variant == "without atypical") & (table.group == "atypical test")].set_index(["method", "metric"])["diff"]
    assert con["AT robust loss"] == pytest.approx(d["AT", "robust"]) and con["ST clean loss"] == pytest.approx(d["ST", "clean"])
    assert con["AT robust loss - ST clean loss"] == pytest.approx(d["AT", "robust"] - d["ST", "clean"])
    assert "## Contrasts on the atypical test samples" in (out / "finding_a.md").read_text()
    # the atypical training set is mem >= 0.25
    scores = read_table(run / "scores.parquet")
    tr = scores[scores.split == "train"]
    assert saved.attrs["memtool"]["n_atypical_train"] == int((tr["mem"] >= 0.25 - 1e-9).sum())
    assert np.isclose(table[table.variant == "full"]["diff"].dropna(), 0).all()
    # robust accuracy on the training samples: the full set's only (the removed sets' is never read)
    for variant, attacked in (("full", True), ("without_atypical", False), ("without_random", False)):
        with np.load(out / "AT" / "models" / f"{variant}-s0.npz") as z:
            assert ("train_robust_correct" in z.files) == attacked and "test_robust_correct" in z.files


def test_other_class_confidence_hand_computed():
    import torch

    from memtool.methods import other_class_confidence

    logits = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]).log()
    h = other_class_confidence(logits, torch.tensor([0, 2]))
    assert h.tolist() == pytest.approx([0.2, 0.6])  # sample 1: the true class (2) has 0.3, the others 0.1, 0.6


def test_finding_b_tables_and_figure(digits_run, tmp_path):
    from analyses import finding_b

    run, _ = digits_run
    out = tmp_path / "b"
    table = finding_b.run(run, out, seeds=2, eps=0.1, fractions=(0.25, 0.5), recipe=SMALL, pgd_steps=3,
                          judges=2, progress=False)
    harm = read_table(out / "harmfulness.parquet")
    n_atyp = read_table(out / "finding_b.parquet").attrs["memtool"]["n_atypical_train"]
    assert len(harm) == n_atyp and harm["h"].between(0, 1).all() and (harm["mem"] >= 0.25 - 1e-9).all()
    # h is the two judges' mean: judge 0 alone (its own seed, trained here again) is one of mean +- sd / sqrt(2)
    assert harm.attrs["memtool"]["judges"] == 2 and (harm["h_sd"] > 0).any()
    h0 = judge_alone(run, harm["sample_id"].to_numpy())
    d, half = h0 - harm["h"].to_numpy(), harm["h_sd"].to_numpy() / np.sqrt(2)
    assert np.minimum(abs(d - half), abs(d + half)).max() < 1e-4
    k1, k2 = round(0.25 * n_atyp), round(0.5 * n_atyp)
    assert set(table.variant) == {"full", f"harmful {k1}", f"random atypical {k1}", f"harmful {k2}",
                                  f"random atypical {k2}"}
    assert set(table.group) == {"typical test", "atypical test", "atypical train", "typical train"}
    assert (table.seeds == 2).all()
    train = table[table.group.str.endswith("train")]  # what each model fits: clean (nobody attacks its training set)
    assert set(train.metric) == {"clean"} and set(train.variant) == set(table.variant)
    assert (out / "finding_b.png").stat().st_size > 0
    # the decisive contrast: harmful minus random, per k, Holm-adjusted (p_holm >= p; the mean of the paired
    # differences is the difference of the two rows' differences to the full set)
    con = {c["contrast"]: c for c in read_table(out / "finding_b.parquet").attrs["memtool"]["contrasts"]}
    t = table[table.group == "typical test"].set_index(["variant", "metric"])["diff"]
    for k in (k1, k2):
        c = con[f"harmful {k} - random {k}: robust"]
        assert c["diff"] == pytest.approx(t[f"harmful {k}", "robust"] - t[f"random atypical {k}", "robust"])
        assert c["p_holm"] >= c["p"] or np.isnan(c["p"])
    # the harmful variants remove the samples with the highest h
    records = np.load(out / "AT" / "models" / f"harmful_{k1}-s0.npz")
    assert records["test_correct"].shape == (360,)
    assert "test_robust_correct" in records.files and "train_robust_correct" not in records.files  # nobody reads it
    top = harm.sort_values(["h", "sample_id"], ascending=[False, True])["sample_id"].to_numpy()[:k1]
    import json

    settings = json.loads((out / "AT" / "experiment.json").read_text())
    assert sorted(settings["variants"][f"harmful {k1}"]["excluded"]) == sorted(top.tolist())


def judge_alone(run, ids):
    """Judge 0's harmfulness of ``ids``, from one PGD-AT model trained alone (finding (b)'s recipe)."""
    from dataclasses import replace

    from analyses import finding_b
    from memtool.engine import fit
    from memtool.methods import PGDAT

    st = finding_b.load_study(run, 0.1, finding_b.Thresholds(), "cpu", None)
    data = st.data
    model = fit(replace(SMALL, method=PGDAT(eps=0.1, pgd_steps=3)), data.x_train, data.y_train,
                [np.arange(len(data.y_train))], [finding_b.judge_seed(st.config.seed, 0)],
                num_classes=data.num_classes)[0]
    probe = PGDAT(eps=0.1, pgd_steps=finding_b.EVAL_STEPS, eps_warmup=0.0)
    return finding_b.harmfulness(model, data.x_train[ids], data.y_train[ids], probe, st.config.seed)


def test_the_analyses_command_line_takes_recipe_flags_and_answers_bad_input_in_one_line(digits_run, tmp_path, capsys,
                                                                                         monkeypatch):
    from analyses.study import retraining_recipe

    run, _ = digits_run
    recipe = retraining_recipe(run, {"schedule": "onecycle", "epochs": 3})
    assert (recipe.schedule, recipe.epochs, recipe.model) == ("onecycle", 3, "mlp")  # the rest is the run's
    assert "note:" not in capsys.readouterr().err
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from examples import mynets
    assert retraining_recipe(run, {"model": "examples.mynets:tabular_mlp"}).factory is mynets.tabular_mlp  # imported
    capsys.readouterr()
    assert retraining_recipe(run, {}).schedule == "constant"  # the estimate's: said, since AT retrains with it
    assert "adversarial training is more reliable with --schedule onecycle" in capsys.readouterr().err
    for argv, message in (([str(run), "--eps", "-1"], "eps must be >= 0"),
                          ([str(tmp_path / "nothing")], "not a memtool run directory"),
                          ([str(run), "--lr", "0"], "lr must be > 0")):
        with pytest.raises(SystemExit) as e:
            finding_a.main(argv + ["--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
