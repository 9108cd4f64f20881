"""The BAT comparison end to end at tiny size, and its trade-off frontier by hand."""

import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analyses import bat_comparison as bc
from memtool.recipe import Recipe
from memtool.rundir import read_table

SMALL = Recipe(model="mlp", hidden=64, epochs=6, batch_size=64, lr=0.1)


def test_frontier_hand_computed():
    clean = np.array([0.99, 0.90, 0.80, 0.85])  # (0.85, 0.30) is dominated by (0.90, 0.35)
    robust = np.array([0.00, 0.35, 0.50, 0.30])
    assert bc.frontier(clean, robust, 0.945) == pytest.approx(0.175)  # half-way from (0.90, .35) to (0.99, 0)
    assert bc.frontier(clean, robust, 0.85) == pytest.approx(0.425)  # half-way from (0.80, .50) to (0.90, .35)
    assert bc.frontier(clean, robust, 0.70) == pytest.approx(0.50)  # flat beyond the most robust point


def test_frontier_gaps_paired_by_seed():
    rows = []
    for seed, shift in enumerate((0.0, 0.01, -0.01)):
        rows += [("standard", seed, 0.99, 0.0), ("pgd-at", seed, 0.80 + shift, 0.40 + shift),
                 ("bat", seed, 0.80 + shift, 0.45 + shift), ("bat worse", seed, 0.70 + shift, 0.30 + shift)]
    aa = pd.DataFrame(rows, columns=["variant", "seed", "clean", "autoattack"]).set_index(["variant", "seed"])
    gaps = bc.frontier_gaps(aa, ["bat", "bat worse"], baselines=("standard", "pgd-at")).set_index("variant")
    assert gaps.loc["bat", "gap"] == pytest.approx(0.05) and gaps.loc["bat", "verdict"] == "beyond the curve"
    assert gaps.loc["bat worse", "gap"] == pytest.approx(-0.10) and gaps.loc["bat worse", "verdict"] == "inside the curve"


def test_off_panel_names_the_points_far_from_the_robust_models():
    pts = {"standard": (97.3, 0.0), "pgd-at eps x0.5": (97.9, 3.3), "pgd-at eps x0.75": (97.4, 31.0),
           "pgd-at": (96.2, 75.0), "bat": (96.7, 75.0), "mart": (68.0, 35.9), "trades b=6": (94.1, 73.0)}
    assert bc.off_panel(pts) == ["standard", "pgd-at eps x0.5", "mart"]  # 18.75 robust, 82.4 clean the cut-offs
    assert bc.off_panel({"pgd-at": (80.0, 16.7), "trades b=1": (91.0, 5.3)}) == []  # 5.3 >= 16.7 / 4


def test_gap_interval_over_test_samples():
    """A copy of a frontier model is on the curve in every draw: (0, 0). A model robust on every
    sample, against a baseline robust on half of them at the same clean accuracy: gap 0.5, and
    the interval of 1 - (a bootstrap mean of half ones): 0.5 -+ 1.96 sqrt(0.25 / 400)."""
    n = 400
    rows = lambda v, rob, seed=0: pd.DataFrame({"variant": v, "seed": seed, "sample_id": np.arange(n),
                                                "clean": True, "autoattack": rob})
    half = np.arange(n) % 2 == 0
    samples = pd.concat([rows("standard", np.zeros(n, bool)), rows("pgd-at", half), rows("copy", half),
                         rows("bat", np.ones(n, bool)), rows("pgd-at", ~half, seed=1)])
    assert bc.gap_interval(samples, "copy", 0, ["standard", "pgd-at"], "autoattack") == (0.0, 0.0, 0.0)
    mean, lo, hi = bc.gap_interval(samples, "bat", 0, ["standard", "pgd-at"], "autoattack")
    assert mean == pytest.approx(0.5) and lo == pytest.approx(0.5 - 0.049, abs=0.005) and hi == pytest.approx(0.5 + 0.049, abs=0.005)
    # through frontier_gaps: one seed with every baseline: the samples' interval, and no verdict over seeds
    per_seed = samples.groupby(["variant", "seed"])[["clean", "autoattack"]].mean()
    g = bc.frontier_gaps(per_seed, ["bat"], samples=samples).iloc[0]
    assert g.seeds == 1 and (g.gap_low, g.gap_high) == (lo, hi) and g.verdict == "one seed: no interval over seeds"
    with pytest.raises(ValueError, match="different test samples"):
        bc.gap_interval(samples.iloc[1:], "bat", 0, ["standard", "pgd-at"], "autoattack")


