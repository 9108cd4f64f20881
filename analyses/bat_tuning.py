"""BAT's benign half, tuned on held-out training samples before the comparison (issue 31).

    python -m analyses.bat_tuning RUN --out runs/mnist/bat_tuning --val-samples 1000

Every candidate of each family in :data:`analyses.bat_comparison.FAMILIES` (five each: the
budget of PGD-AT's eps sweep, five points) is trained once, at the comparison's first seed, with the
comparison's recipe and ``memtool train --val-samples N``: N training samples from beyond
``--limit``, never trained on and never the test set, checked with PGD-20 at the study's eps
after every epoch. Each family keeps the candidate with the highest last-epoch PGD-20
accuracy on them (clean accuracy breaks ties). The BAT comparison then runs the chosen ones
at every seed (its ``tuned`` setting). Written to OUT:

- ``models/VARIANT/``: each candidate's training run (checkpoint, ``log.jsonl``); without its
  checkpoint (what a study commits) a finished candidate is read from its log and config;
- ``bat_tuning.parquet`` / ``bat_tuning.md``: every candidate's held-out clean and PGD-20
  accuracy, the chosen one per family (also in the table's metadata, ``chosen``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from memtool.checkpoints import CHECKPOINT
from memtool.config import check_int, setting
from memtool.estimator import Thresholds
from memtool.experiments import experiment_seeds, slug
from memtool.recipe import Recipe
from memtool.rundir import write_table
from memtool.sharing import shared
from memtool.training import TrainConfig, check_trained, train

from .bat_comparison import FAMILIES, recipes
from .study import StudySettings, load_study, main as study_main


def last_epoch(log_path: Path) -> dict:
    """The last record of a training log (``log.jsonl``)."""
    return json.loads(Path(log_path).read_text().splitlines()[-1])


def choose(table: pd.DataFrame) -> dict[str, str]:
    """family -> its candidate of the highest held-out robust accuracy (then clean; then the first listed)."""
    ranked = table.assign(order=range(len(table))).sort_values(["val_robust", "val_clean", "order"],
                                                                ascending=[False, False, True])
    return ranked.groupby("family", sort=False)["variant"].first().to_dict()


@dataclass(frozen=True)
class Tuning(StudySettings):
    seeds: int = setting(1, "models per candidate: 1 (tuning trains each once, at the comparison's first seed)")
    val_samples: int = setting(1000, "held-out training samples from beyond --limit that the candidates are judged on")
    judges: str | None = setting(None, "harmfulness table of the 'bat judged' family (finding (b)'s "
                                       "harmfulness.parquet)")
    families: tuple[str, ...] | None = setting(None, f"families to tune (default: all of {list(FAMILIES)})")

    def __post_init__(self):
        super().__post_init__()
        if self.seeds != 1:
            raise ValueError(f"seeds must be 1 for tuning (each candidate trains once, at the comparison's first "
                             f"seed), got {self.seeds}")
        check_int("val_samples", self.val_samples, 1)


def run(run_dir, out, *, seeds: int = 1, eps: float | None = None, pgd_steps: int = 10, val_samples: int = 1000,
        judges=None, families=None, thresholds: Thresholds = Thresholds(), recipe: Recipe | None = None,
        device: str = "cpu", data_root=None, progress: bool = True) -> pd.DataFrame:
    """Train and judge every candidate of ``families`` (default: all) into ``out``, once each at
    the comparison's first seed (``seeds``: 1)."""
    Tuning(seeds=seeds, eps=eps, pgd_steps=pgd_steps, val_samples=val_samples)  # validated
    run_dir, out = Path(run_dir), Path(out)
    st = load_study(run_dir, eps, thresholds, device, data_root)
    cfg, eps = st.config, st.eps
    if cfg.limit is None:
        raise ValueError(f"{run_dir} estimated on every training sample, and tuning judges on held-out training "
                         "samples beyond the run's --limit: use a run of the first N samples (--limit N)")
    unknown = set(families or ()) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown BAT families {sorted(unknown)}; choose from {list(FAMILIES)}")
    families = {f: FAMILIES[f] for f in families or FAMILIES}
    todo = recipes(recipe or cfg.recipe, eps, run_dir, [v for c in families.values() for v in c], pgd_steps, judges)
    seed = experiment_seeds(cfg.seed, 1)[0]  # the comparison's seed 0

    def fit(v):  # a finished candidate whose checkpoint is gone (a committed study): its log and config suffice
        config, where = TrainConfig(dataset=cfg.dataset, limit=cfg.limit, seed=seed, recipe=todo[v], eval_samples=0,
                                    val_samples=val_samples), out / "models" / slug(v)
        if not (where / CHECKPOINT).exists() and (where / "log.jsonl").exists() and \
                last_epoch(where / "log.jsonl")["epoch"] == todo[v].epochs:
            return check_trained(config, where, data_root)
        train(config, where, progress=False, device=device, data_root=data_root)

    shared(list(todo), "train", fit, claims=out / "claims", desc="BAT candidates", progress=progress, name=slug)
    rows = []
    for family, candidates in families.items():
        for v in candidates:
            rec = last_epoch(out / "models" / slug(v) / "log.jsonl")
            rows.append({"family": family, "variant": v, "val_clean": rec["val_clean_acc"],
                         "val_robust": rec["val_robust_acc"]})
    table = pd.DataFrame(rows)
    chosen = choose(table)
    table["chosen"] = table["variant"].isin(list(chosen.values()))
    info = {"run": str(run_dir), "eps": eps, "val_samples": val_samples, "val_attack": "pgd20", "seed": seed,
            "chosen": chosen, "budget": {f: len(c) for f, c in families.items()}}
    write_table(table, out / "bat_tuning.parquet", info)
    (out / "bat_tuning.md").write_text(
        f"# BAT's benign half, tuned on held-out training samples ({cfg.dataset})\n\n"
        f"Each candidate trained once (seed {seed}) and judged on training samples {cfg.limit:,}-"
        f"{cfg.limit + val_samples - 1:,} (never trained on; not the test set): clean and PGD-20 accuracy at eps "
        f"{eps:g} after the last epoch. Chosen per family: the highest PGD-20 accuracy.\n\n"
        "| family | variant | held-out clean % | held-out PGD-20 % | chosen |\n|---|---|---|---|---|\n"
        + "".join(f"| {r.family} | {r.variant} | {100 * r.val_clean:.1f} | {100 * r.val_robust:.1f} | "
                  f"{'yes' if r.chosen else ''} |\n" for r in table.itertuples()))
    return table


def main(argv=None):
    table = study_main(__doc__, run, Tuning, argv)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
