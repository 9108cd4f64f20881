"""The manifests and what is rendered from them: headline numbers read from the tables, the
committed figures index and the README's results table regenerated exactly."""

import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from memtool import manifest

ROOT = Path(__file__).parents[1]


def test_headline_reads_the_last_matching_row_and_formats_points_and_percent():
    t = pd.DataFrame({"variant": ["full", "without", "without"], "group": ["g", "g", "g"], "seeds": 3,
                      "accuracy": [0.9, 0.8, 0.7], "ci_low": [0.85, 0.75, 0.65], "ci_high": [0.95, 0.85, 0.75],
                      "diff": [0.0, -0.1, -0.2], "diff_low": [0.0, -0.15, -0.25], "diff_high": [0.0, -0.05, -0.15]})
    specs = {"x": [manifest.Contrast("drop", {"variant": "without"}), manifest._acc("acc", {"variant": "full"}),
                   manifest.Contrast("absent", {"variant": "nope"})]}
    old, manifest.HEADLINES = manifest.HEADLINES, specs
    try:
        h = manifest.headline("x", t)
    finally:
        manifest.HEADLINES = old
    assert [x["label"] for x in h] == ["drop", "acc"]  # a spec without its row is left out
    assert (h[0]["value"], h[0]["low"], h[0]["high"]) == (-0.2, -0.25, -0.15)  # the last matching row
    assert manifest.fmt(h[0]) == "-20.0 (-25.0 to -15.0) points, 3 seeds"
    assert manifest.fmt(h[1]) == "90.0 (85.0 to 95.0) %, 3 seeds"
    assert manifest.fmt({"label": "n", "value": 1140, "low": None, "high": None, "unit": ""}) == "1140"
    assert manifest.fmt({"label": "j", "value": 0.5551, "low": None, "high": None, "unit": ""}) == "0.555"


def test_committed_index_is_what_the_manifests_render():
    assert (ROOT / "figures" / "README.md").read_text() == manifest.render_index(ROOT / "figures")


def test_committed_headlines_are_the_committed_tables_numbers(tmp_path):
    for path in sorted((ROOT / "figures").glob("*/manifest.json")):
        m = json.loads(path.read_text())
        for stage, row in m["stages"].items():
            table = path.parent / f"{stage}.parquet"
            if table.exists():
                assert row["headline"] == manifest.headline(stage, pd.read_parquet(table)), (path, stage)


def test_readme_results_table_is_rendered_from_the_tables():
    text = (ROOT / "README.md").read_text()
    assert manifest.BEGIN in text, "README.md lost its results markers"
    section = text.split(manifest.BEGIN, 1)[1].split(manifest.END, 1)[0].strip("\n") + "\n"
    assert section == manifest.render_results(ROOT / "figures", "figures")
    # and every number in it is its table's, looked up here without the manifest
    rows = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines()[2:]}
    checked = 0
    for stage in manifest.RESULT_STAGES:
        for study in sorted((ROOT / "figures").glob(f"*/{stage}.parquet")):
            t = pd.read_parquet(study)
            for c in manifest.HEADLINES[stage]:
                sel = t
                for k, v in c.where.items():
                    sel = sel[sel[k] == v]
                if not len(sel) or pd.isna(sel[c.value].iloc[-1]):
                    continue
                value = 100 * sel[c.value].iloc[-1]
                link = f"(figures/{study.parent.name}/{stage}.md)"
                cell = next(x for x in rows[c.label].split(" | ") if link in x)
                shown = float(re.match(r"\[([-+]?\d+\.\d)", cell).group(1))
                assert shown == pytest.approx(value, abs=0.051), (c.label, study)
                checked += 1
    assert checked >= 16


def test_update_readme_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{manifest.BEGIN}\nold\n{manifest.END}\n\nafter\n")
    manifest.update_readme(readme, ROOT / "figures")
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n\n") and text.endswith(f"{manifest.END}\n\nafter\n") and "old" not in text
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="results:begin"):
        manifest.update_readme(readme, ROOT / "figures")


def test_two_processes_recording_other_stages_keep_both_rows(tmp_path):
    """Two `memtool figures --stages X` processes load the manifest at their start and record
    their own stage at their end: neither row is lost."""
    first = manifest.load(tmp_path, name="t", description="", command="a")
    second = manifest.load(tmp_path, name="t", description="", command="b")
    manifest.record(first, tmp_path, "finding_a", [], "data", [], {"wall_s": 10.0})
    manifest.record(second, tmp_path, "finding_b", [], "data", [], {"wall_s": 20.0})
    manifest.record(first, tmp_path, "finding_a", [], "data", [], {"wall_s": 15.0})
    stages = json.loads((tmp_path / "manifest.json").read_text())["stages"]
    assert {k: v["wall_s"] for k, v in stages.items()} == {"finding_a": 15.0, "finding_b": 20.0}