def test_gap_interval_over_seeds_and_test_samples():
    """Every test sample alike within a seed, so the samples add nothing: the gap is 1 at seed 0
    (PGD-AT robust on none, BAT on all) and 0 at seed 1 (both on all), and the interval is the
    t-interval over the two seeds, 0.5 -+ 12.706 * 0.5. Seeds that agree (gap 1 at both) but
    samples that vary: the samples' interval, which the verdict reads: beyond the curve."""
    n = 50
    rows = lambda v, seed, rob: pd.DataFrame({"variant": v, "seed": seed, "sample_id": np.arange(n), "clean": True,
                                              "autoattack": rob if np.ndim(rob) else np.full(n, rob)})
    samples = pd.concat([rows("pgd-at", 0, False), rows("bat", 0, True), rows("pgd-at", 1, True), rows("bat", 1, True)])
    assert bc.gap_interval(samples, "bat", [0, 1], ["pgd-at"], "autoattack") == pytest.approx(
        (0.5, 0.5 - 6.353, 0.5 + 6.353), abs=1e-3)
    per_seed = samples.groupby(["variant", "seed"])[["clean", "autoattack"]].mean()
    g = bc.frontier_gaps(per_seed, ["bat"], baselines=("pgd-at",), samples=samples).iloc[0]
    assert g.seeds == 2 and g.gap == pytest.approx(0.5) and g.verdict == "on the curve (not resolved)"
    some = np.arange(n) % 5 == 0  # PGD-AT robust on a fifth of the samples, the same ones at both seeds
    agree = pd.concat([rows("pgd-at", s, some) for s in (0, 1)] + [rows("bat", s, True) for s in (0, 1)])
    per_seed = agree.groupby(["variant", "seed"])[["clean", "autoattack"]].mean()
    g = bc.frontier_gaps(per_seed, ["bat"], baselines=("pgd-at",), samples=agree).iloc[0]
    assert g.gap == pytest.approx(0.8) and g.gap_low == pytest.approx(0.8 - 1.96 * np.sqrt(0.16 / 50), abs=0.02)
    assert g.verdict == "beyond the curve"


def test_summary_intervals_pair_by_seed_and_sample_and_land_on_their_rows():
    """PGD-AT robust on the even test samples, BAT on those and on every other odd one, at two
    identical seeds (so only the test samples vary): BAT - PGD-AT is 1 on a quarter of the
    samples, and its interval, paired sample by sample, is 0.25 -+ 1.96 sqrt(0.1875 / 400); the
    unpaired one would be 1.96 sqrt(0.4375 / 400) wide. The typical group (ids < 200) gets its
    own; where the seeds differ (CW-20), it is wider."""
    from memtool.experiments import summarize

    n = 400
    ids = np.arange(n)
    pgd, bat = ids % 2 == 0, (ids % 2 == 0) | (ids % 4 == 1)
    rec = pd.concat([pd.DataFrame({"variant": v, "seed": s, "split": "test", "sample_id": ids, "apgd": ok,
                                   "cw20": ok if s == 0 else ok & (ids < 300)})
                     for s in (0, 1) for v, ok in (("pgd-at", pgd), ("bat", bat))])
    groups = {"all test": np.ones(n, bool), "typical test": ids < 200}
    out = summarize(rec, groups, baseline="pgd-at", metrics={"apgd": "apgd", "cw20": "cw20"}).set_index(
        ["variant", "group", "metric"])
    half = 1.96 * np.sqrt(0.1875 / 400)  # the samples' variance over 400: the two seeds are the same draw
    row = out.loc["bat", "all test", "apgd"]
    assert row["diff"] == pytest.approx(0.25)
    assert row["diff_low"] == pytest.approx(0.25 - half, abs=1e-4) and row["diff_high"] == pytest.approx(0.25 + half, abs=1e-4)
    assert row["ci_low"] == pytest.approx(0.75 - half, abs=1e-4)  # BAT's accuracy, 0.75
    typical = out.loc["bat", "typical test", "apgd"]
    assert typical["diff_high"] - typical["diff_low"] == pytest.approx(2 * 1.96 * np.sqrt(0.1875 / 200), abs=1e-3)
    assert out.loc["pgd-at", "all test", "apgd"]["diff_low"] == 0  # PGD-AT against itself: exactly 0
    cw = out.loc["bat", "all test", "cw20"]
    assert cw["diff_high"] - cw["diff_low"] > 2 * half  # the seeds differ


