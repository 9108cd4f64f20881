"""The figures manifests and everything rendered from them: OUT/NAME/manifest.json (one row
per stage: its files, data, date, wall time and headline contrast), the index OUT/README.md
and the results table of the repository's README.md. Nothing here is edited by hand:

    memtool figures --index figures --readme README.md   # re-render both from the manifests

A stage's headline is read from its own result table (OUT/NAME/STAGE.parquet) by the
:data:`HEADLINES` specs, so the manifest, the index and the README quote the same numbers as
the tables, and :func:`refresh` recomputes them from the committed tables alone.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .config import device_name
from .rundir import read_json, read_table, write_json

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


@dataclass(frozen=True)
class Contrast:
    """One headline number: the row of a stage's table where every column of ``where`` has its
    value (the last such row), its ``value`` column with ``low`` / ``high`` as the interval;
    ``unit`` ``points`` prints 100x."""

    label: str
    where: dict
    value: str = "diff"
    low: str | None = "diff_low"
    high: str | None = "diff_high"
    unit: str = "points"


def _acc(label, where):
    return Contrast(label, where, "accuracy", "ci_low", "ci_high", "%")


def _cost(label, method):
    return [Contrast(f"{label}: precision at k", {"method": method}, "precision_at_k", None, None, ""),
            Contrast(f"{label}: pairs Jaccard", {"method": method}, "pairs_jaccard", None, None, ""),
            Contrast(f"{label}: compute fraction", {"method": method}, "compute_fraction", None, None, "")]


HEADLINES = {
    "validate": [
        Contrast("retrained without the high-influence training samples, on their test samples",
                 {"variant": "without high-influence", "group": "influenced test samples"}),
        Contrast("retrained without as many random samples, on the same test samples",
                 {"variant": "without random", "group": "influenced test samples"}),
    ],
    "validate_transfer": [
        Contrast("another learner retrained without those samples, on their test samples",
                 {"variant": "without high-influence", "group": "influenced test samples"}),
        Contrast("another learner retrained without as many random samples",
                 {"variant": "without random", "group": "influenced test samples"}),
    ],
    "finding_a": [
        Contrast("(a) ST without the atypical training samples: clean, atypical test",
                 {"method": "ST", "variant": "without atypical", "group": "atypical test", "metric": "clean"}),
        Contrast("(a) AT without the atypical training samples: robust, atypical test",
                 {"method": "AT", "variant": "without atypical", "group": "atypical test", "metric": "robust"}),
        Contrast("(a) AT without the atypical training samples: robust, typical test",
                 {"method": "AT", "variant": "without atypical", "group": "typical test", "metric": "robust"}),
    ],
    "finding_b": [  # the last (largest) removal fraction
        Contrast("(b) AT without the harmful atypical samples (largest fraction): robust, typical test",
                 {"removed": "harmful", "group": "typical test", "metric": "robust"}),
        Contrast("(b) AT without as many random atypical samples (largest fraction): robust, typical test",
                 {"removed": "random atypical", "group": "typical test", "metric": "robust"}),
    ],
    "bat_comparison": [
        _acc("PGD-AT: AutoAttack", {"variant": "pgd-at", "group": "all test", "metric": "autoattack"}),
        _acc("BAT: AutoAttack", {"variant": "bat", "group": "all test", "metric": "autoattack"}),
        Contrast("BAT - PGD-AT: clean", {"variant": "bat", "group": "all test", "metric": "clean"}),
        Contrast("BAT - PGD-AT: AutoAttack", {"variant": "bat", "group": "all test", "metric": "autoattack"}),
        Contrast("BAT - PGD-AT: CW-20", {"variant": "bat", "group": "all test", "metric": "cw20"}),
        _acc("PGD-AT: APGD-CE+T", {"variant": "pgd-at", "group": "all test", "metric": "apgd"}),
        _acc("BAT: APGD-CE+T", {"variant": "bat", "group": "all test", "metric": "apgd"}),
        Contrast("BAT - PGD-AT: APGD-CE+T", {"variant": "bat", "group": "all test", "metric": "apgd"}),
    ],
    "score_cost": [*_cost("subsampling, 64 trials", "subsampling, 64 trials"),
                   *_cost("hybrid, 64 trials", "hybrid: 64 trials + 16-run proxies, TracIn pairs + trial infl")],
}
ESTIMATE_KEYS = ("n_trials", "frac_high_mem", "noise_auroc_mem", "n_high_pairs")
SPLIT_HALF_KEYS = ("spearman_mem", "jaccard_high_pairs")


def headline(stage: str, table: pd.DataFrame) -> list[dict]:
    """The :data:`HEADLINES` numbers of ``stage`` read from its result table (specs whose row
    the table lacks are left out)."""
    out = []
    for c in HEADLINES.get(stage, ()):
        rows = table
        for col, val in c.where.items():
            rows = rows[rows[col] == val] if col in rows else rows.iloc[:0]
        if not len(rows) or c.value not in rows or pd.isna(rows[c.value].iloc[-1]):
            continue
        r = rows.iloc[-1]
        num = lambda k: None if k is None or k not in r or pd.isna(r[k]) else round(float(r[k]), 6)  # noqa: E731
        out.append({"label": c.label, "value": num(c.value), "low": num(c.low), "high": num(c.high), "unit": c.unit,
                    **({"seeds": int(r["seeds"])} if "seeds" in r else {})})
    return out


def summary_headline(summary: dict, keys) -> list[dict]:
    """The numbers ``keys`` of a run summary (those it has)."""
    return [{"label": k, "value": summary[k], "low": None, "high": None, "unit": ""} for k in keys
            if summary.get(k) is not None]


def estimate_headline(summary: dict) -> list[dict]:
    """An estimate's headline: its size and split-half reliability, from its run summary."""
    split = {f"split_half_{k}": v for k, v in (summary.get("split_half") or {}).items() if k in SPLIT_HALF_KEYS}
    return summary_headline({**summary, **split}, (*ESTIMATE_KEYS, *split))