def test_a_rerun_that_changes_nothing_keeps_the_rows_date(tmp_path):
    """A stage rerun on its finished records (same files, headline and cost) leaves the date it
    was made on; a changed headline re-dates the row."""
    def record(value):
        m = manifest.load(tmp_path, name="t", description="", command="a")
        manifest.record(m, tmp_path, "estimate", [], "data", [{"label": "x", "value": value}], {"wall_s": 10.0})
        return json.loads((tmp_path / "manifest.json").read_text())["stages"]["estimate"]["date"]

    assert record(1) == time.strftime("%Y-%m-%d")
    rows = json.loads((tmp_path / "manifest.json").read_text())
    rows["stages"]["estimate"]["date"] = "2000-01-01"
    (tmp_path / "manifest.json").write_text(json.dumps(rows))
    assert record(1) == "2000-01-01"
    assert record(2) == time.strftime("%Y-%m-%d")


def test_a_stage_costs_what_trained_its_records_and_the_cost_travels_with_them(tmp_path):
    """account() keeps an invocation's wall time in WORK/cost/ only when it wrote a model or
    trial file; the row is the records' cost, never an older row's (another recipe's records)."""
    work = tmp_path / "work"

    def train(name):
        (work / "AT" / "models").mkdir(parents=True, exist_ok=True)
        (work / "AT" / "models" / name).write_bytes(b"x")

    def tables_only():
        (work / "finding_a.md").write_text("rewritten on every invocation")
        (work / "claims").mkdir(exist_ok=True)
        (work / "claims" / "x.claim").write_text("")  # claims are not work either

    manifest.account(work, lambda: (time.sleep(0.05), train("full-s0.npz")))
    manifest.account(work, tables_only)  # a finished stage re-read: no cost
    cost = manifest.stage_cost(work)
    assert cost["invocations"] == 1 and cost["wall_s"] >= 0.05 and "torch thread" in cost["load"]
    manifest.account(work, lambda: train("full-s1.npz"))
    assert manifest.stage_cost(work)["invocations"] == 2
    m = manifest.load(tmp_path, name="t", description="", command="c")
    m["stages"]["finding_a"] = {"wall_s": 999.0, "invocations": 7, "load": "an MLP era"}  # an old row
    manifest.record(m, tmp_path, "finding_a", [], "data", [], manifest.stage_cost(work))
    row = json.loads((tmp_path / "manifest.json").read_text())["stages"]["finding_a"]
    assert (row["wall_s"], row["invocations"]) == (manifest.stage_cost(work)["wall_s"], 2)
    manifest.record(m, tmp_path, "finding_b", [], "data", [], manifest.stage_cost(tmp_path / "imported"))
    row = json.loads((tmp_path / "manifest.json").read_text())["stages"]["finding_b"]
    assert row["wall_s"] is None and row["invocations"] == 0 and row["load"] is None  # records trained elsewhere


def test_an_interrupted_stage_keeps_the_cost_of_the_models_it_finished(tmp_path):
    work = tmp_path / "work"

    def killed():
        (work / "models").mkdir(parents=True)
        (work / "models" / "a.npz").write_bytes(b"x")
        time.sleep(0.5)  # a check records it, then the process dies while training the next one
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        manifest.account(work, killed, every=0.1)
    cost = manifest.stage_cost(work)
    assert cost["invocations"] == 1 and 0 <= cost["wall_s"] < 0.4  # up to that check, not the unfinished model


def test_two_processes_on_one_stage_keep_both_costs_and_a_vanished_folder_is_no_error(tmp_path):
    """Two invocations working at once (threads here, processes in a study) each keep their own
    time; a model folder removed between checks (a retrained model) neither stops nor fails them."""
    import shutil
    import threading
    import warnings

    work = tmp_path / "work"
    (work / "models" / "old").mkdir(parents=True)
    (work / "models" / "old" / "checkpoint.pt").write_bytes(b"x")

    together = threading.Barrier(2)  # both work at once however loaded the machine: 0.4 s at least in common

    def worker(name, remove):
        def fn():
            together.wait()
            for i in range(3):
                (work / "models" / name).mkdir(exist_ok=True)
                (work / "models" / name / f"epoch{i}").write_bytes(b"x")
                time.sleep(0.2)
            together.wait()
            if remove:
                shutil.rmtree(work / "models" / "old")
        return fn

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=manifest.account, args=(work, worker(n, n == "b")), kwargs={"every": 0.05})
                   for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not [w for w in caught if "wall time" in str(w.message)]
    cost = manifest.stage_cost(work)
    assert cost["invocations"] == 2 and cost["process_s"] >= 0.8  # both, 0.6 s each at least
    assert 0.4 <= cost["wall_s"] <= cost["process_s"] - 0.2  # at once: the wall time counts their overlap once