def test_zoom_shows_the_means_and_cuts_a_wide_interval_at_five_points():
    """Hand-computed: means 80 and 84; the second's interval (60 to 108, as two seeds give) is cut
    5 points beyond the means; a tight one is shown whole; a single seed (NaN bounds) is a point."""
    assert bc.zoom([(80.0, 79.0, 81.0), (84.0, 60.0, 108.0)], margin=1) == (74.0, 90.0)
    assert bc.zoom([(80.0, 79.0, 81.0), (84.0, 83.0, 86.0)], margin=1) == (78.0, 87.0)
    assert bc.zoom([(80.0, np.nan, np.nan), (84.0, 83.0, 85.0)], margin=0) == (80.0, 85.0)


def test_frontier_gaps_skip_seeds_without_every_baseline():
    """TRADES measured on seed 0 only: seeds 1 and 2 have no whole frontier, so only seed 0
    counts. There the frontier at clean 0.90 runs from PGD-AT (0.80, 0.50) to TRADES (0.95,
    0.30): 0.50 - 0.2 * 2/3; PGD-AT alone would give 0.50 (flat beyond its point)."""
    rows = [("trades", 0, 0.95, 0.30)]
    for seed in range(3):
        rows += [("pgd-at", seed, 0.80, 0.50), ("bat", seed, 0.90, 0.45)]
    aa = pd.DataFrame(rows, columns=["variant", "seed", "clean", "autoattack"]).set_index(["variant", "seed"])
    gap = bc.frontier_gaps(aa, ["bat"], baselines=("pgd-at", "trades")).set_index("variant").loc["bat"]
    assert gap["seeds"] == 1 and gap["gap"] == pytest.approx(0.45 - (0.50 - 0.2 * 2 / 3))
    assert gap["verdict"] == "one seed: no interval over seeds"


def test_shared_step_waits_for_a_model_another_process_holds(tmp_path, monkeypatch, capsys):
    """Several processes share a step through claims: a model another live process holds is
    skipped, waited for, and done here once that process is gone; every model once."""
    import json
    import socket
    import subprocess
    import sys
    import threading

    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)"])
    threading.Thread(target=owner.wait, daemon=True).start()  # reaped when it ends: then it is dead
    claims = tmp_path / "claims"
    claims.mkdir()
    (claims / "pgd-at-s0.train.claim").write_text(json.dumps({"host": socket.gethostname(), "pid": owner.pid,
                                                              "since": 0}))
    from memtool import sharing

    monkeypatch.setattr(sharing, "POLL_S", 0.05)
    done = []
    sharing.shared([("pgd-at", 0), ("bat", 0), ("pgd-at", 1)], "train", lambda j: done.append((j, owner.poll())),
                   claims, "train", name=lambda j: f"{j[0]}-s{j[1]}")
    assert capsys.readouterr().err.count("train: waiting for 1 model(s) other processes hold") == 1
    assert [j for j, _ in done] == [("bat", 0), ("pgd-at", 1), ("pgd-at", 0)]
    assert done[0][1] is None and done[-1][1] is not None  # the held model only after its owner ended
    assert not list(claims.iterdir())  # every claim released


def as_committed(out):
    """OUT as git keeps it (.gitignore): no checkpoints, no attack states."""
    import shutil

    for p in [*(out / "models").rglob("checkpoint.pt"), *(out / "models").rglob("state")]:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


@pytest.fixture(scope="module")
def clean_digits_run(tmp_path_factory):
    import memtool

    from conftest import DIGITS_FAST

    out = tmp_path_factory.mktemp("runs") / "digits-clean"
    memtool.estimate(out, trials=16, progress=False, **DIGITS_FAST)
    return out


