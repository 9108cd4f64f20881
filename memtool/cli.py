"""The `memtool` command. Each subcommand calls the Python API function of the same name with
the same parameter names (``--label-noise`` is ``label_noise=``); every flag is generated
from the dataclass field that declares it (:func:`memtool.config.add_flags`), so its help
text and default live in one place."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import signal
import subprocess
import sys
import warnings
from dataclasses import fields
from pathlib import Path

from .config import Runtime, add_flags, flag_values, load_config_file
from .estimator.config import EstimateConfig
from .estimator.run import Execution
from .estimator.scores import MEM_THRESHOLD
from .estimator.tables import Thresholds
from .evaluation import Evaluation
from .methods import METHODS
from .models import SPEC
from .recipe import Recipe
from .training import TrainConfig


def strict_json(obj):
    """``obj`` with NaN and infinities as None (JSON has no NaN: null)."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _false_pairs(s: dict) -> str:
    """How many of the high-influence pairs are expected to be false (the empirical-Bayes
    posterior of influence.parquet's p_high), and a warning when it is most of them."""
    if "expected_false_pairs" not in s or not s["n_high_pairs"]:
        return ""
    false = s["expected_false_pairs"]
    note = f";  expected false: {false:.0f} ({100 * false / s['n_high_pairs']:.0f} %, posterior p_high)"
    return note + ("  -- most are noise: train more trials" if false > s["n_high_pairs"] / 2 else "")


def _pair_rule(s: dict) -> str:
    from .estimator.pairs import ASH_CUT

    infl = f"infl >= {s['infl_threshold']}"
    return {"probit": f"probit {infl}", "ash": f"ash P({infl}) >= {ASH_CUT}"}.get(s.get("pairs"), infl)


def print_summary(s: dict, run: str | Path, file=None) -> None:
    """The numbers a user looks at first, and where the tables are."""
    run = Path(run)
    lines = [f"trials: {s['n_trials']}   train samples: {s['n_train']}   test samples: {s['n_test']}",
             f"mean accuracy: train (own subset) {_fmt(s['train_acc_in_subset'])}, test {_fmt(s['test_acc'])}",
             f"high-memorization samples (mem >= {s['mem_threshold']}): {s['n_high_mem']} "
             f"({100 * s['frac_high_mem']:.1f} %);  no estimate: {s['n_no_estimate']};  "
             f"median mem_se {_fmt(s['median_mem_se'])}",
             f"high-influence pairs ({_pair_rule(s)}): "
             f"{s['n_high_pairs']} over "
             f"{s['n_test_in_high_pairs']} test samples" + _false_pairs(s)]
    if "noise_auroc_mem" in s:
        lines.append(f"planted label noise ({s['n_label_corrupted']} flipped): AUROC of mem "
                     f"{_fmt(s['noise_auroc_mem'])}, of margin_mem {_fmt(s['noise_auroc_margin_mem'])}")
    for key in ("fit_warning", "unfinished"):
        if key in s:
            lines.append(f"WARNING: {s[key]}")
    if "split_half" in s:
        lines.append("split-half agreement (even vs odd trials): "
                     + ", ".join(f"{k} {_fmt(v)}" for k, v in s["split_half"].items()))
    if "rob_test_acc" in s:
        lines.append(f"robust accuracy: train (own subset) {_fmt(s['rob_train_acc_in_subset'])}, "
                     f"test {_fmt(s['rob_test_acc'])};  high robust-mem samples {s['n_high_rob_mem']}")
    lines += [f"wrote {run / 'scores.parquet'}", f"wrote {run / 'influence.parquet'}", f"run directory {run}"]
    print("\n".join(lines), file=file or sys.stdout)


def _settings(a: argparse.Namespace, *classes) -> dict:
    """Flags given on the command line, over the settings of ``--config FILE`` if any."""
    kw = load_config_file(a.config) if getattr(a, "config", None) else {}
    flags = {f.metadata["flag"].lstrip("-").replace("-", "_"): f.name for cls in (*classes, *METHODS.values())
             for f in fields(cls) if f.metadata.get("flag")}  # a key named as its flag: `lambda` is lam
    kw = {flags.get(k, k): v for k, v in kw.items()}
    for cls in classes:
        kw.update(flag_values(a, cls))
    if "method" in vars(a):
        kw["method"] = a.method
    for name in {f for m in METHODS.values() for f in m.__dataclass_fields__}:
        if name in vars(a):
            kw[name] = getattr(a, name)
    return kw