def test_the_wall_time_counts_overlapping_invocations_once(tmp_path):
    """Hand-computed: two processes started together (100 s and 90 s), a third 200 s later
    (50 s): 150 s of wall time, 240 s of process time; a file without a start counts in full."""
    cost = tmp_path / "cost"
    cost.mkdir()
    for name, wall in (("20261205T000000.000000-vm-1", 100.0), ("20261205T000001.000000-vm-2", 90.0),
                       ("20261205T000320.000000-vm-3", 50.0)):
        (cost / f"{name}.json").write_text(json.dumps({"wall_s": wall, "device": "cpu", "load": "two jobs"}))
    c = manifest.stage_cost(tmp_path)
    assert (c["wall_s"], c["process_s"], c["invocations"], c["load"]) == (150.0, 240.0, 3, "two jobs")
    (cost / "migrated.json").write_text(json.dumps({"wall_s": 10.0, "device": "cpu", "load": "old"}))
    assert manifest.stage_cost(tmp_path)["wall_s"] == 160.0
    (tmp_path / "t").mkdir()
    m = manifest.load(tmp_path / "t", name="t", description="", command="c")
    manifest.record(m, tmp_path / "t", "finding_a", [], "data", [], manifest.stage_cost(tmp_path))
    assert "| 160 s (old; 250 s over 4 processes) |" in manifest.render_index(tmp_path)


def test_a_gpu_is_named_in_the_records_and_the_manifest(monkeypatch):
    import torch

    from memtool.config import device_name

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Card {i}")
    assert device_name("cuda") == "cuda:1 Card 1" and device_name("cuda:0") == "cuda:0 Card 0"
    assert manifest.load_note("cuda:0") == "cuda:0 Card 0" and device_name("cpu") == "cpu"


def test_verdicts_say_only_what_their_intervals_support():
    from memtool.manifest import verdict

    h = lambda lo, hi: {"value": (lo + hi) / 2, "low": lo, "high": hi, "unit": "points"}  # noqa: E731
    assert verdict(h(0.001, 0.02)) == "resolved: higher"
    assert verdict(h(-0.03, -0.001)) == "resolved: lower"
    assert verdict(h(-0.001, 0.02)) == "no resolved difference"
    assert verdict(h(-0.004, 0.008), margin=0.01) == "equivalent within ±1 points"
    assert verdict(h(-0.004, 0.012), margin=0.01) == "no resolved difference"  # sticks out of the margin
    assert verdict({"value": 0.01, "low": None, "high": None, "unit": "points"}) == "one seed: no interval"