def fmt(h: dict) -> str:
    """``value (low to high) unit, N seeds``: points and % at 100x with one decimal."""
    scale, sign = {"points": (100, "+"), "%": (100, "")}.get(h["unit"], (1, ""))
    v = h["value"]
    num = f"{scale * v:{sign}.1f}" if scale == 100 else str(v) if isinstance(v, int) else f"{v:.3f}"
    if h.get("low") is not None and h.get("high") is not None:
        num += f" ({scale * h['low']:{sign}.1f} to {scale * h['high']:{sign}.1f})"
    unit = {"points": " points", "%": " %"}.get(h["unit"], "")
    seeds = f", {h['seeds']} seeds" if h.get("seeds") and h.get("low") is not None else ""
    return f"{num}{unit}{seeds}"


# ----------------------------------------------------------------------------- the manifest


def load(dest: Path, **header) -> dict:
    """OUT/NAME/manifest.json (its stages kept) with ``header`` (name, description, command)."""
    old = read_json(dest / "manifest.json") if (dest / "manifest.json").exists() else {}
    return {**{k: old.get(k, "") for k in ("name", "description", "command")}, **header,
            "stages": old.get("stages", {})}


def record(manifest: dict, dest: Path, stage: str, files, data: str, head: list[dict], cost: dict) -> None:
    """Set ``stage``'s row and write the manifest, over the rows other processes wrote meanwhile
    (one stage each); the row keeps its date where nothing else in it changed. Its wall time is
    ``cost``: :func:`stage_cost` of the folder that holds the stage's records, so it travels with
    them ({}: none recorded)."""
    if (dest / "manifest.json").exists():
        manifest["stages"] = {**manifest["stages"], **read_json(dest / "manifest.json").get("stages", {})}
    files = [Path(os.path.relpath(f, dest)).as_posix() for f in files]  # names, or records/STAGE folders
    row = {"files": files, "data": data, "date": time.strftime("%Y-%m-%d"), "headline": head,
           "wall_s": cost.get("wall_s"), "process_s": cost.get("process_s"), "invocations": cost.get("invocations", 0),
           "load": cost.get("load")}
    old = manifest["stages"].get(stage, {})
    if all(old.get(k) == v for k, v in row.items() if k not in ("date", "process_s")):  # nothing new: a rerun
        row["date"] = old["date"]  # that re-read its records (process_s: older rows lack it)
    manifest["stages"][stage] = row
    write_json(dest / "manifest.json", manifest)


COST = "cost"  # a stage's compute: one JSON file per invocation that wrote its records, kept beside them