def test_comparison_tables_records_and_figure(clean_digits_run, tmp_path, monkeypatch):
    out = tmp_path / "bc"
    variants = ["standard", "pgd-at", "trades b=1", "trades b=6", "bat", "bat weights only"]
    order, train, evaluate = [], bc.train, bc.evaluate
    monkeypatch.setattr(bc, "train", lambda config, out, **kw: (order.append(("train", out.name)), train(config, out, **kw))[1])
    monkeypatch.setattr(bc, "evaluate", lambda run, out, **kw: (order.append((out.name, run.name)), evaluate(run, out, **kw))[1])
    table = bc.run(clean_digits_run, out, seeds=2, eps=0.1, recipe=SMALL, pgd_steps=3, variants=variants,
                   aa_samples=40, aa_variants="headline", progress=False)
    # seed by seed, each model attacked while its checkpoint is there: AutoAttack of seed 0 before seed 1 trains
    assert order.index(("autoattack", "bat-s0")) < order.index(("train", "standard-s1"))
    assert order.index(("train", "bat-s0")) < order.index(("autoattack", "bat-s0")) < order.index(("train", "bat_weights_only-s0"))
    assert set(table.variant) == set(variants) and (table.seeds == 2).all()
    assert set(table.group) == {"all test", "typical test", "atypical test"}
    assert set(table.metric) == {"clean", "pgd20", "cw20", "autoattack"}
    assert (table[table.metric == "autoattack"].n <= 40).all()
    # AutoAttack on the headline variants only; the ablation is ranked by CW-20
    assert set(table[table.metric == "autoattack"].variant) == set(variants) - {"bat weights only"}
    assert not (out / "models" / "bat_weights_only-s0" / "autoattack").exists()
    acc = table[table.group == "all test"].set_index(["variant", "metric"])["accuracy"]
    for v in variants:  # an attack never raises accuracy; adversarial training is more robust than standard
        assert acc[v, "cw20"] <= acc[v, "clean"] and acc[v, "pgd20"] <= acc[v, "clean"]
    assert acc["pgd-at", "pgd20"] > acc["standard", "pgd20"]
    assert np.isclose(table[table.variant == "pgd-at"]["diff"], 0).all()
    info = read_table(out / "bat_comparison.parquet").attrs["memtool"]
    gaps = {(g["variant"], g["attack"]) for g in info["frontier_gaps"]}
    assert gaps == {("bat", "autoattack"), ("bat", "cw20"), ("bat weights only", "cw20")}
    agree = info["agreement"]["cw20"]
    assert agree["models"] == 10 and agree["samples_per_model"] == 40 and 0.5 <= agree["per_sample_agreement"] <= 1
    assert agree["excess_min"] >= -0.05  # AutoAttack is the stronger attack (up to random starts)
    md = (out / "bat_comparison.md").read_text()
    assert "## BAT against the baselines' trade-off curve" in md and "| bat weights only | CW-20 |" in md
    assert "## CW-20 against AutoAttack" in md
    assert (out / "bat_comparison.png").stat().st_size > 0
    # every model has its records: BAT's per-epoch log and a RobustBench record of AutoAttack
    import json

    log = [json.loads(line) for line in (out / "models" / "bat-s0" / "log.jsonl").read_text().splitlines()]
    assert "atypical_weight" in log[-1] and "harmful_fraction" in log[-1]
    rb = json.loads((out / "models" / "bat-s0" / "autoattack" / "robustbench.json").read_text())
    assert rb["n_test_samples"] == 40 and rb["autoattack_acc"] is not None
    # a rerun trains and attacks nothing: every model and evaluation is reused
    before = {p: p.stat().st_mtime_ns for p in (out / "models").rglob("checkpoint.pt")}
    bc.run(clean_digits_run, out, seeds=2, eps=0.1, recipe=SMALL, pgd_steps=3, variants=variants, aa_samples=40,
           aa_variants="headline", progress=False)
    assert before == {p: p.stat().st_mtime_ns for p in (out / "models").rglob("checkpoint.pt")}
    # a fresh clone has the committed records only (no checkpoints, no attack states): it trains
    # and attacks nothing and rebuilds the same table; a model that lost an evaluation is retrained
    as_committed(out)
    (out / "models" / "bat-s1" / "autoattack" / "per_sample.parquet").unlink()
    trained, real = [], bc.train
    monkeypatch.setattr(bc, "train", lambda config, out, **kw: (trained.append(out.name), real(config, out, **kw))[1])
    again = bc.run(clean_digits_run, out, seeds=2, eps=0.1, recipe=SMALL, pgd_steps=3, variants=variants,
                   aa_samples=40, aa_variants="headline", progress=False)
    assert trained == ["bat-s1"] and (out / "models" / "bat-s1" / "autoattack" / "per_sample.parquet").exists()
    key = ["variant", "group", "metric"]
    pd.testing.assert_frame_equal(again.sort_values(key, ignore_index=True), table.sort_values(key, ignore_index=True))