def test_the_readme_verdict_lines_match_their_intervals():
    """Every generated verdict line of README.md claims a direction only where its interval,
    printed on the same line, excludes 0."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = text.split("<!-- verdict:begin -->")[1].split("<!-- verdict:end -->")[0]
    assert block.strip("\n") + "\n" == manifest.render_verdict(ROOT / "figures"), "README.md's verdicts are stale: " \
        "run memtool figures --index figures --readme README.md"
    lines = [line for line in block.splitlines() if line.startswith("- ")]
    assert lines
    for line in lines:
        if ": one seed: no interval, " in line:
            assert " to " not in line.split(": one seed: no interval, ")[1], line
            continue
        lo, hi = map(float, re.search(r"\(([-+]?[\d.]+) to ([-+]?[\d.]+)\) points", line).groups())
        said = re.search(r": (resolved: higher|resolved: lower|no resolved difference|beyond the curve|inside the curve|"
                         r"no resolved gap to the curve|equivalent within ±([\d.]+) points), [-+]", line)
        assert said, line
        if said[1] in ("resolved: higher", "beyond the curve"):
            assert lo > 0, line
        elif said[1] in ("resolved: lower", "inside the curve"):
            assert hi < 0, line
        elif said[2]:
            assert -float(said[2]) <= lo <= 0 <= hi <= float(said[2]), line
        else:
            assert lo <= 0 <= hi, line


def test_finding_a_verdict_lines_come_from_the_tables_contrasts(tmp_path):
    """A study with a finding (a) table gets one verdict line per contrast of FINDING_A_VERDICTS,
    with the contrast's own interval; other contrasts and studies without the stage get none."""
    from memtool.rundir import write_json, write_table

    study = tmp_path / "s"
    study.mkdir()
    write_json(study / "manifest.json", {"name": "s", "stages": {"finding_a": {"headline": []}}})
    contrasts = [{"contrast": "AT robust loss - ST clean loss", "seeds": 5, "diff": -0.001, "diff_low": -0.012,
                  "diff_high": 0.010, "p": 0.8},
                 {"contrast": "AT robust loss - AT clean loss", "seeds": 5, "diff": -0.119, "diff_low": -0.135,
                  "diff_high": -0.103, "p": 0.0},
                 {"contrast": "AT clean loss", "seeds": 5, "diff": -0.07, "diff_low": -0.08, "diff_high": -0.06, "p": 0.0}]
    write_table(pd.DataFrame({"x": [0]}), study / "finding_a.parquet", {"contrasts": contrasts})
    (tmp_path / "other").mkdir()
    write_json(tmp_path / "other" / "manifest.json", {"name": "other", "stages": {}})
    assert manifest.render_verdict(tmp_path).splitlines() == [
        "- s, (a) AT robust loss - ST clean loss: no resolved difference, -0.1 (-1.2 to +1.0) points, 5 seeds",
        "- s, (a) AT robust loss - AT clean loss: resolved: lower, -11.9 (-13.5 to -10.3) points, 5 seeds"]


def test_finding_b_and_comparison_verdicts_read_their_tables(tmp_path):
    """Finding (b): harmful - random at the largest k only, robust. The comparison: every BAT
    variant that has the robust evaluation (here APGD-CE+T), its difference to PGD-AT with the
    declared margin (inside it: "equivalent"; sticking out: not), and its gap to the curve with
    its interval, none with one seed (whatever its test samples' interval)."""
    from memtool.rundir import write_json, write_table

    study = tmp_path / "s"
    study.mkdir()
    write_json(study / "manifest.json", {"name": "s", "stages": {}})
    con = [{"contrast": f"harmful {k} - random {k}: {m}", "seeds": 5, "diff": d, "diff_low": d - 0.01,
            "diff_high": d + 0.01, "p": 0.1, "p_holm": 0.2} for k, m, d in ((98, "robust", 0.05), (195, "robust", 0.02),
                                                                            (195, "clean", 0.0))]
    write_table(pd.DataFrame({"x": [0]}), study / "finding_b.parquet", {"contrasts": con, "sizes": [98, 195]})
    rows = [("bat", "apgd", -0.002, -0.008, 0.006), ("bat benign x2", "apgd", 0.004, -0.003, 0.011),
            ("bat", "clean", 0.01, 0.005, 0.015), ("bat weights only", "apgd", 0.0, -0.1, 0.1)]
    table = pd.DataFrame([{"variant": v, "group": "all test", "metric": m, "seeds": 5, "diff": d, "diff_low": lo,
                           "diff_high": hi} for v, m, d, lo, hi in rows])
    gaps = [{"variant": "bat", "attack": "apgd", "seeds": 5, "gap": 0.03, "gap_low": 0.01, "gap_high": 0.05,
             "verdict": "beyond the curve"},
            {"variant": "bat benign x2", "attack": "apgd", "seeds": 1, "gap": 0.02, "gap_low": 0.01, "gap_high": 0.04,
             "verdict": "one seed"},
            {"variant": "bat", "attack": "cw20", "seeds": 5, "gap": -0.03, "gap_low": -0.05, "gap_high": -0.01,
             "verdict": "inside the curve"}]
    info = {"aa_attack": "apgd", "margin": 0.01, "frontier_gaps": gaps, "aa_variants": ["pgd-at", "bat", "bat benign x2"]}
    write_table(table, study / "bat_comparison.parquet", info)  # a table from before the intervals counted samples
    assert manifest.render_verdict(tmp_path).splitlines()[1] == (
        "- s, bat - PGD-AT: APGD-CE+T (test samples fixed): equivalent within ±1 points, -0.2 (-0.8 to +0.6) points, "
        "5 seeds")
    write_table(table, study / "bat_comparison.parquet", {**info, "intervals": "seeds and test samples"})
    assert manifest.render_verdict(tmp_path).splitlines() == [
        "- s, (b) harmful 195 - random 195: robust (Holm): resolved: higher, +2.0 (+1.0 to +3.0) points, 5 seeds",
        "- s, bat - PGD-AT: APGD-CE+T: equivalent within ±1 points, -0.2 (-0.8 to +0.6) points, 5 seeds",
        "- s, bat vs the baselines' curve: APGD-CE+T: beyond the curve, +3.0 (+1.0 to +5.0) points, 5 seeds",
        "- s, bat benign x2 - PGD-AT: APGD-CE+T: no resolved difference, +0.4 (-0.3 to +1.1) points, 5 seeds",
        "- s, bat benign x2 vs the baselines' curve: APGD-CE+T: one seed: no interval, +2.0 points"]
    failed = {**info, "intervals": "seeds and test samples", "agreement": {"apgd": {"stands_in": False}}}
    write_table(table, study / "bat_comparison.parquet", failed)  # APGD-CE+T failed its check: no verdict reads it
    lines = manifest.render_verdict(tmp_path).splitlines()[1:]
    assert len(lines) == 4 and all(f": {manifest.NO_STAND_IN}, " in line for line in lines)


