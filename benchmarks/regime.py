"""Where does PGD-AT fit its atypical training samples? (issue 31, step 1: choose the regime)

    OMP_NUM_THREADS=1 python benchmarks/regime.py references/mnist --out benchmarks/records/regime/mnist \
        --candidates 0.1x20 0.1x30 0.1x15 0.2x30

For each candidate ``EPSxEPOCHS`` one PGD-AT model (seed 0) is trained with the robust study's
small-CNN recipe (hidden 256, batch 128, lr 0.05 one-cycle, PGD-10 in training) on the run's
training samples, then measured with PGD-20 at the training eps on every training sample, split
by the run's mem >= 0.25 (atypical / typical), and on the first 1,000 test samples. One JSON per
candidate in OUT (skipped when it exists: rerun the same command to resume). The target:
>= 95 % robust training accuracy on the atypical training samples.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch

from analyses.study import load_study
from memtool.engine import fit
from memtool.methods import PGDAT
from memtool.recipe import Recipe


def measure(study, eps: float, epochs: int, seed: int, pgd_steps: int = 10, n_test: int = 1000, lr: float = 0.05,
            without_atypical: bool = False, drop_last: bool = False) -> dict:
    data, atyp = study.data, study.atypical_train
    train = np.flatnonzero(~atyp) if without_atypical else np.arange(len(data.y_train))
    recipe = Recipe(model="cnn", hidden=256, epochs=epochs, batch_size=128, lr=lr, schedule="onecycle",
                    drop_last=drop_last, method=PGDAT(eps=eps, pgd_steps=pgd_steps)).for_dataset(study.config.dataset)
    wall, cpu = time.time(), time.process_time()
    models = fit(recipe, data.x_train, data.y_train, [train], [seed],
                 num_classes=data.num_classes)
    train_s = (time.time() - wall, time.process_time() - cpu)
    out = {"eps": eps, "epochs": epochs, "lr": lr, "drop_last": drop_last, "pgd_steps": pgd_steps, "seed": seed,
           "without_atypical": without_atypical, "recipe": recipe.to_dict(),
           "n_atypical_train": int(atyp.sum()), "n_train": len(atyp), "n_test": n_test,
           "train_wall_s": round(train_s[0], 1), "train_cpu_s": round(train_s[1], 1)}
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test[:n_test], data.y_test[:n_test])):
        clean = (models.margins(x, y)[0] > 0).numpy()
        robust = (models.margins(x, y, robust=eps, steps=20)[0] > 0).numpy()
        groups = ({"atypical train": atyp, "typical train": ~atyp} if split == "train"
                  else {"test": np.ones(n_test, bool)})
        for g, mask in groups.items():
            out[g] = {"clean": float(clean[mask].mean()), "pgd20": float(robust[mask].mean())}
    out["total_wall_s"] = round(time.time() - wall, 1)
    out["total_cpu_s"] = round(time.process_time() - cpu, 1)
    out["host"], out["threads"] = socket.gethostname(), torch.get_num_threads()
    return out


def table(out: Path) -> str:
    """The measured candidates of OUT as a markdown table (what benchmarks/README.md shows)."""
    rows = sorted((json.loads(f.read_text()) for f in out.glob("*.json")),
                  key=lambda r: (r.get("without_atypical", False), r["eps"], r["epochs"], -r.get("lr", 0.05)))
    lines = ["| eps | epochs | peak lr | last batch | trained on | atypical train: PGD-20 / clean "
             "| typical train: PGD-20 / clean | test: PGD-20 / clean | train CPU s |",
             "|---:|---:|---:|---|---|---|---|---|---:|"]
    pct = lambda g: f"{100 * g['pgd20']:.1f} / {100 * g['clean']:.1f} %"  # noqa: E731
    for r in rows:
        on = f"typical only, seed {r['seed']}" if r.get("without_atypical") else "all"
        lines.append(f"| {r['eps']:g} | {r['epochs']} | {r.get('lr', 0.05):g} | "
                     f"{'dropped' if r.get('drop_last') else 'kept'} | {on} | {pct(r['atypical train'])} | "
                     f"{pct(r['typical train'])} | {pct(r['test'])} | {r['train_cpu_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run directory with score tables (e.g. references/mnist)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--candidates", nargs="+", default=["0.1x20", "0.1x30"], help="EPSxEPOCHS")
    p.add_argument("--lr", type=float, default=0.05, help="the one-cycle schedule's peak learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--drop-last", action="store_true", help="skip each epoch's partial batch (Recipe.drop_last)")
    p.add_argument("--without-atypical", action="store_true",
                   help="train on the typical samples only (finding (a)'s removal model: a stability check)")
    a = p.parse_args(argv)
    study = load_study(a.run, device=a.device)
    a.out.mkdir(parents=True, exist_ok=True)
    for c in a.candidates:
        eps, epochs = c.split("x")
        lr = "" if a.lr == 0.05 else f"-lr{a.lr:g}"
        without = "-without-atypical" if a.without_atypical else ""
        drop = "-drop-last" if a.drop_last else ""
        path = a.out / f"eps{eps}-epochs{epochs}{lr}{drop}{without}-seed{a.seed}.json"
        if path.exists():
            print(f"{path}: done")
            continue
        r = measure(study, float(eps), int(epochs), a.seed, lr=a.lr, without_atypical=a.without_atypical,
                    drop_last=a.drop_last)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(r, indent=1))
        os.replace(tmp, path)
        print(f"eps {eps} x {epochs} epochs, lr {a.lr:g}: atypical train {r['atypical train']}, typical train "
              f"{r['typical train']}, test {r['test']}, {r['train_cpu_s']:.0f} CPU s -> {path}", flush=True)
    print(table(a.out))


if __name__ == "__main__":
    main()
