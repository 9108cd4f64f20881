"""BAT's benign half: the tuning stage trains every candidate on held-out samples beyond --limit and
keeps each family's best; the comparison's recipes read the judges' table."""

import json

import numpy as np
import pandas as pd
import pytest

import memtool
from analyses import bat_comparison, bat_tuning
from memtool.methods import BAT
from memtool.recipe import Recipe
from memtool.rundir import read_table, write_table

SMALL = Recipe(model="mlp", hidden=32, epochs=3, batch_size=64, lr=0.1)


def test_choose_takes_the_best_held_out_robust_accuracy_then_clean_then_the_first_listed():
    t = pd.DataFrame({"family": ["a", "a", "a", "b", "b"], "variant": ["a1", "a2", "a3", "b1", "b2"],
                      "val_robust": [0.5, 0.7, 0.7, 0.4, 0.4], "val_clean": [0.9, 0.8, 0.85, 0.9, 0.9]})
    assert bat_tuning.choose(t) == {"a": "a3", "b": "b1"}


def test_tuning_trains_every_candidate_on_held_out_samples(tmp_path):
    run = tmp_path / "run"
    memtool.estimate(run, dataset="digits", limit=1000, trials=8, model="mlp", hidden=32, epochs=5, progress=False)
    digits = memtool.load_dataset("digits", limit=1000)
    atypical = BAT(scores=str(run)).bind(digits).atypical.numpy()
    ids = np.flatnonzero(atypical)
    assert len(ids) > 0
    judges = tmp_path / "harmfulness.parquet"
    write_table(pd.DataFrame({"sample_id": ids, "label": digits.y_train[ids],
                              "h": np.random.default_rng(0).uniform(0, 1, len(ids))}), judges, {})
    table = bat_tuning.run(run, tmp_path / "tune", eps=0.1, pgd_steps=1, val_samples=200, judges=judges,
                           recipe=SMALL, progress=False)
    assert list(table.variant) == [v for f in bat_tuning.FAMILIES.values() for v in f]
    chosen = read_table(tmp_path / "tune" / "bat_tuning.parquet").attrs["memtool"]["chosen"]
    assert chosen == bat_tuning.choose(table) and table["chosen"].sum() == len(bat_tuning.FAMILIES)
    for v in table.variant:
        d = tmp_path / "tune" / "models" / bat_comparison.slug(v)
        log = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
        assert len(log) == 3 and all("val_robust_acc" in r for r in log)  # checked every epoch on the held-out set
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["config"]["val_samples"] == 200 and cfg["config"]["eval_samples"] == 0  # never the test set
        assert ("judged_sha" in cfg["samples"]) == v.startswith("bat judged")
        assert cfg["config"]["recipe"]["method"].get("benign", 1.0) == bat_comparison.GRID[v].get("benign", 1.0)
    # a committed study keeps logs and configs, not checkpoints: read back without training again
    logs = {v: (tmp_path / "tune" / "models" / bat_comparison.slug(v) / "log.jsonl").stat().st_mtime_ns
            for v in table.variant}
    for ck in (tmp_path / "tune" / "models").glob("*/checkpoint.pt"):
        ck.unlink()
    again = bat_tuning.run(run, tmp_path / "tune", eps=0.1, pgd_steps=1, val_samples=200, judges=judges,
                           recipe=SMALL, progress=False)
    pd.testing.assert_frame_equal(again, table)
    assert all((tmp_path / "tune" / "models" / bat_comparison.slug(v) / "log.jsonl").stat().st_mtime_ns == t
               for v, t in logs.items())
    row = table.set_index("variant").loc[list(chosen.values())]
    for fam, g in table.groupby("family"):
        assert row.loc[chosen[fam], "val_robust"] == g["val_robust"].max()


def test_judged_variants_need_the_judges_table(tmp_path):
    with pytest.raises(ValueError, match="needs a harmfulness table"):
        bat_comparison.recipes(SMALL, 0.1, tmp_path, ["bat judged"])
    r = bat_comparison.recipes(SMALL, 0.1, tmp_path, ["bat judged benign x2", "bat"], judges=tmp_path / "h.parquet")
    assert r["bat judged benign x2"].method.judges == str(tmp_path / "h.parquet") and r["bat"].method.judges is None
    assert r["bat judged benign x2"].method.benign == 2.0 and r["bat judged benign x2"].method.eta == 0.5
    # a BAT run made before the benign half still compares equal: the new fields are written only when set
    assert "benign" not in r["bat"].method.to_dict() and "judges" not in r["bat"].method.to_dict()
