"""`memtool figures --config`: every stage, resumable, nothing trained twice, a manifest."""

import hashlib
import json

import numpy as np
import pytest

from memtool import engine
from memtool.cli import main

TINY = """\
name: tiny
description: digits, everything at toy size
runs: {runs}
estimate: {{dataset: digits, trials: 8, model: mlp, hidden: 64, epochs: 10, batch_size: 32, lr: 0.1}}
robust_estimate: {{trials: 4, method: pgd-at, eps: 0.1, pgd_steps: 2}}
validate: {{seeds: 2}}
validate_transfer: {{seeds: 2, recipe: {{model: mlp, hidden: 16, epochs: 4}}}}
finding_a: {{seeds: 2, eps: 0.1, pgd_steps: 2, recipe: {{model: mlp, hidden: 32, epochs: 4, batch_size: 64}}}}
finding_b: {{seeds: 2, eps: 0.1, pgd_steps: 2, fractions: [0.5], recipe: {{model: mlp, hidden: 48, epochs: 4}}}}
bat_comparison: {{seeds: 2, eps: 0.1, pgd_steps: 2, variants: [standard, pgd-at, bat], aa_samples: 20,
                  recipe: {{model: mlp, hidden: 32, epochs: 4, batch_size: 64}}}}
"""


def _model_ids(recipe, subsets, seeds):
    key = json.dumps(recipe.to_dict(), sort_keys=True)
    return [hashlib.sha1(f"{key}|{s}|{np.asarray(sub).tobytes().hex()}".encode()).hexdigest()
            for sub, s in zip(subsets, seeds)]