def test_the_verdict_figure_draws_every_line_in_order_coloured_by_what_its_interval_supports(tmp_path):
    """figures/verdicts.png: one row per verdict line, top to bottom, its interval where it has one,
    filled where resolved or equivalent, hollow where not; written beside the index."""
    import matplotlib.colors as mc
    import matplotlib.pyplot as plt

    from memtool.figures import VERDICT_STYLES, verdict_figure

    rows = [("s", "a", {"value": 0.02, "low": 0.01, "high": 0.03}, "resolved: higher"),
            ("s", "b", {"value": 0.0, "low": -0.005, "high": 0.004, "margin": 0.01}, "equivalent within ±1 points"),
            ("t", "c", {"value": 0.01, "low": -0.02, "high": 0.04}, "no resolved difference"),
            ("t", "d", {"value": 0.03, "low": None, "high": None}, "one seed: no interval"),
            ("t", "e", {"value": -0.05, "low": -0.07, "high": -0.03}, manifest.NO_STAND_IN)]
    fig = verdict_figure(rows)
    ax = fig.axes[0]
    ticks = dict(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels())))
    assert [ticks[k] for k in sorted(ticks, reverse=True)] == ["s: a", "s: b", "t: c", "t: d", "t: e"]
    lines = [ln for ln in ax.get_lines() if ln.get_transform() == ax.transData]  # not the 0 and the separators
    spans = {float(ln.get_ydata()[0]): ln.get_xdata() for ln in lines if len(ln.get_xdata()) == 2}
    want = {4.0: [1.0, 3.0], 3.0: [-0.5, 0.4], 2.0: [-2.0, 4.0], 0.0: [-7.0, -3.0]}  # none for "d"
    assert spans.keys() == want.keys() and all(np.allclose(spans[y], want[y]) for y in want)
    dots = {float(ln.get_ydata()[0]): ln for ln in lines if len(ln.get_xdata()) == 1}
    for y, kind in ((4.0, "resolved"), (3.0, "equivalent"), (2.0, "unresolved"), (1.0, "none"), (0.0, "none")):
        colour, filled, _ = VERDICT_STYLES[kind]
        assert mc.same_color(dots[y].get_color(), colour)
        assert mc.same_color(dots[y].get_markerfacecolor(), colour if filled else "white")
    assert [t.get_text() for t in ax.texts] == [r[3] for r in rows]
    (band,) = ax.collections  # the declared margin, on its row only
    (x0, y0), (x1, y1) = band.get_paths()[0].get_extents().get_points()
    assert np.allclose([x0, x1], [-1, 1]) and y0 < 3 < y1 and y1 - y0 < 1
    plt.close(fig)

    from memtool.rundir import write_json, write_table

    study = tmp_path / "s"
    study.mkdir()
    write_json(study / "manifest.json", {"name": "s", "command": "memtool figures ...", "stages": {}})
    manifest.write_index(tmp_path)
    assert not (tmp_path / manifest.VERDICT_FIGURE).exists()  # no verdict, no figure
    con = [{"contrast": c, "seeds": 5, "diff": 0.1, "diff_low": 0.05, "diff_high": 0.15} for c in
           manifest.FINDING_A_VERDICTS]
    write_table(pd.DataFrame({"x": [0]}), study / "finding_a.parquet", {"contrasts": con})
    manifest.write_index(tmp_path)
    assert (tmp_path / manifest.VERDICT_FIGURE).stat().st_size > 0
    assert f"[{manifest.VERDICT_FIGURE}]" in (tmp_path / "README.md").read_text()