def account(work: Path, fn, device="cpu", every: float = 60.0):
    """``fn()``, its wall time kept in ``work``/cost/START-HOST-PID.json: the time from its start
    to the last check (every ``every`` seconds, and at its end) that found files under a
    ``models/`` or ``trials/`` folder of ``work`` new or changed. So an invocation that re-read
    finished records costs nothing, one killed midway keeps the time up to that check, records
    trained elsewhere keep the cost that came with them, and two processes on one stage each
    keep their own (:func:`stage_cost` counts the time they overlap once)."""
    work, t0 = Path(work), time.monotonic()
    start = datetime.datetime.now().strftime("%Y%m%dT%H%M%S.%f")
    mine = work / COST / f"{start}-{socket.gethostname()}-{os.getpid()}.json"
    seen = [_work_files(work)]

    def flush():
        try:
            files = _work_files(work)
            if files != seen[0]:
                seen[0] = files
                mine.parent.mkdir(parents=True, exist_ok=True)
                write_json(mine, {"wall_s": round(time.monotonic() - t0, 1), "device": device_name(device),
                                  "load": load_note(device)})
        except OSError as e:  # accounting never fails a stage
            warnings.warn(f"could not record the wall time of {work}: {e}", stacklevel=2)

    def tick():
        while not stop.wait(every):
            flush()

    stop = threading.Event()
    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        return fn()
    finally:
        stop.set()
        ticker.join()
        flush()


def stage_cost(work: Path) -> dict:
    """The wall time of the invocations that wrote ``work``'s records: the time during which at
    least one of them worked (two processes at once count once), ``process_s`` their times
    added up, their number, and where they ran (the last one's load note, or the wall time per
    device if there were several); {} when none did."""
    files = sorted((Path(work) / COST).glob("*.json"))
    if not files:
        return {}
    rows = [read_json(f) for f in files]
    spans: dict[str, list] = {}
    for f, r in zip(files, rows):
        spans.setdefault(r["device"], []).append((_started(f), r["wall_s"]))
    wall = {d: _union(s) for d, s in spans.items()}
    where = rows[-1]["load"] if len(wall) == 1 else ", ".join(f"{d}: {t:.0f} s" for d, t in wall.items())
    return {"wall_s": round(sum(wall.values()), 1), "process_s": round(sum(w for s in spans.values() for _, w in s), 1),
            "invocations": len(files), "load": where}


def _started(f: Path) -> float | None:
    """An invocation's start, from its cost file's name (START-HOST-PID.json); None if unnamed."""
    try:
        return datetime.datetime.strptime(f.name[:22], "%Y%m%dT%H%M%S.%f").timestamp()
    except ValueError:
        return None


def _union(spans) -> float:
    """Seconds covered by (start, duration) intervals; those without a start count in full."""
    total, end = sum(w for t, w in spans if t is None), -math.inf
    for t, w in sorted((t, w) for t, w in spans if t is not None):
        total += max(0.0, t + w - max(t, end))
        end = max(end, t + w)
    return total


def _work_files(work: Path) -> dict:
    found = {}
    for p in work.rglob("*"):
        if {"models", "trials"} & set(p.relative_to(work).parts) and not p.name.endswith(".tmp"):
            try:
                if p.is_file():
                    found[p] = p.stat().st_mtime_ns
            except FileNotFoundError:  # removed meanwhile (a retrained model's folder, a set-aside trial)
                pass
    return found


def load_note(device="cpu") -> str:
    """Where a wall time was taken: the GPU, or the CPU threads and the machine's load."""
    import torch

    if torch.device(device).type == "cuda":
        return device_name(device)
    threads = torch.get_num_threads()
    return (f"{threads} torch thread{'s' * (threads != 1)}, load average {os.getloadavg()[0]:.1f} on "
            f"{os.cpu_count()} cores at the end")


def refresh(dest: Path) -> dict:
    """Recompute every table stage's headline of OUT/NAME/manifest.json from its committed
    table OUT/NAME/STAGE.parquet, and write the manifest."""
    m = read_json(dest / "manifest.json")
    for stage, row in m["stages"].items():
        if (dest / f"{stage}.parquet").exists():
            row["headline"] = headline(stage, read_table(dest / f"{stage}.parquet"))
    write_json(dest / "manifest.json", m)
    return m


# ----------------------------------------------------------------------------- rendering