def test_interrupted_pipeline_resumes_and_trains_nothing_twice(tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(runs=tmp_path / "runs"))
    trained, real = [], engine.train_stack
    calls = {"n": 0}

    def recording(recipe, x, y, subsets, seeds, **kw):
        calls["n"] += 1
        if calls["n"] == 12:  # somewhere in the findings
            raise KeyboardInterrupt
        model = real(recipe, x, y, subsets, seeds, **kw)
        trained.extend(_model_ids(recipe, subsets, seeds))
        return model

    monkeypatch.setattr(engine, "train_stack", recording)
    out = tmp_path / "figures"
    assert main(["figures", "--config", str(config), "--out", str(out), "--quiet"]) == 130
    first = len(trained)
    assert main(["figures", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    assert len(trained) > first and len(trained) == len(set(trained))  # resumed, and no model trained twice
    assert main(["figures", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    assert len(trained) == len(set(trained))  # a finished pipeline trains nothing
    names = {p.name for p in (out / "tiny").iterdir()}
    for f in ["mem_hist.png", "most_memorized.png", "most_memorized_by_class.png", "mem_distributions.png",
              "validate.png", "validate.md", "finding_a.png", "finding_a.md", "finding_a.parquet", "finding_b.png",
              "bat_comparison.png", "bat_comparison.md", "bat_comparison.parquet", "manifest.json"]:
        assert f in names and (out / "tiny" / f).stat().st_size > 0, f
    assert not any(n.endswith(".npz") for n in names)  # per-model records stay in the runs folder
    manifest = json.loads((out / "tiny" / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["estimate", "validate", "validate_transfer", "finding_a", "finding_b",
                                        "bat_comparison", "robust_estimate"]
    transfer = (out / "tiny" / "validate_transfer.md").read_text()  # validate's files, under the stage's name
    assert "hidden 16" in transfer and "(not the run's recipe)" in transfer
    assert "not the run's recipe" not in (out / "tiny" / "validate.md").read_text()
    records = out / "tiny" / "records" / "bat_comparison"  # every evaluated model's robustbench.json
    assert "records/bat_comparison" in manifest["stages"]["bat_comparison"]["files"]
    assert {p.name for p in records.iterdir()} == {f"{v}-s{s}.{sub}.json" for v in ("standard", "pgd-at", "bat")
                                                   for s in (0, 1) for sub in ("eval", "autoattack")}
    rec = json.loads((records / "bat-s1.autoattack.json").read_text())
    model = tmp_path / "runs" / "tiny" / "bat_comparison" / "models" / "bat-s1"
    assert rec["method"] == "bat" and rec["n_test_samples"] == 20
    assert rec == json.loads((model / "autoattack" / "robustbench.json").read_text())
    assert manifest["command"].startswith("memtool figures --config")
    row = manifest["stages"]["finding_a"]
    assert row["files"] == ["finding_a.png", "finding_a.md", "finding_a.parquet"] and "digits" in row["data"]
    # the invocations that trained its models, as their records keep it (the third re-read them)
    assert row["invocations"] >= 1 and row["wall_s"] > 0 and "torch thread" in row["load"]
    work = tmp_path / "runs" / "tiny" / "finding_a"
    from memtool.manifest import stage_cost

    assert {k: row[k] for k in ("wall_s", "process_s", "invocations", "load")} == stage_cost(work)
    # an estimate counts the invocations that trained trials, not those that re-read a finished run
    assert manifest["stages"]["estimate"]["invocations"] == manifest["stages"]["robust_estimate"]["invocations"] == 1
    _check_headlines_against_tables(out / "tiny", manifest)
    from memtool.manifest import render_index

    index = (out / "README.md").read_text()
    assert index == render_index(out) and "[validate.png](tiny/validate.png)" in index


def _check_headlines_against_tables(dest, manifest):
    """The manifest's headline numbers are the tables' own, looked up here with plain pandas."""
    import pandas as pd

    def row(stage, **where):
        t = pd.read_parquet(dest / f"{stage}.parquet")
        for k, v in where.items():
            t = t[t[k] == v]
        return t.iloc[-1]

    heads = {s: {h["label"]: h for h in r["headline"]} for s, r in manifest["stages"].items()}
    v = row("validate", variant="without high-influence", group="influenced test samples")
    h = heads["validate"]["retrained without the high-influence training samples, on their test samples"]
    assert (h["value"], h["low"], h["high"]) == pytest.approx((v["diff"], v["diff_low"], v["diff_high"]), abs=1e-6)
    a = row("finding_a", method="AT", variant="without atypical", group="atypical test", metric="robust")
    assert heads["finding_a"]["(a) AT without the atypical training samples: robust, atypical test"]["value"] == \
        pytest.approx(a["diff"], abs=1e-6)
    b = row("finding_b", removed="harmful", group="typical test", metric="robust")
    label = "(b) AT without the harmful atypical samples (largest fraction): robust, typical test"
    assert heads["finding_b"][label]["value"] == pytest.approx(b["diff"], abs=1e-6)
    c = row("bat_comparison", variant="bat", group="all test", metric="autoattack")
    assert heads["bat_comparison"]["BAT: AutoAttack"]["value"] == pytest.approx(c["accuracy"], abs=1e-6)
    assert heads["estimate"]["n_trials"]["value"] == 8


def test_bad_config_is_named(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("name: x\nestimate: {dataset: digits}\nfinding_c: {}\n")
    assert main(["figures", "--config", str(config), "--out", str(tmp_path / "f")]) == 2
    assert "unknown section(s) ['finding_c']" in capsys.readouterr().err
    assert main(["figures", "--out", str(tmp_path / "f")]) == 2
    capsys.readouterr()
    config.write_text("name: x\nestimate:\n  dataset: [mnist\n")  # malformed YAML: one line, file and place
    assert main(["figures", "--config", str(config), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{config} is not valid YAML (line 4, column 1)" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["reference-mnist", "reference-fashion-mnist", "regime-mnist", "paper-cifar100",
                                  "paper-tiny-imagenet"])
def test_shipped_configs_parse(name):
    from pathlib import Path

    from memtool import pipeline

    cfg = pipeline.load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    from memtool.estimator import EstimateConfig
    from memtool.estimator.run import Execution
    from memtool.config import flatten_settings, split_settings

    from memtool.estimator.tables import Thresholds

    ex, th, rest = split_settings(flatten_settings(cfg["estimate"]), Execution, Thresholds)
    EstimateConfig.from_kwargs(**rest)
    Execution(**ex)
    if name.startswith(("reference-", "regime-")):  # committed F&Z tables: reused only under the rule that made them
        assert Thresholds(**th).pairs == "fz"
    from memtool.recipe import Recipe

    for stage in ("finding_a", "finding_b", "bat_comparison"):  # the recipes the stages retrain with
        if "recipe" in (cfg.get(stage) or {}):
            Recipe.from_flat(**flatten_settings({"recipe": cfg[stage]["recipe"]}))


def test_paper_config_runs_shrunk_on_a_tiny_synthetic_cifar100(tmp_path, capsys):
    """configs/paper-cifar100.yaml unchanged but for size: PreAct-ResNet-18, augmentation,
    bf16 autocast, data from a folder in the real binary format."""
    import yaml

    folder = tmp_path / "data" / "cifar-100-binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", 40), ("test.bin", 12)):
        labels = rng.integers(0, 100, (n, 2))
        rec = np.concatenate([labels, rng.integers(0, 256, (n, 3072))], 1).astype(np.uint8)
        (folder / name).write_bytes(rec.tobytes())
    from pathlib import Path

    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "paper-cifar100.yaml").read_text())
    cfg["runs"] = str(tmp_path / "runs")
    cfg["estimate"].update(trials=2, epochs=1, batch_size=16)
    cfg["finding_a"].update(seeds=1, pgd_steps=1, recipe={**{k: cfg["estimate"][k] for k in (
        "model", "batch_size", "lr", "schedule", "precision")}, "epochs": 1})
    # no AutoAttack here: a ResNet's on a CPU takes minutes (its path: tests/test_bat_comparison.py)
    cfg["bat_comparison"].update(seeds=1, pgd_steps=1, variants=["pgd-at", "bat"], aa_samples=4, aa_variants=[],
                                 recipe={**cfg["bat_comparison"]["recipe"], "epochs": 1, "batch_size": 16})
    for stage in ("validate", "finding_b"):  # need high-influence pairs / atypical samples: none at this size
        cfg.pop(stage)
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["figures", "--config", str(config), "--out", str(tmp_path / "figs"), "--quiet",
                 "--data-root", str(tmp_path / "data")]) == 0
    run = json.loads((tmp_path / "runs" / "cifar100" / "estimate" / "run.json").read_text())
    recipe = run["config"]["recipe"]
    assert recipe["model"] == "preact-resnet18" and recipe["augment"] is True and recipe["precision"] == "bf16"
    assert (tmp_path / "figs" / "cifar100" / "finding_a.png").stat().st_size > 0
    bat = json.loads((tmp_path / "runs" / "cifar100" / "bat_comparison" / "models" / "bat-s0" / "config.json").read_text())
    method = bat["config"]["recipe"]["method"]
    assert method["name"] == "bat" and method["eps"] == pytest.approx(8 / 255)
    assert bat["config"]["recipe"]["model"] == "preact-resnet18" and bat["config"]["recipe"]["augment"] is True
    assert (tmp_path / "figs" / "cifar100" / "bat_comparison.png").stat().st_size > 0


@pytest.mark.slow
def test_paper_tiny_imagenet_config_runs_shrunk(tmp_path):
    """configs/paper-tiny-imagenet.yaml unchanged but for size, on a synthetic folder."""
    from pathlib import Path

    import yaml
    from test_datasets import write_tiny_imagenet

    write_tiny_imagenet(tmp_path / "data", classes=4, per_class=6, val=8)
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "paper-tiny-imagenet.yaml").read_text())
    cfg["runs"] = str(tmp_path / "runs")
    cfg["estimate"].update(trials=2, epochs=1, batch_size=8)
    # no AutoAttack here: a ResNet's on a CPU takes minutes (its path: tests/test_bat_comparison.py)
    cfg["bat_comparison"].update(seeds=1, pgd_steps=1, variants=["pgd-at", "bat"], aa_samples=4, aa_variants=[],
                                 recipe={**cfg["bat_comparison"]["recipe"], "epochs": 1, "batch_size": 8})
    for stage in ("validate", "finding_a", "finding_b"):
        cfg.pop(stage)
    config = tmp_path / "paper.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["figures", "--config", str(config), "--out", str(tmp_path / "figs"), "--quiet",
                 "--data-root", str(tmp_path / "data")]) == 0
    bat = json.loads((tmp_path / "runs" / "tiny-imagenet" / "bat_comparison" / "models" / "bat-s0" / "config.json")
                     .read_text())
    assert bat["dataset"]["image_shape"] == [3, 64, 64] and bat["config"]["recipe"]["augment"] is True
    assert (tmp_path / "figs" / "tiny-imagenet" / "bat_comparison.png").stat().st_size > 0