def test_apgd_on_the_atypical_and_first_typical_samples_checked_against_autoattack(clean_digits_run, tmp_path):
    """aa_atypical: the robust evaluation covers the first aa_samples typical test samples and
    every atypical one; aa_attack apgd runs APGD-CE + APGD-T there, aa_check adds standard
    AutoAttack on the same samples at the first seed of its variants (their agreement is
    reported), and the margin is recorded; every interval counts the seeds and the test samples."""
    from analyses.study import load_study

    out = tmp_path / "bc"
    kw = dict(seeds=2, eps=0.1, recipe=SMALL, pgd_steps=2, variants=["pgd-at", "bat"], aa_samples=15,
              aa_atypical=True, progress=False)
    table = bc.run(clean_digits_run, out, aa_attack="apgd", aa_check=["bat"], margin=0.01, **kw)
    atyp = load_study(clean_digits_run).atypical_test
    want = np.sort(np.concatenate([np.flatnonzero(~atyp)[:15], np.flatnonzero(atyp)]))
    for j in ("pgd-at-s0", "pgd-at-s1", "bat-s0", "bat-s1"):
        got = read_table(out / "models" / j / "apgd" / "per_sample.parquet")["sample_id"].to_numpy()
        np.testing.assert_array_equal(got, want)
        assert (out / "models" / j / "autoattack").exists() == (j == "bat-s0")
    rows = table[table.metric == "apgd"].set_index(["variant", "group"])
    assert rows.loc[("bat", "atypical test"), "n"] == atyp.sum() and rows.loc[("bat", "typical test"), "n"] == 15
    assert rows[["ci_low", "ci_high"]].notna().all().all()  # two seeds: intervals over seeds and samples
    info = read_table(out / "bat_comparison.parquet").attrs["memtool"]
    assert info["margin"] == 0.01 and info["aa_attack"] == "apgd" and info["aa_n"] == len(want)
    a = info["agreement"]["apgd"]
    assert a["models"] == 1 and a["samples_per_model"] == len(want) and a["excess_min"] >= -0.05
    md = (out / "bat_comparison.md").read_text()
    assert "## APGD-CE + APGD-T against standard AutoAttack" in md and "| bat | APGD-CE+T | 2 |" in md
    assert ("it stands in." in md) == (a["excess_max"] <= bc.STAND_IN) == a["stands_in"]
    assert "Declared equivalence margin of BAT - PGD-AT under APGD-CE+T: ±1 points" in md
    # the progress table of an unfinished comparison reads the stage's folder as it is
    progress = runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "comparison_progress.py"))["table"]
    rows = {c[0]: c for c in ([c.strip() for c in line.strip("|").split("|")] for line in progress(out).splitlines()[2:])}
    assert set(rows) == {"pgd-at-s0", "pgd-at-s1", "bat-s0", "bat-s1"}
    for j in rows:
        got = {sub: read_table(out / "models" / j / sub / "per_sample.parquet") for sub in ("apgd", "autoattack")
               if (out / "models" / j / sub).exists()}
        aa = f"{100 * got['autoattack']['autoattack'].mean():.1f}" if "autoattack" in got else "-"
        *_, robust, cost = rows[j]
        apgd = got["apgd"]
        assert robust == f"({len(want)}): {100 * apgd['clean'].mean():.1f} / {100 * apgd['apgd'].mean():.1f} / {aa}"
        assert (cost.split(" / ")[-1] == "-") == (aa == "-") and "-" not in cost.split(" / ")[:3], cost
    with pytest.raises(ValueError, match="aa_check runs standard AutoAttack beside apgd"):
        bc.run(clean_digits_run, tmp_path / "x", aa_check=["bat"], **kw)
    with pytest.raises(ValueError, match=r"aa_samples must be in 1\.\.\d+ \(the typical test samples\)"):
        bc.run(clean_digits_run, tmp_path / "y", **{**kw, "aa_samples": 10**6})


