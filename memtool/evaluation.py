"""Robustness evaluation of a trained model: per-sample correctness under each attack.

    evaluate("runs/at", attacks=("clean", "pgd20", "cw20", "autoattack"), eps=0.3, out="runs/at/eval")

writes ::

    OUT/per_sample.parquet   sample_id, label, clean, one bool column per attack, worst_case
                             (correct under every attack); the summary in its metadata
    OUT/summary.json         per attack: its settings (eps, steps, step size, norm, ...) and
                             n, n_correct, accuracy, time
    OUT/evaluation.json      the settings of this evaluation (checked when reopened)
    OUT/robustbench.json     a RobustBench-style record: dataset, threat model, eps, samples,
                             attack version, seeds, clean and AutoAttack accuracy, checkpoint rule
    OUT/state/ATTACK.npz     per-sample flags done so far (written atomically after every batch)

A sample misclassified without attack counts as not robust and is not attacked. Evaluation
resumes per batch after an interruption (the same batch seeds, so the same flags as an
uninterrupted run for the seeded attacks), may be extended to more samples (``n_samples``, or
chosen ``sample_ids``), and refuses to mix settings: another checkpoint, dataset, eps or
attack set is an error.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .attacks import attacked_logits, build_attack
from .engine import as_floats
from .attacks.autoattack import BACKENDS
from .config import check_device, check_int, check_number, setting
from .datasets import load_dataset, standard_eps
from .models import create_model, parse_model_kwargs, resolve_model, spec_of
from .progress import progress_bar
from .rundir import RunMismatchError, atomic_write, open_settings, write_json, write_table
from .checkpoints import checkpoint_path, load_checkpoint, model_from_checkpoint, selected_epoch


def parse_attacks(attacks) -> list[str]:
    """'clean,pgd20' or a list -> names, 'clean' first, without duplicates."""
    names = [a.strip().lower() for a in (attacks.split(",") if isinstance(attacks, str) else attacks)]
    names = [a for a in names if a]
    return ["clean"] + [a for i, a in enumerate(names) if a != "clean" and a not in names[:i]]


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _batch_seed(seed: int, attack: str, first_id: int) -> int:
    key = int.from_bytes(hashlib.sha256(attack.encode()).digest()[:4], "little")
    return int(np.random.SeedSequence([seed, key, first_id]).generate_state(1)[0])


class _State:
    """Per-sample flags of one attack, saved atomically as OUT/state/NAME.npz."""

    def __init__(self, path: Path, n: int, settings: dict):
        self.path, self.settings = path, json.dumps(settings, sort_keys=True)
        self.done, self.correct = np.zeros(n, bool), np.zeros(n, bool)
        self.time_s = self.cpu_s = 0.0  # wall and CPU seconds spent on this attack, over all sessions
        if path.exists():
            with np.load(path, allow_pickle=False) as z:
                if str(z["settings"]) != self.settings:
                    raise RunMismatchError(f"{path} was written with other attack settings: {z['settings']}")
                self.done, self.correct, self.time_s = z["done"], z["correct"], float(z["time_s"])
                self.cpu_s = float(z["cpu_s"]) if "cpu_s" in z.files else float("nan")

    def save(self) -> None:
        atomic_write(self.path, lambda f: np.savez(f, done=self.done, correct=self.correct, time_s=np.array(self.time_s),
                                                   cpu_s=np.array(self.cpu_s), settings=np.array(self.settings)))


def _run_attack(name, attack, model, x_u8, y, ids, state: _State, seed, batch_size, device, progress):
    """Attack the samples ``ids`` not done yet, batch by batch, saving flags after each batch
    (each batch's random draws from a generator of its own seed, so resuming changes nothing)."""
    todo = ids[~state.done[ids]]
    bar = progress_bar(total=len(todo), desc=name, unit="sample", disable=not progress or len(todo) == 0, leave=False)
    for s in range(0, len(todo), batch_size):
        b = todo[s : s + batch_size]
        t0, cpu0 = time.time(), time.process_time()
        xb = as_floats(torch.from_numpy(x_u8[b]), device)
        yb = torch.from_numpy(y[b]).to(device)
        gen = torch.Generator(device=device).manual_seed(_batch_seed(seed, name, int(b[0])))
        state.correct[b] = (attacked_logits(attack, model, xb, yb, gen).argmax(1) == yb).cpu().numpy()
        state.done[b] = True
        state.time_s += time.time() - t0
        state.cpu_s += time.process_time() - cpu0
        state.save()
        bar.update(len(b))
    bar.close()


@dataclass(frozen=True)
class Evaluation:
    """What an evaluation measures (checked when its output directory is reopened)."""

    dataset: str | None = setting(None, "dataset (default: the one the model was trained on)")
    attacks: str = setting("clean,pgd20", "comma-separated: clean,fgsm,pgdK[-l2][-rR],cwK,apgd,autoattack")
    eps: float | None = setting(None, "radius on the [0, 1] scale (default: the training eps, else the dataset's; "
                                      "a clean-only evaluation needs none)")
    n_samples: int | None = setting(None, "first N test samples only (default: all)")
    batch_size: int = setting(200, "samples per attack batch; per-sample flags are saved after each")
    seed: int = setting(0, "seed of the attacks' random starts")
    backend: str = setting("pyautoattack", "AutoAttack package: pyautoattack (the authors' code) | torchattacks",
                           choices=BACKENDS)
    weights: str = setting("selected", "the weights to evaluate: selected (a memtool checkpoint's, by its rule: the "
                                       "last epoch, or with --select best-pgd the best) | last (its last epoch's) | "
                                       "FILE.pt, a plain state_dict of --model's network (no memtool checkpoint)")


def evaluate(checkpoint=None, out=None, *, model=None, model_kwargs=None, progress: bool = True, device="cpu",
             data_root=None, attack_options: dict | None = None, sample_ids=None, **settings) -> dict:
    """Evaluate the model in ``checkpoint`` on the first ``n_samples`` test samples (or on the
    test samples ``sample_ids``, e.g. the first 1,000 typical and every atypical one) of
    ``dataset`` (default: the training dataset) under ``attacks`` at radius ``eps`` (default:
    the training eps, else the dataset's standard one; none for ``attacks="clean"``); write
    the per-sample table and summary into ``out``; return the summary.

    A model memtool did not train: ``model`` an ``nn.Module`` (``checkpoint=None``), or a
    factory / MODULE:FUNCTION with ``weights="FILE.pt"`` (a plain state_dict, loaded with
    ``weights_only=True``; ``model_kwargs``: the factory's keyword arguments, a dict or JSON
    text); ``dataset`` is then required. ``model`` with a memtool
    ``checkpoint``: the factory of the user's network it was trained with.

    ``settings``: the fields of :class:`Evaluation`. ``attack_options``: per-attack field
    overrides, e.g. ``{"pgd20": {"step_size": 0.01}}``."""
    if "dataset" in settings and settings["dataset"] is not None:
        from .userdata import resolve_dataset

        settings["dataset"] = resolve_dataset(settings["dataset"])
    ev = Evaluation(**settings)
    dataset, attacks, eps, n_samples, batch_size, seed = (ev.dataset, ev.attacks, ev.eps, ev.n_samples,
                                                          ev.batch_size, ev.seed)
    opts = {"autoattack": {"backend": ev.backend}, **(attack_options or {})}
    if out is None:
        raise ValueError("out must name the evaluation's output directory, got None")
    check_int("batch_size", batch_size, 1)
    device = check_device(device)
    plain = ev.weights not in ("selected", "last") or isinstance(model, torch.nn.Module)
    if plain == (checkpoint is not None):
        raise ValueError("evaluate takes a memtool checkpoint (CHECKPOINT), or a model it did not train (model= an "
                         "nn.Module, or --model MODULE:FUNCTION with --weights FILE.pt), not both or neither")
    if plain:
        if dataset is None:
            raise ValueError("a model memtool did not train needs --dataset (the data to evaluate it on)")
        ck, model, identity = None, *_plain_model(model, ev.weights, dataset, data_root, device, model_kwargs)
        trained = {"dataset": dataset, "seed": None, "recipe": {"model": identity["model"], "method": {"name": None}}}
    else:
        if model_kwargs:
            raise ValueError("model_kwargs go with --weights FILE.pt; a memtool checkpoint records its own")
        ck = load_checkpoint(checkpoint, device)
        model = model_from_checkpoint(ck, device, last=ev.weights == "last",
                                      model=None if model is None else resolve_model(model), where=checkpoint)
        trained = ck["settings"]["config"]
        identity = {"checkpoint_sha": _sha(checkpoint_path(checkpoint))}
    for p in model.parameters():
        p.requires_grad_(False)
    dataset = dataset or trained["dataset"]
    names = parse_attacks(attacks)
    ds = load_dataset(dataset, data_root)
    if names != ["clean"]:
        ds.check_attackable(f"attacks {', '.join(names[1:])}")
    l2 = [n for n in names if "-l2" in n]
    if l2 and eps is None:  # the training eps, or the dataset's standard one, is an L-inf radius
        raise ValueError(f"attacks {', '.join(l2)} are L2: give their radius with --eps (it serves every attack of "
                         f"the run; evaluate each norm in its own output directory), e.g. --attacks clean,{l2[0]} "
                         "--eps 1.5")
    eps = _radius(eps, names, trained["recipe"]["method"].get("eps"), dataset)
    n_test = len(ds.y_test)
    if n_samples is not None and not 1 <= n_samples <= n_test:
        raise ValueError(f"n_samples must be in 1..{n_test} (the {dataset} test set), got {n_samples}")
    if sample_ids is not None:
        if n_samples is not None:
            raise ValueError("give n_samples (the first N test samples) or sample_ids (chosen ones), not both")
        ids = np.unique(np.asarray(sample_ids, dtype=np.int64))
        if not len(ids) or ids[0] < 0 or ids[-1] >= n_test:
            raise ValueError(f"sample_ids must be test sample ids in 0..{n_test - 1} (the {dataset} test set), "
                             f"got {len(ids)} ids" + (f" from {ids[0]} to {ids[-1]}" if len(ids) else ""))
        described = f"{len(ids)} chosen test samples (ids {ids[0]} to {ids[-1]})"
    else:
        ids = np.arange(n_samples or n_test)
        described = f"the first {len(ids)} of the test set"
    n = len(ids)
    built = {a: build_attack(a, eps, **opts.get(a, {})) for a in names}

    out = Path(out)
    _open(out, {**identity, "dataset": dataset,
                "dataset_fingerprint": ds.fingerprint, "eps": eps, "seed": seed,
                "attacks": {a: built[a].describe() for a in names},
                **({"weights": "last"} if ev.weights == "last" else {})})
    x_u8, y = ds.x_test, ds.y_test
    states = {a: _State(out / "state" / f"{a}.npz", n_test, built[a].describe()) for a in names}
    _run_attack("clean", built["clean"], model, x_u8, y, ids, states["clean"], seed, batch_size, device, progress)
    clean_ok = states["clean"].correct
    for a in names[1:]:
        st = states[a]
        wrong = ids[~clean_ok[ids] & ~st.done[ids]]  # not robust without attack: nothing to run
        st.done[wrong], st.correct[wrong] = True, False
        _run_attack(a, built[a], model, x_u8, y, ids[clean_ok[ids]], st, seed, batch_size, device, progress)

    cols = {a: states[a].correct[ids].copy() for a in names}
    df = pd.DataFrame({"sample_id": ids, "label": y[ids], **cols})
    df["worst_case"] = np.logical_and.reduce([cols[a] for a in names])
    summary = {"checkpoint": str(checkpoint_path(checkpoint)) if checkpoint is not None else identity.get("weights"),
               "dataset": dataset, "eps": eps, "n_samples": n, "test_samples": described,
               "seed": seed, "train_config": trained, "attacks": {}}
    for a in names:
        k, cpu = int(cols[a].sum()), states[a].cpu_s
        summary["attacks"][a] = {**built[a].describe(), "n": n, "n_correct": k, "accuracy": k / n,
                                 "time_s": round(states[a].time_s, 2), "cpu_s": None if cpu != cpu else round(cpu, 2)}
    k = int(df["worst_case"].sum())
    summary["worst_case"] = {"attacks": names, "eps": eps, "n": n, "n_correct": k, "accuracy": k / n}
    write_json(out / "summary.json", summary)
    write_table(df, out / "per_sample.parquet", summary)
    write_json(out / "robustbench.json", robustbench_record(summary, ck, ev.backend, last=ev.weights == "last"))
    return summary


def _plain_model(model, weights: str, dataset: str, data_root, device, kwargs=None) -> tuple[torch.nn.Module, dict]:
    """A model memtool did not train, and what identifies it in evaluation.json."""
    if isinstance(model, torch.nn.Module):
        if kwargs:
            raise ValueError("model_kwargs go with a factory (--model MODULE:FUNCTION); model= is a built nn.Module")
        h = hashlib.sha256()
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return model.to(device).eval(), {"model": type(model).__qualname__, "module_sha": h.hexdigest()[:16]}
    if model is None:
        raise ValueError(f"--weights {weights} is a plain state_dict: give the network it belongs to "
                         "(--model MODULE:FUNCTION, or model= in Python)")
    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(f"--weights {weights}: no such file (selected | last | FILE.pt)")
    factory, kwargs = resolve_model(model), parse_model_kwargs(kwargs)
    ds = load_dataset(dataset, data_root)
    net = create_model(factory, ds.image_shape, ds.num_classes, **kwargs)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"--weights {path} cannot be loaded as tensors ({type(e).__name__}); memtool loads with "
                         "weights_only=True and never unpickles other objects: save the network's "
                         "model.state_dict(), not the module") from None
    if isinstance(state, dict) and "settings" in state and "model" in state:
        raise ValueError(f"--weights {path} is a memtool checkpoint: give it as the checkpoint, `memtool evaluate "
                         f"{path.parent} --model {spec_of(factory)} ...` (it records its own model settings)")
    if isinstance(state, dict) and isinstance(state.get("state_dict", state.get("model")), dict):
        state = state.get("state_dict", state.get("model"))  # common wrappers {"state_dict": ...}
    if isinstance(state, dict) and state and all(str(k).startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel / DDP
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        why = " ".join(line.strip() for line in str(e).splitlines()[1:]) or str(e)
        raise ValueError(f"--weights {path} does not fit model {spec_of(factory)}"
                         f"{' with ' + json.dumps(kwargs) if kwargs else ''} built for {dataset} (inputs "
                         f"{tuple(ds.image_shape)}, {ds.num_classes} classes): {why[:800]}") from None
    return net.to(device).eval(), {"model": spec_of(factory), **({"model_kwargs": kwargs} if kwargs else {}),
                                   "weights": str(path.resolve()), "weights_sha": _sha(path)}


def _radius(eps, names: list[str], trained_eps, dataset: str) -> float | None:
    """The attacks' eps: as given, else the training eps, else the dataset's standard one.
    A clean-only evaluation needs none (None); the attacks do, and say so when none is found."""
    if eps is None and names == ["clean"]:
        return None
    if eps is None:
        eps = trained_eps
    if eps is None:
        try:
            eps = standard_eps(dataset)
        except ValueError as e:
            raise ValueError(f"attacks {', '.join(names[1:])} need an eps and the model was trained without one: "
                             f"{e}") from None
    check_number("eps", eps, 0)
    return float(eps)


def robustbench_record(summary: dict, ck: dict, backend: str, last: bool = False) -> dict:
    """A RobustBench-style record of one evaluation: what a leaderboard entry states. The
    AutoAttack number is null unless the standard version ran; the checkpoint rule is the
    run's (:func:`memtool.checkpoints.selected_epoch`; never chosen on the test set)."""
    from importlib.metadata import PackageNotFoundError, version

    attacks = summary["attacks"]
    aa = attacks.get("autoattack")
    try:
        package = f"{backend} {version(backend)}"
    except PackageNotFoundError:
        package = backend
    return {"dataset": summary["dataset"], "threat_model": "Linf", "eps": summary["eps"],
            "n_test_samples": summary["n_samples"], "test_samples": summary.get("test_samples", f"the first {summary['n_samples']} of the test set"),
            "clean_acc": attacks["clean"]["accuracy"], "autoattack_acc": None if aa is None else aa["accuracy"],
            "attack_version": None if aa is None else f"AutoAttack standard ({', '.join(aa['attacks'])}; {package})",
            "other_attacks": {a: r["accuracy"] for a, r in attacks.items() if a not in ("clean", "autoattack")},
            "attack_seed": summary["seed"], "train_seed": summary["train_config"]["seed"],
            "method": summary["train_config"]["recipe"]["method"]["name"],
            "architecture": summary["train_config"]["recipe"]["model"],
            "checkpoint_rule": "not trained by memtool" if ck is None else
                               f"{selected_epoch(ck, last)[1]}; never selected on the test set",
            "checkpoint": summary["checkpoint"]}


def _open(out: Path, settings: dict) -> None:
    """Create ``out`` or check that it holds an evaluation with the same ``settings``."""
    (out / "state").mkdir(parents=True, exist_ok=True)
    open_settings(out / "evaluation.json", settings, "evaluation settings")