def render_index(out: Path) -> str:
    """OUT/README.md from every OUT/*/manifest.json: per study, one row per stage."""
    lines = ["# Figures", "", "Every file here is regenerated by a command; none is edited by hand. This index is "
             "rendered from the manifests beside the figures (`memtool figures --index OUT`, run by every "
             "`memtool figures`): per stage its files, data, date, wall time (during which at least one "
             "invocation worked on it; their summed time beside it where processes ran at once) and headline "
             "numbers, read from the stage's own table.", ""]
    if all_verdicts(out):
        lines += [f"[{VERDICT_FIGURE}]({VERDICT_FIGURE}): every study's decisive contrasts with their 95 % intervals, "
                  "coloured by the verdict the README's verdict lines give them (`memtool.manifest.study_verdicts`).",
                  ""]
    for path in sorted(Path(out).glob("*/manifest.json")):
        m = read_json(path)
        lines += [f"## {m['name']}", "", m.get("description", ""), "", f"Command: `{m['command']}`", "",
                  "| stage | files | data | date | wall time | headline |", "|---|---|---|---|---|---|"]
        for stage, r in m["stages"].items():
            files = ", ".join(f"[{f}]({m['name']}/{f})" for f in r.get("files", []))
            wall = "-" if r.get("wall_s") is None else f"{r['wall_s']:.0f} s ({r.get('load') or 'load not recorded'}" + (
                f"; {r['process_s']:.0f} s over {r['invocations']} processes"
                if (r.get("process_s") or 0) > 1.01 * r["wall_s"] else "") + ")"
            head = "; ".join(f"{h['label']}: {fmt(h)}" for h in r.get("headline", []))
            lines.append(f"| {stage} | {files} | {r.get('data', '')} | {r.get('date', '')} | {wall} | {head} |")
        lines.append("")
    return "\n".join(lines)


def write_index(out: Path) -> Path:
    """OUT/README.md (:func:`render_index`), and OUT/verdicts.png, the verdicts drawn, where any
    study has one."""
    path = Path(out) / "README.md"
    path.write_text(render_index(out))
    verdicts = all_verdicts(out)
    if verdicts:
        import matplotlib.pyplot as plt

        from .figures import verdict_figure

        plt.close(verdict_figure(verdicts, Path(out) / VERDICT_FIGURE))
    return path


RESULT_STAGES = ("validate", "validate_transfer", "finding_a", "finding_b", "bat_comparison")


def render_results(out: Path, link_prefix: str = "figures") -> str:
    """The README's results table: the headline of every result stage, a column per study."""
    studies = [read_json(p) for p in sorted(Path(out).glob("*/manifest.json"))]
    studies = [m for m in studies if any(s in m["stages"] for s in RESULT_STAGES)]
    lines = ["| result | " + " | ".join(m["name"] for m in studies) + " |", "|---|" + "---|" * len(studies)]
    for stage in RESULT_STAGES:
        labels = dict.fromkeys(h["label"] for m in studies for h in m["stages"].get(stage, {}).get("headline", []))
        for label in labels:
            cells = []
            for m in studies:
                h = next((h for h in m["stages"].get(stage, {}).get("headline", []) if h["label"] == label), None)
                cells.append("-" if h is None else f"[{fmt(h)}]({link_prefix}/{m['name']}/{stage}.md)")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


DIFFERENCE = ("resolved: higher", "resolved: lower", "no resolved difference")
CURVE = ("beyond the curve", "inside the curve", "no resolved gap to the curve")


def verdict(h: dict, margin: float | None = None, words: tuple[str, str, str] = DIFFERENCE) -> str:
    """What an interval of a difference supports, and nothing more: ``words[0]`` ("resolved:
    higher") / ``words[1]`` ("resolved: lower") only when it excludes 0, "equivalent within
    +-m points" only with a declared ``margin`` that contains it, else ``words[2]`` ("no
    resolved difference")."""
    lo, hi = h.get("low"), h.get("high")
    if lo is None or hi is None:
        return "one seed: no interval"
    if lo > 0:
        return words[0]
    if hi < 0:
        return words[1]
    if margin is not None and -margin <= lo and hi <= margin:
        return f"equivalent within ±{100 * margin:g} points"
    return words[2]


NO_STAND_IN = "no verdict: APGD-CE+T does not stand in for AutoAttack by the declared rule (docs/bat.md)"
VERDICT_FIGURE = "verdicts.png"  # OUT/verdicts.png: the verdict lines drawn (write_index)
VERDICT_BEGIN, VERDICT_END = "<!-- verdict:begin -->", "<!-- verdict:end -->"
FINDING_A_VERDICTS = ("AT robust loss - ST clean loss", "AT robust loss - AT clean loss")  # its table's contrasts


def _points(value, low, high, seeds) -> dict:
    return {"value": value, "low": None if pd.isna(low) else low, "high": None if pd.isna(high) else high,
            "unit": "points", "seeds": seeds}