def test_a_fresh_clone_reads_the_committed_reference_instead_of_estimating(tmp_path, monkeypatch):
    """configs/X.yaml with references/NAME/ beside it (run.json, labels, tables; no trials):
    `--stages validate` retrains only validate's models and never an estimator trial; a
    reference of other settings is not used."""
    import shutil

    from memtool import estimate
    from memtool.config import flatten_settings
    from memtool.pipeline import committed_reference

    est = {"dataset": "digits", "trials": 4, "model": "mlp", "hidden": 32, "epochs": 5, "batch_size": 32, "lr": 0.1}
    estimate(tmp_path / "made", progress=False, **est)
    (tmp_path / "configs").mkdir()
    ref = tmp_path / "references" / "tiny"
    ref.mkdir(parents=True)
    for f in ("run.json", "labels.npz", "scores.parquet", "influence.parquet"):
        shutil.copyfile(tmp_path / "made" / f, ref / f)
    config = tmp_path / "configs" / "tiny.yaml"
    config.write_text(f"name: tiny\nruns: {tmp_path / 'runs'}\nrecords: {tmp_path / 'references'}\n"
                      f"estimate: {json.dumps(est)}\nvalidate: {{seeds: 1}}\nfinding_a: {{seeds: 1}}\n")
    calls = []
    real = engine.train_stack
    monkeypatch.setattr(engine, "train_stack", lambda *a, **kw: (calls.append(len(a[3])), real(*a, **kw))[1])
    assert main(["figures", "--config", str(config), "--out", str(tmp_path / "figures"), "--quiet",
                 "--stages", "validate"]) == 0
    assert len(calls) == 3 and not (tmp_path / "runs" / "tiny" / "estimate").exists()  # 3 variants x 1 seed
    manifest = json.loads((tmp_path / "figures" / "tiny" / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"estimate", "validate"} and "validate.md" in manifest["stages"]["validate"]["files"]
    # records: validate works in references/tiny/validate/ (committed): a clone without runs/ trains nothing
    assert len(list((ref / "validate" / "models").glob("*.npz"))) == 3 and not (tmp_path / "runs").exists()
    shutil.rmtree(tmp_path / "figures")
    assert main(["figures", "--config", str(config), "--out", str(tmp_path / "figures"), "--quiet",
                 "--stages", "validate"]) == 0
    assert len(calls) == 3 and (tmp_path / "figures" / "tiny" / "validate.md").read_text() == \
        (ref / "validate" / "validate.md").read_text()
    other = flatten_settings({**est, "epochs": 6})
    assert committed_reference(ref, other, tmp_path / "runs" / "tiny" / "estimate") is None
    assert committed_reference(ref, {**est, "trials": 8}, tmp_path / "x") is None  # more trials asked
    assert committed_reference(ref, {**est, "pairs": "fz"}, tmp_path / "x") is None  # tables of another pairs rule
    assert committed_reference(ref, {**est, "pairs": "probit"}, tmp_path / "x") is None
    assert committed_reference(ref, {**est, "pairs": "ash"}, tmp_path / "x") is not None  # the default made them
    # the robust estimate keeps its score tables (not its trials) in the records, and a clone reads them
    config.write_text(config.read_text() + "robust_estimate: {method: pgd-at, eps: 0.1, pgd_steps: 1, trials: 2}\n")
    assert main(["figures", "--config", str(config), "--out", str(tmp_path / "figures"), "--quiet",
                 "--stages", "robust_estimate"]) == 0
    kept = ref / "robust_estimate"
    assert sorted(p.name for p in kept.iterdir()) == ["cost", "influence.parquet", "labels.npz", "run.json",
                                                      "scores.parquet"]
    trained, row = len(calls), json.loads((tmp_path / "figures" / "tiny" / "manifest.json").read_text())["stages"]
    assert trained > 3 and row["robust_estimate"]["invocations"] == 1
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "figures" / "tiny" / "mem_distributions.png").unlink()
    assert main(["figures", "--config", str(config), "--out", str(tmp_path / "figures"), "--quiet",
                 "--stages", "robust_estimate"]) == 0
    assert len(calls) == trained and not (tmp_path / "runs").exists()  # read, not retrained
    assert (tmp_path / "figures" / "tiny" / "mem_distributions.png").stat().st_size > 0
    again = json.loads((tmp_path / "figures" / "tiny" / "manifest.json").read_text())["stages"]["robust_estimate"]
    assert {k: v for k, v in again.items() if k != "date"} == {k: v for k, v in row["robust_estimate"].items()
                                                              if k != "date"}  # the same headline and cost
    # tables of other thresholds are not this estimate's: trained again
    config.write_text(config.read_text().replace("trials: 2}", "trials: 2, mem_threshold: 0.3}"))
    assert main(["figures", "--config", str(config), "--out", str(tmp_path / "figures"), "--quiet",
                 "--stages", "robust_estimate"]) == 0
    assert len(calls) > trained and json.loads((kept / "run.json").read_text())["summary"]["mem_threshold"] == 0.3
    assert main(["figures", "--config", str(config), "--out", str(tmp_path / "f2"), "--stages", "nope"]) == 2