def test_refuses_unknown_variant_and_noisy_run(digits_run, clean_digits_run, tmp_path):
    with pytest.raises(ValueError, match="unknown variant 'bat tau=0.3'"):
        bc.run(clean_digits_run, tmp_path / "x", variants=["bat tau=0.3"], aa_samples=40, progress=False)
    with pytest.raises(ValueError, match="label noise"):
        bc.run(digits_run[0], tmp_path / "y", progress=False)


def test_validation_selection_and_autoattack_on_the_first_seeds(tmp_path, monkeypatch):
    """``val_samples``: every adversarial model (not standard training) holds out training
    samples beyond the run's limit and keeps its best-PGD epoch on them; no model checks the
    test set while training; ``aa_seeds=1``: AutoAttack on seed 0 of the chosen variants only,
    except those of ``aa_all_seeds``."""
    import json

    import torch
    from conftest import DIGITS_FAST

    import memtool

    run = tmp_path / "run"
    memtool.estimate(run, trials=4, limit=1000, progress=False, **{**DIGITS_FAST, "epochs": 10})
    out = tmp_path / "bc"
    table = bc.run(run, out, seeds=2, eps=0.1, recipe=SMALL, pgd_steps=2, variants=["standard", "pgd-at", "bat"],
                   val_samples=200, aa_samples=20, aa_variants=["pgd-at", "bat"], aa_seeds=1, aa_all_seeds=["bat"],
                   progress=False)
    for v, rule in (("standard", "last"), ("pgd-at", "best-pgd"), ("bat", "best-pgd")):
        ck = torch.load(out / "models" / f"{v}-s1" / "checkpoint.pt", weights_only=True)
        cfg = ck["settings"]["config"]
        assert cfg["select"] == rule and cfg["eval_samples"] == 0 and cfg["val_samples"] == (200 if rule != "last" else 0)
        log = [json.loads(line) for line in (out / "models" / f"{v}-s1" / "log.jsonl").read_text().splitlines()]
        assert not any("clean_acc" in r for r in log)  # no test-set check during training
        assert all(("val_robust_acc" in r) == (rule == "best-pgd") for r in log)
    assert (out / "models" / "pgd-at-s0" / "autoattack").exists() and not (out / "models" / "pgd-at-s1" / "autoattack").exists()
    assert not (out / "models" / "standard-s0" / "autoattack").exists()
    aa = table[table.metric == "autoattack"]
    assert (out / "models" / "bat-s1" / "autoattack").exists()
    assert aa.groupby("variant")["seeds"].max().to_dict() == {"pgd-at": 1, "bat": 2}
    # BAT - PGD-AT under AutoAttack pairs one seed: no interval, said so (never "nan")
    md = (out / "bat_comparison.md").read_text()
    row = next(line for line in md.split("## Paired differences")[1].splitlines() if line.startswith("| bat | "))
    assert row.endswith("(one seed) |") and "| variant | clean | PGD-20 | CW-20 | AutoAttack |" in md
    assert "nan" not in md
    # PGD-AT and BAT also at their last epoch: evaluated again only where it is not the chosen one
    info = read_table(out / "bat_comparison.parquet").attrs["memtool"]
    assert sorted(info["best_epochs"]) == ["bat s0", "bat s1", "pgd-at s0", "pgd-at s1"]
    for key, epoch in info["best_epochs"].items():
        v, s = key.split(" s")
        again = (out / "models" / f"{v}-s{s}" / "eval-last").exists()
        assert again == (epoch != SMALL.epochs) and 1 <= epoch <= SMALL.epochs
        if again:
            rb = json.loads((out / "models" / f"{v}-s{s}" / "eval-last" / "robustbench.json").read_text())
            assert rb["checkpoint_rule"].startswith(f"last epoch ({SMALL.epochs})")
    last = table[table.variant.str.endswith(" (last epoch)")]
    assert set(last.variant) == {"pgd-at (last epoch)", "bat (last epoch)"} and set(last.metric) == {"clean", "pgd20", "cw20"}
    # in the grid's order, whatever the process's hash seed: a rerun writes the same table
    assert list(dict.fromkeys(last.variant)) == ["pgd-at (last epoch)", "bat (last epoch)"]
    # the committed records alone (no checkpoint): nothing trained, the same table, the kept epochs
    # read from selected.json; a rerun with another eps or another training recipe is refused
    from memtool.rundir import RunMismatchError

    as_committed(out)
    monkeypatch.setattr(bc, "train", lambda *a, **k: pytest.fail("trained a model whose records are complete"))
    kw = dict(seeds=2, variants=["standard", "pgd-at", "bat"], val_samples=200, aa_samples=20,
              aa_variants=["pgd-at", "bat"], aa_seeds=1, aa_all_seeds=["bat"], progress=False)
    again = bc.run(run, out, eps=0.1, recipe=SMALL, pgd_steps=2, **kw)
    pd.testing.assert_frame_equal(again, table)
    assert read_table(out / "bat_comparison.parquet").attrs["memtool"]["best_epochs"] == info["best_epochs"]
    with pytest.raises(RunMismatchError, match="eps 0.1; this comparison asks for clean,pgd20,cw20 at eps 0.2"):
        bc.run(run, out, eps=0.2, recipe=SMALL, pgd_steps=2, **kw)
    with pytest.raises(RunMismatchError, match="pgd_steps: run has 2, this call asks for 3"):
        bc.run(run, out, eps=0.1, recipe=SMALL, pgd_steps=3, **kw)
    with pytest.raises(ValueError, match=r"aa_all_seeds \['standard'\] are not among the aa_variants \['pgd-at'\]"):
        bc.run(run, out, seeds=2, eps=0.1, recipe=SMALL, variants=["standard", "pgd-at"], aa_samples=20,
               aa_variants=["pgd-at"], aa_all_seeds=["standard"], progress=False)
    with pytest.raises(ValueError, match="aa_seeds must be in 1..2"):
        bc.run(run, out, seeds=2, eps=0.1, recipe=SMALL, variants=["pgd-at"], aa_samples=20, aa_seeds=3, progress=False)


