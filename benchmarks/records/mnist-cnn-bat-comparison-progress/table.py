"""The progress table of this record, from its files: `python benchmarks/records/mnist-cnn-bat-comparison-progress/table.py` (repository root)."""
import glob, json, os
d = "benchmarks/records/mnist-cnn-bat-comparison-progress"
print("| model | epochs trained | kept epoch | clean | PGD-20 | CW-20 | last epoch: clean / PGD-20 / CW-20 | AutoAttack: clean / AA (first 1,000) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for f in sorted(glob.glob(f"{d}/*.jsonl")):
    name = os.path.basename(f)[:-6]
    epochs = [json.loads(line)["epoch"] for line in open(f)]
    rec = {s: json.load(open(p)) for s in ("eval", "eval-last", "autoattack") if os.path.exists(p := f"{d}/{name}.{s}.json")}
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    ev, last, aa = rec.get("eval"), rec.get("eval-last"), rec.get("autoattack")
    kept = ev["checkpoint_rule"].split("(epoch ")[1].split(" of")[0] if ev and "(epoch " in ev["checkpoint_rule"] else "last"
    cells = [name, str(max(epochs)), kept if ev else "-"]
    cells += [pct(ev["clean_acc"]), pct(ev["other_attacks"]["pgd20"]), pct(ev["other_attacks"]["cw20"])] if ev else ["-"] * 3
    cells.append(" / ".join(pct(x) for x in (last["clean_acc"], last["other_attacks"]["pgd20"], last["other_attacks"]["cw20"])) if last else "-")
    cells.append(f"{pct(aa['clean_acc'])} / {pct(aa['autoattack_acc'])}" if aa else "-")
    print("| " + " | ".join(cells) + " |")