def test_score_cost_study_on_a_tiny_reference(tmp_path):
    """analyses.score_cost end to end at toy size: every kind of row, compute fractions that
    add up, the reference's split half against itself, the table, the figure, validate."""
    from analyses import score_cost
    from memtool import estimate

    est = {"dataset": "digits", "label_noise": 0.05, "model": "mlp", "hidden": 32, "epochs": 10, "batch_size": 32}
    estimate(tmp_path / "ref", trials=16, progress=False, **est)
    table = score_cost.run(tmp_path / "ref", tmp_path / "out", trials=(4, 8), seeds=(1, 2), hybrid_trials=(4,),
                           validate_seeds=1, progress=False)
    methods = table["method"].tolist()
    assert methods[0] == "reference split half (8 vs 8 trials)" and "subsampling, 8 trials" in methods
    assert "csl, 2 runs" in methods and any(m.startswith("hybrid: 4 trials") for m in methods)
    sub8 = table.set_index("method").loc["subsampling, 8 trials"]
    assert sub8["compute_fraction"] == pytest.approx(0.5) and 0 <= sub8["precision_at_k"] <= 1
    csl = table.set_index("method").loc["csl, 2 runs"]
    assert csl["compute_fraction"] == pytest.approx(2 * 1437 / (16 * round(0.7 * 1437)))
    for f in ("score_cost.md", "score_cost.png", "score_cost.parquet", "score_cost_validate.parquet"):
        assert (tmp_path / "out" / f).stat().st_size > 0


