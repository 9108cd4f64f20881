"""Progress record of an unfinished BAT comparison: copy each model's per-epoch log and the
robustbench.json of each finished evaluation from RUN/models/ into RECORD/, and print the
table of what is there (one row per model; no intervals: the stage's own table replaces it).

    python benchmarks/comparison_progress.py runs/mnist/bat_comparison benchmarks/records/mnist-cnn-bat-comparison-progress
    python benchmarks/comparison_progress.py --table benchmarks/records/mnist-cnn-bat-comparison-progress
    python benchmarks/comparison_progress.py --table references/mnist-regime/bat_comparison   # a stage's own records

RECORD/VARIANT-sS.jsonl is the model's log; RECORD/VARIANT-sS.SUB.json the robustbench.json of
its evaluation SUB (eval: clean, PGD-20, CW-20 at the kept epoch; eval-last: the same at the
last epoch; apgd: APGD-CE + APGD-T, autoattack: standard AutoAttack, on the stage's robust
evaluation samples), RECORD/VARIANT-sS.SUB.summary.json its summary (per-attack time_s and
cpu_s). Checkpoints are not copied. ``--table`` also reads a stage's folder as it is
(STAGE/models/VARIANT-sS/SUB/robustbench.json). A RECORD/README.md with the lines
<!-- table:begin --> and <!-- table:end --> gets the table between them (the prose around it is
written by hand).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

SUBS = ("eval", "eval-last", "apgd", "autoattack")
MARKERS = ("<!-- table:begin -->", "<!-- table:end -->")


def copy(run: Path, record: Path) -> None:
    record.mkdir(parents=True, exist_ok=True)
    for model in sorted((run / "models").iterdir()):
        if (model / "log.jsonl").exists():
            shutil.copyfile(model / "log.jsonl", record / f"{model.name}.jsonl")
        for sub in SUBS:
            for src, suffix in ((model / sub / "robustbench.json", "json"), (model / sub / "summary.json", "summary.json")):
                if src.exists():
                    shutil.copyfile(src, record / f"{model.name}.{sub}.{suffix}")


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _accuracies(rec: dict) -> list:
    """Clean, PGD-20 and CW-20 accuracy of a robustbench.json."""
    return [rec["clean_acc"], rec["other_attacks"]["pgd20"], rec["other_attacks"]["cw20"]]


def models(path: Path) -> dict[str, tuple[Path, dict, dict]]:
    """VARIANT-sS -> (its log, {SUB: its robustbench.json}, {SUB: its summary.json}) of every
    model with a log: from a RECORD (flat files) or a stage's folder (STAGE/models/VARIANT-sS/)."""
    def read(files: dict) -> dict:
        return {s: json.loads(f.read_text()) for s, f in files.items() if f.exists()}

    if (path / "models").is_dir():
        return {m.name: (m / "log.jsonl", read({s: m / s / "robustbench.json" for s in SUBS}),
                         read({s: m / s / "summary.json" for s in SUBS}))
                for m in sorted((path / "models").iterdir()) if (m / "log.jsonl").exists()}
    return {log.stem: (log, read({s: path / f"{log.stem}.{s}.json" for s in SUBS}),
                       read({s: path / f"{log.stem}.{s}.summary.json" for s in SUBS}))
            for log in sorted(path.glob("*.jsonl"))}


def _cpu(summary: dict | None) -> str:
    """The CPU seconds of an evaluation's attacks (its summary.json), or "-"."""
    cpu = [a.get("cpu_s") for a in (summary or {}).get("attacks", {}).values()]
    return "-" if not cpu or None in cpu else f"{sum(cpu):.0f}"


def table(record: Path) -> str:
    lines = ["| model | epochs trained | validation: best epoch, clean / PGD-20 | kept epoch | clean | PGD-20 | CW-20 | "
             "last epoch: clean / PGD-20 / CW-20 | robust evaluation (samples): clean / APGD-CE+T / AutoAttack | "
             "CPU s: training / PGD-20, CW-20 / APGD-CE+T / AutoAttack |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (log, rec, summary) in models(record).items():
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        epochs = max(r["epoch"] for r in rows)
        checked = [r for r in rows if r.get("val_robust_acc") is not None]
        best = max(checked, key=lambda r: (r["val_robust_acc"], -r["epoch"])) if checked else None  # first best, as train
        val = f"{best['epoch']}: {_pct(best['val_clean_acc'])} / {_pct(best['val_robust_acc'])}" if best else "-"
        ev, last = rec.get("eval"), rec.get("eval-last")
        robust = rec.get("autoattack") or rec.get("apgd")
        rule = ev["checkpoint_rule"] if ev else ""
        kept = rule.split("(epoch ")[1].split(" of")[0] if "(epoch " in rule else ("last" if ev else "-")
        cells = [name, str(epochs), val, kept]
        cells += [_pct(v) for v in _accuracies(ev)] if ev else ["-"] * 3
        cells.append(" / ".join(_pct(v) for v in _accuracies(last)) if last else "-")
        cells.append(f"({robust['n_test_samples']}): {_pct(robust['clean_acc'])} / "
                     f"{_pct(rec['apgd']['other_attacks']['apgd']) if 'apgd' in rec else '-'} / "
                     f"{_pct(robust['autoattack_acc'])}" if robust else "-")
        train = [r.get("cpu_s") for r in rows]
        cells.append(" / ".join(["-" if None in train else f"{sum(train):.0f}"] +
                                [_cpu(summary.get(s)) for s in ("eval", "apgd", "autoattack")]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def into_readme(record: Path, text: str) -> None:
    """Put ``text`` between the table markers of RECORD/README.md, where it has them."""
    readme = record / "README.md"
    if readme.exists() and MARKERS[0] in (old := readme.read_text()):
        begin, end = map(re.escape, MARKERS)
        readme.write_text(re.sub(f"{begin}.*?{end}", lambda _: f"{MARKERS[0]}\n{text}\n{MARKERS[1]}", old, flags=re.S))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", type=Path, help="RUN RECORD (copy, then print), or with --table: RECORD "
                                                        "or a stage's folder")
    p.add_argument("--table", action="store_true", help="only print the table of RECORD")
    a = p.parse_args(argv)
    if not a.table:
        if len(a.paths) != 2:
            p.error("give RUN and RECORD (or --table RECORD)")
        copy(*a.paths)
    text = table(a.paths[-1])
    if not a.table:
        into_readme(a.paths[-1], text)
    print(text)


if __name__ == "__main__":
    main()