def study_verdicts(study: Path) -> list[tuple[str, dict, str]]:
    """(label, interval, verdict) of a study's decisive contrasts, read from its tables: finding
    (a)'s :data:`FINDING_A_VERDICTS`; finding (b)'s harmful - random removal, robust, at the
    largest k (Holm-adjusted); and every BAT variant of the comparison that has the robust
    evaluation (AutoAttack or APGD-CE+T): its paired difference to PGD-AT (with the table's
    declared ``margin``; a table whose intervals count the seeds alone says so) and its gap to the
    baselines' frontier (its interval over seeds and test samples; one seed: none); none of them
    where APGD-CE+T failed the declared check against standard AutoAttack."""
    study, out = Path(study), []
    if (study / "finding_a.parquet").exists():
        for c in read_table(study / "finding_a.parquet").attrs["memtool"].get("contrasts", []):
            if c["contrast"] in FINDING_A_VERDICTS:
                h = _points(c["diff"], c["diff_low"], c["diff_high"], c["seeds"])
                out.append((f"(a) {c['contrast']}", h, verdict(h)))
    if (study / "finding_b.parquet").exists():
        info = read_table(study / "finding_b.parquet").attrs["memtool"]
        for c in info.get("contrasts", []):
            if c["contrast"] == f"harmful {max(info['sizes'])} - random {max(info['sizes'])}: robust":
                h = _points(c["diff"], c["diff_low"], c["diff_high"], c["seeds"])
                out.append((f"(b) {c['contrast']} (Holm)", h, verdict(h)))
    if (study / "bat_comparison.parquet").exists():
        table = read_table(study / "bat_comparison.parquet")
        info = table.attrs["memtool"]
        aa = info.get("aa_attack", "autoattack")
        name = {"autoattack": "AutoAttack", "apgd": "APGD-CE+T"}[aa]
        barred = (info.get("agreement") or {}).get("apgd", {}).get("stands_in") is False  # the declared rule failed
        for v in [v for v in info["aa_variants"] if v.startswith("bat")]:
            r = table[(table["variant"] == v) & (table["group"] == "all test") & (table["metric"] == aa)]
            if len(r) and r["diff"].notna().iloc[0]:
                r = r.iloc[0]
                h = {**_points(r["diff"], r["diff_low"], r["diff_high"], int(r["seeds"])), "margin": info.get("margin")}
                fixed = "" if info.get("intervals") else " (test samples fixed)"  # a table from before crossed_interval
                said = NO_STAND_IN if barred else verdict(h, info.get("margin"))
                out.append((f"{v} - PGD-AT: {name}{fixed}", h, said))
            for g in info.get("frontier_gaps", []):
                if g["variant"] == v and g["attack"] == aa:
                    h = _points(g["gap"], *((g["gap_low"], g["gap_high"]) if g["seeds"] > 1 else (None, None)),
                                g["seeds"])
                    out.append((f"{v} vs the baselines' curve: {name}", h, NO_STAND_IN if barred else
                                verdict(h, words=CURVE)))
    return out


def all_verdicts(out: Path) -> list[tuple[str, str, dict, str]]:
    """(study, label, interval, verdict): :func:`study_verdicts` of every OUT/*/manifest.json."""
    return [(read_json(path)["name"], label, h, said) for path in sorted(Path(out).glob("*/manifest.json"))
            for label, h, said in study_verdicts(path.parent)]


def render_verdict(out: Path) -> str:
    """One line per study and decisive contrast (:func:`all_verdicts`): its verdict and numbers."""
    return "".join(f"- {study}, {label}: {said}, {fmt(h)}\n" for study, label, h, said in all_verdicts(out))


def _between(text: str, begin: str, end: str, body: str, readme) -> str:
    if begin not in text or end not in text:
        raise ValueError(f"{readme} has no {begin} ... {end} section: add the two lines where it goes")
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{body}{end}{rest.split(end, 1)[1]}"


def update_readme(readme: Path, out: Path) -> Path:
    """Replace the text between the results markers of ``readme`` with :func:`render_results`,
    and between the verdict markers (where present) with :func:`render_verdict`."""
    readme, text = Path(readme), Path(readme).read_text()
    prefix = os.path.relpath(Path(out).resolve(), readme.resolve().parent)
    text = _between(text, BEGIN, END, render_results(out, prefix), readme)
    if VERDICT_BEGIN in text:
        text = _between(text, VERDICT_BEGIN, VERDICT_END, render_verdict(out), readme)
    readme.write_text(text)
    return readme