def _out(a: argparse.Namespace, kw: dict) -> str:
    out = getattr(a, "out", None) or kw.pop("out", None)
    kw.pop("out", None)
    if out is None:
        raise ValueError("out must name the output directory (--out DIR, or `out:` in the config file), got None")
    return out


def cmd_estimate(a: argparse.Namespace) -> int:
    from .estimator import estimate

    kw = _settings(a, EstimateConfig, Recipe, Execution, Thresholds)
    out = _out(a, kw)
    with warnings.catch_warnings():  # the summary prints the fit warning
        warnings.simplefilter("ignore", UserWarning)
        result = estimate(out, progress=not a.quiet, **kw)
    if result["status"] == "partial":
        print(f"{result['missing_trials']} trials of this run are not finished yet (other shards, or processes "
              "training them); "
              f"when all are, run `memtool scores {out}`. Trial files are in {Path(out) / 'trials'}")
    else:
        print_summary(result, out)
    for rule in ("until_se", "until_pairs"):
        if rule in result:
            print(f"{rule.replace('_', '-')}: {result[rule]['note']}")
    return 0


def cmd_scores(a: argparse.Namespace) -> int:
    from . import scores

    print_summary(scores(a.run, allow_fewer=a.allow_fewer, **flag_values(a, Thresholds)), a.run)
    return 0


def cmd_import_fz(a: argparse.Namespace) -> int:
    from .fz import import_fz

    for p in import_fz(a.files, a.out, **flag_values(a, Thresholds)):
        print(f"wrote {p}")
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    from . import validate

    out = getattr(a, "out", None) or Path(a.run) / "validate"
    recipe = _settings(a, Recipe)  # flags given: override the run's recipe
    table = validate(a.run, out, a.seeds, recipe=recipe or None, dataset=a.dataset, progress=not a.quiet,
                     **flag_values(a, Runtime))
    cols = ["variant", "group", "metric", "accuracy", "ci_low", "ci_high", "diff"]
    print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {Path(out) / 'validate.md'}, {Path(out) / 'validate.parquet'}, {Path(out) / 'validate.png'}")
    return 0


def cmd_import_cscore(a: argparse.Namespace) -> int:
    from . import import_cscore

    for p in import_cscore(a.file, a.out, a.dataset, data_root=getattr(a, "data_root", None)):
        print(f"wrote {p}")
    return 0


def cmd_figures(a: argparse.Namespace) -> int:
    if sum(x is not None for x in (a.run, a.config, a.index)) != 1:
        raise ValueError("figures needs one of a RUN directory, --config CONFIG or --index OUT")
    if a.readme and not a.index:
        raise ValueError("--readme goes with --index OUT (the figures folder whose manifests it renders)")
    if a.processes != 1 and not a.config:
        raise ValueError(f"--processes goes with --config (a study's stages), got --processes {a.processes}")
    if a.index:
        from . import manifest

        for m in sorted(Path(a.index).glob("*/manifest.json")):
            manifest.refresh(m.parent)
        paths = [manifest.write_index(Path(a.index))] + ([manifest.update_readme(a.readme, a.index)] if a.readme else [])
    elif not a.out:
        raise ValueError("figures RUN and figures --config need --out OUT")
    elif a.config:
        from .pipeline import RECORDED, load_config, make_figures

        if a.processes < 1:
            raise ValueError(f"--processes must be at least 1, got {a.processes}")
        stages, runtime = (a.stages.split(",") if a.stages else None), flag_values(a, Runtime)
        shared = []
        if a.processes > 1:  # the estimate here alone first; the copies share the stages that claim their models
            make_figures(a.config, a.out, stages=[], progress=not a.quiet, **runtime)
            shared = [s for s in (stages or load_config(a.config)) if s in RECORDED]
        with helpers(a, shared, a.processes, runtime):
            paths = make_figures(a.config, a.out, stages=stages, progress=not a.quiet, **runtime)
        print(f"wrote {Path(a.out) / 'README.md'}")
    else:
        from .figures import run_figures
        from .pipeline import run_manifest

        paths = run_figures(a.run, a.out, data_root=getattr(a, "data_root", None), dataset=a.dataset)
        run_manifest(a.run, a.out, paths, f"memtool figures {a.run} --out {a.out}")
    for p in paths:
        print(f"wrote {p}")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def helpers(a: argparse.Namespace, stages: list[str], processes: int, runtime: dict):
    """Beside this process, ``processes - 1`` quiet copies of ``memtool figures --config`` that
    run only ``stages`` (those that claim their models, :mod:`memtool.sharing`), each process
    with cores / ``processes`` torch threads. Waits for them at the end; an error, an interrupt
    or a SIGTERM here interrupts them, and a copy that failed fails the command."""
    import threading

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads, before = max(1, cores // processes), torch.get_num_threads()
    cmd = [sys.executable, "-m", "memtool", "figures", "--config", a.config, "--out", a.out, "--quiet",
           "--stages", ",".join(stages)] + [x for k, v in runtime.items() if v is not None
                                            for x in (f"--{k.replace('_', '-')}", str(v))]
    main_thread = threading.current_thread() is threading.main_thread()
    old_term, procs = signal.getsignal(signal.SIGTERM), []
    try:
        if processes > 1:
            torch.set_num_threads(threads)
            if main_thread:
                signal.signal(signal.SIGTERM, _interrupt)
        for _ in range(processes - 1 if stages else 0):  # a session of their own: a terminal's Ctrl-C comes from here
            procs.append(subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                                          stdout=subprocess.DEVNULL, start_new_session=True))
        yield
    except BaseException:
        for p in procs:
            p.send_signal(signal.SIGINT)
        raise
    finally:
        codes = [p.wait() for p in procs]
        torch.set_num_threads(before)
        if main_thread and processes > 1:
            signal.signal(signal.SIGTERM, old_term)
    if any(codes):
        raise ChildProcessError(f"{sum(c != 0 for c in codes)} of the {len(procs)} helper processes failed "
                                f"(exit codes {codes}); run the command again: it resumes")