def test_labels_of_crowded_points_do_not_overlap_and_clipped_bounds_are_written():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analyses.bat_comparison import mark_clipped, place_labels

    fig, ax = plt.subplots()
    ax.set(xlim=(0, 10), ylim=(0, 10))
    place_labels(ax, [(f"variant {i}", 5.0, 5.0 + 0.01 * i) for i in range(6)])  # six points on one spot
    fig.canvas.draw()
    from matplotlib.text import Text

    boxes = [Text.get_window_extent(t) for t in ax.texts]
    assert len(boxes) == 6
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    for t in list(ax.texts):
        t.remove()
    place_labels(ax, [("a long label", 5.0, 5.0), ("b", 5.3, 5.0)])  # b's point sits where a's label would go
    fig.canvas.draw()
    from matplotlib.transforms import Bbox

    a = next(t for t in ax.texts if t.get_text() == "a long label")
    marker_b = Bbox.from_bounds(*(ax.transData.transform((5.3, 5.0)) - 4), 8, 8)
    assert not Text.get_window_extent(a).overlaps(marker_b)
    mark_clipped(ax, {"wide": (np.array([5.0, -20.0, 30.0]), np.array([5.0, 4.0, 6.0]))})
    assert {t.get_text() for t in ax.texts[2:]} == {"-20", "30"}  # both x bounds run off: written at the edges
    plt.close(fig)


def test_tuned_variants_join_the_grid_and_get_autoattack_wherever_the_default_points_do():
    chosen = ["bat benign x2", "bat judged benign x1.5"]
    v, aa, every = bc.with_tuned(["pgd-at", "mart", "pgd-at eps x0.5", "bat"], "headline", [], chosen)
    assert v == ["pgd-at", "mart", "pgd-at eps x0.5", "bat", *chosen]
    assert aa == ["pgd-at", "mart", "pgd-at eps x0.5", "bat", *chosen]  # the curve point stays: it is in HEADLINE
    assert every == []
    v, aa, every = bc.with_tuned(["pgd-at", "bat"], ["bat"], ["bat"], chosen)
    assert aa == ["bat", *chosen] and every == ["bat", *chosen]
    assert bc.with_tuned(["pgd-at", "bat benign x2"], None, [], chosen)[:2] == (["pgd-at", "bat benign x2",
                                                                                  "bat judged benign x1.5"], None)
