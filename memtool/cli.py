"""The `memtool` command. Each subcommand is a thin wrapper over the Python API function of
the same name, with the same parameter names (``--label-noise`` is ``label_noise=``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT = argparse.SUPPRESS  # unset flags stay unset, so the dataclasses own every default


def _estimate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run (must match when reopening a run directory)")
    g.add_argument("--dataset", default=DEFAULT, help="dataset name (`memtool datasets` lists them); default mnist")
    g.add_argument("--limit", type=int, default=DEFAULT, help="keep the first N training samples")
    g.add_argument("--label-noise", type=float, default=DEFAULT, help="fraction of training labels to flip")
    g.add_argument("--ratio", type=float, default=DEFAULT, help="subset size / training set size (0.7)")
    g.add_argument("--seed", type=int, default=DEFAULT, help="seed of plan, noise, inits, orders (0)")
    g.add_argument("--robust", action=argparse.BooleanOptionalAction, default=DEFAULT,
                   help="also record PGD robust correctness (default: on for --train pgd-at)")
    r = p.add_argument_group("training recipe")
    r.add_argument("--model", default=DEFAULT, help="mlp | cnn | preact-resnet18 | wrn-D-W (mlp)")
    r.add_argument("--hidden", type=int, default=DEFAULT, help="hidden width (256)")
    r.add_argument("--epochs", type=int, default=DEFAULT, help="epochs per model (20)")
    r.add_argument("--batch-size", type=int, default=DEFAULT, help="minibatch size per model (128)")
    r.add_argument("--optimizer", default=DEFAULT, help="sgd | adam (sgd)")
    r.add_argument("--lr", type=float, default=DEFAULT, help="peak learning rate (0.1)")
    r.add_argument("--momentum", type=float, default=DEFAULT, help="SGD Nesterov momentum (0.9)")
    r.add_argument("--weight-decay", type=float, default=DEFAULT, help="L2 coefficient (0)")
    r.add_argument("--schedule", default=DEFAULT, help="constant | linear | onecycle | multistep (constant)")
    r.add_argument("--precision", default=DEFAULT, help="fp32 | bf16 (fp32)")
    r.add_argument("--train", default=DEFAULT, help="standard | pgd-at (standard)")
    r.add_argument("--eps", type=float, default=DEFAULT, help="L-inf radius on the [0,1] scale (0.3)")
    r.add_argument("--pgd-steps", type=int, default=DEFAULT, help="PGD steps in training (10)")
    e = p.add_argument_group("execution (does not change results)")
    e.add_argument("--trials", type=int, default=DEFAULT, help="number of trained models (64)")
    e.add_argument("--ensemble-size", type=int, default=DEFAULT, help="models trained at once (auto)")
    e.add_argument("--device", default=DEFAULT, help="cpu | cuda | cuda:N (cpu)")
    e.add_argument("--n-jobs", type=int, default=DEFAULT, help="worker processes over trial batches (1)")
    e.add_argument("--scheduler", default=DEFAULT, help="Dask scheduler address, e.g. tcp://host:8786")
    e.add_argument("--shard", default=DEFAULT, help="i/N: train only this share (SLURM arrays)")
    e.add_argument("--data-root", default=DEFAULT, help="folder with CIFAR / Tiny ImageNet ($MEMTOOL_DATA_ROOT)")


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mem-threshold", type=float, default=DEFAULT, help="high-memorization threshold (0.25)")
    p.add_argument("--infl-threshold", type=float, default=DEFAULT, help="high-influence threshold (0.15)")
    p.add_argument("--top-k", type=int, default=DEFAULT, help="top influential train samples per test sample (10)")


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def print_summary(s: dict, run: str | Path, file=None) -> None:
    """The numbers a user looks at first, and where the tables are."""
    run = Path(run)
    lines = [f"trials: {s['n_trials']}   train samples: {s['n_train']}   test samples: {s['n_test']}",
             f"mean accuracy: train (own subset) {_fmt(s['train_acc_in_subset'])}, test {_fmt(s['test_acc'])}",
             f"high-memorization samples (mem >= {s['mem_threshold']}): {s['n_high_mem']} "
             f"({100 * s['frac_high_mem']:.1f} %);  no estimate: {s['n_no_estimate']};  "
             f"median mem_se {_fmt(s['median_mem_se'])}",
             f"high-influence pairs (infl >= {s['infl_threshold']}): {s['n_high_pairs']} over "
             f"{s['n_test_in_high_pairs']} test samples"]
    if "noise_auroc_mem" in s:
        lines.append(f"planted label noise ({s['n_label_corrupted']} flipped): AUROC of mem "
                     f"{_fmt(s['noise_auroc_mem'])}, of margin_mem {_fmt(s['noise_auroc_margin_mem'])}")
    if "split_half" in s:
        lines.append("split-half agreement (even vs odd trials): "
                     + ", ".join(f"{k} {_fmt(v)}" for k, v in s["split_half"].items()))
    if "rob_test_acc" in s:
        lines.append(f"robust accuracy: train (own subset) {_fmt(s['rob_train_acc_in_subset'])}, "
                     f"test {_fmt(s['rob_test_acc'])};  high robust-mem samples {s['n_high_rob_mem']}")
    lines += [f"wrote {run / 'scores.parquet'}", f"wrote {run / 'influence.parquet'}", f"run directory {run}"]
    print("\n".join(lines), file=file or sys.stdout)


def cmd_estimate(a: argparse.Namespace) -> int:
    from .estimator import estimate
    from .estimator.config import load_config_file

    kw = load_config_file(a.config) if getattr(a, "config", None) else {}
    kw.update({k: v for k, v in vars(a).items() if k not in ("cmd", "func", "config", "quiet")})
    kw.setdefault("trials", 64)
    out = kw.pop("out", None)
    if out is None:
        raise SystemExit("memtool estimate: --out RUN (or `out:` in the config file) is required")
    result = estimate(out, progress=not a.quiet, **kw)
    if result["status"] == "partial":
        print(f"{result['missing_trials']} trials of this run are not finished yet (other shards?); "
              f"when all are, run `memtool scores {out}`. Trial files are in {Path(out) / 'trials'}")
    else:
        print_summary(result, out)
    return 0


def cmd_scores(a: argparse.Namespace) -> int:
    from .estimator import compute_tables

    kw = {k: v for k, v in vars(a).items() if k in ("mem_threshold", "infl_threshold", "top_k")}
    print_summary(compute_tables(a.run, **kw), a.run)
    return 0


def cmd_import_fz(a: argparse.Namespace) -> int:
    from .fz import import_fz

    kw = {k: v for k, v in vars(a).items() if k in ("mem_threshold", "infl_threshold", "top_k")}
    paths = import_fz(a.files, a.out, **kw)
    for p in paths:
        print(f"wrote {p}")
    return 0


def cmd_figures(a: argparse.Namespace) -> int:
    from .figures import run_figures

    for p in run_figures(a.run, a.out):
        print(f"wrote {p}")
    return 0


def cmd_datasets(a: argparse.Namespace) -> int:
    from .datasets import dataset_status

    rows = dataset_status(getattr(a, "data_root", None))
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        mark = "yes" if r["available"] else "no "
        print(f"{r['name']:<14} {mark}  {r['classes']:>3} classes  {r['shape']:<8} {r['description']}")
        if not r["available"]:
            print(f"{'':<19}{r['how_to_get']}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from .training import TrainConfig, train

    kw = {k: v for k, v in vars(a).items() if k not in ("cmd", "func", "out", "device", "quiet")}
    try:
        train(TrainConfig(**kw), a.out, progress=not a.quiet, device=getattr(a, "device", "cpu"))
    except KeyboardInterrupt:
        print(f"\nmemtool train: interrupted; finished epochs are in {Path(a.out) / 'checkpoint.pt'}, "
              "run the same command again to continue", file=sys.stderr)
        return 130
    print(f"load it with memtool.load_model({str(a.out)!r}); log in {Path(a.out) / 'log.jsonl'}")
    return 0


def print_evaluation(s: dict, out: str | Path, file=None) -> None:
    lines = [f"{s['dataset']} test samples: {s['n_samples']}   eps {s['eps']:g}"]
    for name, r in s["attacks"].items():
        step = r.get("step_size", "")
        step = f"{step:.4g}" if isinstance(step, float) else str(step)
        lines.append(f"  {name:<12} {r['n_correct']:>6}/{r['n']:<6} = {100 * r['accuracy']:6.2f} %   "
                     f"norm {r.get('norm', '-')}, steps {r.get('steps', '-')}, step size {step}, "
                     f"{r['time_s']:.0f} s")
    w = s["worst_case"]
    lines += [f"  {'worst case':<12} {w['n_correct']:>6}/{w['n']:<6} = {100 * w['accuracy']:6.2f} %",
              f"wrote {Path(out) / 'per_sample.parquet'}", f"wrote {Path(out) / 'summary.json'}"]
    print("\n".join(lines), file=file or sys.stdout)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluation import evaluate

    kw = {k: v for k, v in vars(a).items() if k not in ("cmd", "func", "checkpoint", "quiet", "backend")}
    if getattr(a, "backend", None):
        kw["attack_options"] = {"autoattack": {"backend": a.backend}}
    try:
        summary = evaluate(a.checkpoint, progress=not a.quiet, **kw)
    except KeyboardInterrupt:
        print(f"\nmemtool evaluate: interrupted; finished batches are saved in {Path(a.out) / 'state'}, "
              "run the same command again to continue", file=sys.stderr)
        return 130
    print_evaluation(summary, a.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memtool", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("estimate", help="train models on random subsets and score every sample")
    p.add_argument("--out", default=DEFAULT, help="run directory (created, or resumed)")
    p.add_argument("--config", help="YAML/JSON file with the same settings; flags override it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _estimate_args(p)
    _score_args(p)
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("scores", help="recompute a run's score tables from its trials and print a summary")
    p.add_argument("run")
    _score_args(p)
    p.set_defaults(func=cmd_scores)

    p = sub.add_parser("import-fz", help="turn Feldman & Zhang's released .npz files into score tables")
    p.add_argument("files", nargs="+", help="cifar100_infl_matrix.npz and/or the high-influence-pairs .npz")
    p.add_argument("--out", required=True, help="run directory to write")
    _score_args(p)
    p.set_defaults(func=cmd_import_fz)

    p = sub.add_parser("train", help="train one model: standard, PGD-AT, TRADES or MART (resumable)")
    p.add_argument("--out", required=True, help="output directory (created, or resumed)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--device", default=DEFAULT, help="cpu | cuda | cuda:N (cpu)")
    p.add_argument("--method", default=DEFAULT, help="standard | pgd-at | trades | mart (standard)")
    p.add_argument("--dataset", default=DEFAULT, help="dataset name (`memtool datasets` lists them); default mnist")
    p.add_argument("--model", default=DEFAULT, help="mlp | cnn | preact-resnet18 | wrn-D-W (cnn)")
    p.add_argument("--hidden", type=int, default=DEFAULT, help="hidden width (256)")
    p.add_argument("--eps", type=float, default=DEFAULT, help="L-inf radius on the [0,1] scale (0.3)")
    p.add_argument("--eps-warmup", type=float, default=DEFAULT, help="epochs over which eps ramps up from 0 (0)")
    p.add_argument("--epochs", type=int, default=DEFAULT, help="epochs (10)")
    p.add_argument("--batch-size", type=int, default=DEFAULT, help="minibatch size (128)")
    p.add_argument("--lr", type=float, default=DEFAULT, help="peak learning rate, SGD (0.05)")
    p.add_argument("--momentum", type=float, default=DEFAULT, help="SGD momentum (0.9)")
    p.add_argument("--weight-decay", type=float, default=DEFAULT, help="L2 coefficient (0)")
    p.add_argument("--schedule", default=DEFAULT, help="constant | linear | onecycle | multistep (onecycle)")
    p.add_argument("--pgd-steps", type=int, default=DEFAULT, help="steps of the training attack (10)")
    p.add_argument("--step-size", type=float, default=DEFAULT, help="its step size (2.5 * eps / pgd-steps)")
    p.add_argument("--beta", type=float, default=DEFAULT, help="TRADES / MART trade-off (6)")
    p.add_argument("--seed", type=int, default=DEFAULT, help="seed of init, order, attack noise (0)")
    p.add_argument("--limit", type=int, default=DEFAULT, help="keep the first N training samples")
    p.add_argument("--label-noise", type=float, default=DEFAULT, help="fraction of training labels to flip")
    p.add_argument("--data-root", default=DEFAULT, help="folder with CIFAR / Tiny ImageNet ($MEMTOOL_DATA_ROOT)")
    p.add_argument("--eval-samples", type=int, default=DEFAULT, help="test samples checked every epoch (1000)")
    p.add_argument("--eval-steps", type=int, default=DEFAULT, help="PGD steps of that check (20)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="per-sample robustness of a trained model under attacks (resumable)")
    p.add_argument("checkpoint", help="a `memtool train` output directory or its checkpoint.pt")
    p.add_argument("--out", required=True, help="output directory (created, or resumed)")
    p.add_argument("--dataset", default=DEFAULT, help="dataset (default: the one trained on)")
    p.add_argument("--attacks", default=DEFAULT,
                   help="comma-separated: clean,fgsm,pgdK[-l2][-rR],cwK,autoattack (clean,pgd20)")
    p.add_argument("--eps", type=float, default=DEFAULT, help="radius on the [0,1] scale (default: the training eps)")
    p.add_argument("--n-samples", type=int, default=DEFAULT, help="first N test samples only (all)")
    p.add_argument("--batch-size", type=int, default=DEFAULT,
                   help="samples per attack batch; flags are saved after each (200)")
    p.add_argument("--seed", type=int, default=DEFAULT, help="seed of the attacks' random starts (0)")
    p.add_argument("--backend", default=None, help="AutoAttack package: pyautoattack | torchattacks (pyautoattack)")
    p.add_argument("--device", default=DEFAULT, help="cpu | cuda | cuda:N (cpu)")
    p.add_argument("--data-root", default=DEFAULT)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("figures", help="plot a run: mem histogram, most memorized images, high-influence pairs")
    p.add_argument("run")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser("datasets", help="list the datasets and whether each is on disk")
    p.add_argument("--data-root", default=DEFAULT)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_datasets)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .datasets import MissingDatasetError
    from .estimator.store import RunMismatchError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (MissingDatasetError, RunMismatchError, ValueError, FileNotFoundError) as e:
        print(f"memtool {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nmemtool {args.cmd}: interrupted; finished trial batches are saved, "
              "run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