def cmd_proxies(a: argparse.Namespace) -> int:
    from .proxies import ProxiesConfig, ProxySettings, proxies

    kw = _settings(a, ProxiesConfig, Recipe, ProxySettings, Runtime)
    out = _out(a, kw)
    table = proxies(out, calibrate=a.calibrate, progress=not a.quiet, **kw)
    tr = table[table["split"] == "train"]
    print(tr[[c for c in tr.columns if c not in ("sample_id", "split", "label", "label_corrupted",
                                                   "original_label")]].describe().T[["mean", "50%", "max"]]
          .to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from .compare import compare, format_comparison

    r = compare(a.a, a.b, a.column_a, a.column_b, a.mem_threshold)
    print(json.dumps(strict_json(r), indent=2, allow_nan=False) if a.json else format_comparison(r))
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
    from .training import train

    kw = _settings(a, TrainConfig, Recipe, Runtime)
    out = _out(a, kw)
    try:
        train(out=out, progress=not a.quiet, **kw)
    except KeyboardInterrupt:
        print(f"\nmemtool train: interrupted; finished epochs are in {Path(out) / 'checkpoint.pt'}, "
              "run the same command again to continue", file=sys.stderr)
        return 130
    mine = kw.get("model") if isinstance(kw.get("model"), str) and SPEC.fullmatch(kw["model"]) else None
    print(f"load it with memtool.load_model({str(out)!r}{f', model={mine!r}' if mine else ''}); "
          f"log in {Path(out) / 'log.jsonl'}")
    return 0


def print_evaluation(s: dict, out: str | Path, file=None) -> None:
    radius = "clean only, no eps" if s["eps"] is None else f"eps {s['eps']:g}"
    lines = [f"{s['dataset']} test samples: {s['n_samples']}   {radius}"]
    for name, r in s["attacks"].items():
        step = r.get("step_size", "")
        step = f"{step:.4g}" if isinstance(step, float) else str(step)
        lines.append(f"  {name:<12} {r['n_correct']:>6}/{r['n']:<6} = {100 * r['accuracy']:6.2f} %   "
                     f"norm {r.get('norm', '-')}, steps {r.get('steps', '-')}, step size {step}, "
                     f"{r['time_s']:.0f} s")
    w = s["worst_case"]
    lines += [f"  {'worst case':<12} {w['n_correct']:>6}/{w['n']:<6} = {100 * w['accuracy']:6.2f} %",
              *(f"wrote {Path(out) / name}" for name in ("per_sample.parquet", "summary.json", "robustbench.json")
                if (Path(out) / name).exists())]
    print("\n".join(lines), file=file or sys.stdout)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluation import evaluate

    try:
        summary = evaluate(a.checkpoint, a.out, model=a.model, model_kwargs=a.model_kwargs, progress=not a.quiet,
                           **flag_values(a, Evaluation), **flag_values(a, Runtime))
    except KeyboardInterrupt:
        print(f"\nmemtool evaluate: interrupted; finished batches are saved in {Path(a.out) / 'state'}, "
              "run the same command again to continue", file=sys.stderr)
        return 130
    print_evaluation(summary, a.out)
    return 0


TRAIN_DESCRIPTION = """\
Train one model; the same command again resumes after the last finished epoch.

methods (--method; their parameters are the flags of the 'training method' group below):
  standard  cross-entropy on the clean samples
  pgd-at    PGD adversarial training (Madry et al. 2018): --eps, --pgd-steps, --step-size, ...
  trades    TRADES (Zhang et al. 2019): PGD-AT's flags and --beta
  mart      MART (Wang et al. 2020): PGD-AT's flags and --beta
  gairat    GAIRAT (Zhang et al. 2021), PGD-AT with geometry-aware instance weights: --gair-*
  bat       BAT, benign adversarial training: PGD-AT that down-weights the atypical training
            samples (mem >= --tau in --scores RUN, a `memtool estimate` run of the same data)
            whose adversarial examples are harmful: --scores, --tau, --gamma, --eta, --lambda,
            --bat-warmup"""


def _recipe_flags(p: argparse.ArgumentParser) -> None:
    """The recipe's flags, --method and every method's own parameters (each declared once)."""
    add_flags(p.add_argument_group("training recipe"), Recipe)
    g = p.add_argument_group("training method (parameters apply to the methods that take them)")
    g.add_argument("--method", default=argparse.SUPPRESS,
                   help=" | ".join(METHODS) + " | a method registered with memtool.register_method or installed "
                        "under the entry-point group memtool.methods (default: standard)")
    seen: set = set()
    for m in METHODS.values():
        add_flags(g, m, seen=seen)


def _common(p: argparse.ArgumentParser, out_help: str, config: bool = True) -> None:
    p.add_argument("--out", default=argparse.SUPPRESS, help=out_help)
    if config:
        p.add_argument("--config", help="YAML/JSON file with the same settings (flag names as keys); flags override it")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memtool", description="Estimate which training samples a network "
                                     "memorizes, and train and evaluate robust models with those scores.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    parser.commands = sub.choices  # name -> its parser (main: a misspelled flag gets the subcommand's usage)

    p = sub.add_parser("estimate", help="train models on random subsets and score every sample")
    _common(p, "run directory (created, or resumed)")
    add_flags(p.add_argument_group("run (must match when reopening a run directory)"), EstimateConfig)
    _recipe_flags(p)
    add_flags(p.add_argument_group("execution (does not change results)"), Execution)
    add_flags(p.add_argument_group("score tables"), Thresholds)
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("scores", help="recompute a run's score tables from its trials and print a summary")
    p.add_argument("run")
    p.add_argument("--allow-fewer", action="store_true", help="replace tables made from more trials (some were "
                                                               "damaged and set aside) with tables from fewer")
    add_flags(p, Thresholds)
    p.set_defaults(func=cmd_scores)

    p = sub.add_parser("validate", help="retrain without the high-influence samples: do the scores predict it?")
    p.add_argument("run")
    p.add_argument("--out", default=argparse.SUPPRESS, help="output directory (default: RUN/validate; resumable)")
    p.add_argument("--seeds", type=int, default=3, help="models per variant (default: 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--dataset", default=None, help="the data of a run made from your own (npz:PATH, imagefolder:DIR "
                                                   "or MODULE:FUNCTION; checked by fingerprint)")
    _recipe_flags(p)  # given: they override the run's recipe (e.g. --model cnn: a CNN on an MLP's scores)
    add_flags(p.add_argument_group("execution"), Runtime)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("import-fz", help="turn Feldman & Zhang's released .npz files into score tables")
    p.add_argument("files", nargs="+", help="cifar100_infl_matrix.npz and/or the high-influence-pairs .npz")
    p.add_argument("--out", required=True, help="run directory to write")
    add_flags(p, Thresholds, skip=("pairs",))  # the released files hold Feldman & Zhang's estimate only
    p.set_defaults(func=cmd_import_fz)

    p = sub.add_parser("import-cscore", help="turn a published C-score .npz (labels, scores) into a score table")
    p.add_argument("file", help="e.g. cifar100-cscores-orig-order.npz")
    p.add_argument("--dataset", required=True, help="the dataset the scores belong to (its labels are checked)")
    p.add_argument("--out", required=True, help="run directory to write")
    add_flags(p, Runtime, skip=("device",))
    p.set_defaults(func=cmd_import_cscore)

    p = sub.add_parser("train", help="train one model: standard, PGD-AT, TRADES, MART, GAIRAT or BAT (resumable)",
                       description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, "output directory (created, or resumed)")
    add_flags(p.add_argument_group("run (must match when resuming)"), TrainConfig)
    _recipe_flags(p)
    add_flags(p.add_argument_group("execution"), Runtime)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="per-sample robustness of a trained model under attacks (resumable)")
    p.add_argument("checkpoint", nargs="?", help="a `memtool train` output directory or its checkpoint.pt (omit it "
                                                 "for a model memtool did not train: --model and --weights FILE.pt)")
    p.add_argument("--model", default=None, help="MODULE:FUNCTION, build(in_shape, num_classes) -> nn.Module: the "
                                                 "network of --weights FILE.pt, or of a checkpoint trained with it")
    p.add_argument("--model-kwargs", default=None, help="with --weights FILE.pt: JSON object of keyword arguments "
                                                        "for the --model factory")
    p.add_argument("--out", required=True, help="output directory (created, or resumed)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_flags(p, Evaluation)
    add_flags(p.add_argument_group("execution"), Runtime)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("figures", help="plot a run, regenerate every figure of a study (--config), or re-render "
                                       "the figures index and README results from the manifests (--index)")
    p.add_argument("run", nargs="?", help="a run directory: its mem histogram, galleries, high-influence pairs")
    p.add_argument("--dataset", default=None, help="with RUN: the data of a run made from your own (npz:PATH, "
                                                   "imagefolder:DIR or MODULE:FUNCTION; checked by fingerprint)")
    p.add_argument("--config", help="a study config (configs/reference-*.yaml): runs every stage, resumable")
    p.add_argument("--out", help="folder for the figures (with --config: OUT/NAME/ and OUT/README.md)")
    p.add_argument("--index", metavar="OUT", help="re-render OUT/README.md from OUT/*/manifest.json, the headline "
                                                  "numbers read again from each stage's table")
    p.add_argument("--readme", metavar="README", help="with --index: also its results table (between the "
                                                      "<!-- results:begin/end --> lines)")
    p.add_argument("--stages", default=None, help="with --config: only these comma-separated sections (e.g. "
                                                  "score_cost); the estimate is always read (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--processes", type=int, default=1,
                   help="with --config: after the estimate, run the retraining stages and the BAT comparison as N "
                        "processes that share their models (one per core, or several per GPU); the estimates "
                        "parallelize by their own n_jobs (default: 1)")
    add_flags(p.add_argument_group("execution"), Runtime)
    p.set_defaults(func=cmd_figures)

    from .proxies import ProxiesConfig, ProxySettings

    p = sub.add_parser("proxies", help="one-run proxies of memorization (csl, forgetting, ...) and TracIn pairs")
    _common(p, "output directory (created, or resumed)")
    add_flags(p.add_argument_group("run (must match when resuming)"), ProxiesConfig)
    _recipe_flags(p)
    add_flags(p.add_argument_group("measurement"), ProxySettings)
    p.add_argument("--calibrate", default=None, metavar="RUN",
                   help="a few-trial `memtool estimate` run of the same data: estimate mem and the high-influence "
                        "pairs from it and the proxies, and make OUT a run directory (memtool.hybrid)")
    add_flags(p.add_argument_group("execution"), Runtime)
    p.set_defaults(func=cmd_proxies)

    p = sub.add_parser("compare", help="agreement of two score tables of the same data (B against A)")
    p.add_argument("a", help="reference: a run directory or a scores .parquet file")
    p.add_argument("b", help="the table to check against it")
    p.add_argument("--column-a", default="mem", help="A's column (default: mem)")
    p.add_argument("--column-b", default=None, help="B's column (default: the same as A's)")
    p.add_argument("--mem-threshold", type=float, default=MEM_THRESHOLD,
                   help=f"A's high set: column-a >= this (default: {MEM_THRESHOLD})")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("datasets", help="list the datasets and whether each is on disk")
    add_flags(p, Runtime, skip=("device",))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_datasets)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .datasets import MissingDatasetError
    from .rundir import RunMismatchError, storage_error

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the subcommand's usage, and the flag meant (argparse alone prints the top level's)
        command = parser.commands[args.cmd]
        close = [m for x in extra if x.startswith("--")
                 for m in difflib.get_close_matches(x.split("=")[0], list(command._option_string_actions), 1)]
        command.error(f"unrecognized arguments: {' '.join(extra)}"
                      + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if "" not in sys.path and os.getcwd() not in sys.path:  # --model mymodule:build finds ./mymodule.py
        sys.path.insert(0, os.getcwd())
    try:
        return args.func(args)
    except (MissingDatasetError, RunMismatchError, ValueError, FileNotFoundError, TypeError) as e:
        print(f"memtool {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except ChildProcessError as e:
        print(f"memtool {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        message = storage_error(e, out_flag=args.cmd != "scores")
        if message is None:
            raise
        print(f"memtool {args.cmd}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nmemtool {args.cmd}: interrupted; finished trial batches are saved, "
              "run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