def test_figures_as_several_processes_starts_quiet_copies_and_waits_for_them(tmp_path, monkeypatch, capsys):
    """`--processes 3`: the estimate here alone first, then two quiet copies that run only the
    stages that claim their models (cores / 3 torch threads each) beside this one; a copy that
    failed fails the command, and an interrupt here interrupts the copies."""
    import signal
    import subprocess
    import sys

    import torch

    import memtool.pipeline

    started, code = [], {"exit": 0}

    class Copy:
        def __init__(self, cmd, env, **kw):
            self.cmd, self.env, self.kw, self.signals = cmd, env, kw, []
            started.append(self)

        def wait(self):
            return code["exit"]

        def send_signal(self, sig):
            self.signals.append(sig)

    runs = []
    monkeypatch.setattr(subprocess, "Popen", Copy)
    monkeypatch.setattr(memtool.pipeline, "make_figures", lambda *a, **kw: runs.append(kw["stages"]) or [])
    threads = torch.get_num_threads()
    argv = ["figures", "--config", "c.yaml", "--proc", "3", "--out", str(tmp_path), "--data-root", "/d",
            "--stages", "finding_a,score_cost"]  # --proc: argparse's abbreviation, the copies get none
    assert main(argv) == 0 and runs == [[], ["finding_a", "score_cost"]]  # the estimate alone, then the stages
    assert [c.cmd for c in started] == [[sys.executable, "-m", "memtool", "figures", "--config", "c.yaml", "--out",
                                         str(tmp_path), "--quiet", "--stages", "finding_a", "--data-root", "/d"]] * 2
    assert all(c.kw["start_new_session"] for c in started) and torch.get_num_threads() == threads
    cores = len(__import__("os").sched_getaffinity(0))
    assert started[0].env["OMP_NUM_THREADS"] == str(max(1, cores // 3))
    started.clear()
    assert main(argv[:-1] + ["score_cost"]) == 0 and not started  # nothing to share: no copies
    code["exit"] = 1
    assert main(argv) == 1 and "2 of the 2 helper processes failed" in capsys.readouterr().err
    started.clear()

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(memtool.pipeline, "make_figures", lambda *a, **kw: None if kw["stages"] == [] else
                        interrupted())
    assert main(argv) == 130 and [c.signals for c in started] == [[signal.SIGINT]] * 2
    assert main(["figures", "--config", "c.yaml", "--out", str(tmp_path), "--processes", "0"]) == 2
    assert main(["figures", "--index", str(tmp_path), "--processes", "2"]) == 2


def test_a_study_as_two_processes_trains_each_model_once(tmp_path):
    """The real thing, at toy size and with no estimate yet: `--processes 2` estimates here, then
    both processes retrain finding (a) and finding (b); every model is there, each trained once
    (a model file is written only when absent), and the stages' costs count both processes."""
    config = tmp_path / "tiny.yaml"
    recipe = "{model: mlp, hidden: 16, epochs: 3, batch_size: 32, lr: 0.1, schedule: constant}"
    config.write_text(f"name: tiny\nruns: {tmp_path / 'runs'}\nrecords: {tmp_path / 'records'}\n"
                      "estimate: {dataset: digits, trials: 8, model: mlp, hidden: 16, epochs: 3, batch_size: 32, "
                      "lr: 0.1, schedule: constant}\n"
                      f"finding_a: {{seeds: 2, eps: 0.1, pgd_steps: 1, recipe: {recipe}}}\n"
                      f"finding_b: {{seeds: 2, eps: 0.1, pgd_steps: 1, fractions: [0.5], recipe: {recipe}}}\n")
    assert main(["figures", "--config", str(config), "--out", str(tmp_path / "figs"), "--quiet", "--processes", "2"]) == 0
    rec = tmp_path / "records" / "tiny"
    assert len(list((rec / "finding_a").glob("*/models/*.npz"))) == 12 and (rec / "finding_b" / "harmfulness.parquet").exists()
    assert len(list((rec / "finding_b" / "AT" / "models").glob("*.npz"))) == 6
    manifest = json.loads((tmp_path / "figs" / "tiny" / "manifest.json").read_text())["stages"]
    assert set(manifest) == {"estimate", "finding_a", "finding_b"} and manifest["estimate"]["invocations"] == 1
