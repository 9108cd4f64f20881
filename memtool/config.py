"""Configs as dataclasses: one declaration per setting, validated in one style, and the
command-line flags generated from them.

    @dataclass(frozen=True)
    class Recipe:
        lr: float = setting(0.1, "peak learning rate")

:func:`setting` attaches the help text to the field; :func:`add_flags` turns a dataclass's
fields into ``--flags`` (defaults shown from the dataclass, unset flags left unset so the
dataclass owns every default); :func:`flag_values` reads them back. Validation helpers
(:func:`check_int`, :func:`check_number`, :func:`check_choice`) raise ``ValueError`` naming
the parameter, the value and what is allowed; the command line prints that message, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path


def setting(default, help: str, *, flag: str | None = None, choices=None, cli: bool = True, factory=None):
    """A dataclass field with its command-line help (``flag`` overrides ``--field-name``;
    ``cli=False`` keeps it off the command line)."""
    meta = {"help": help, "flag": flag, "choices": choices, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- validation


def fail(name: str, value, allowed: str):
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_int(name: str, value, minimum: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or (minimum is not None and value < minimum):
        fail(name, value, "an integer" + (f" >= {minimum}" if minimum is not None else "")
             + (" (or None)" if optional else ""))


def check_number(name: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            allowed = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            allowed = f"{'>' if low_open else '>='} {low:g}"
        elif high is not None:
            allowed = f"{'<' if high_open else '<='} {high:g}"
        else:
            allowed = "a finite number"
        fail(name, value, allowed + (" (or None)" if optional else ""))


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        fail(name, value, f"one of {', '.join(map(str, choices))}")


# ----------------------------------------------------------------------------- flags


def _flag(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _scalar_type(tp):
    """(python type, optional) of a field's annotation: int, float, str, bool, or a tuple of one
    of them (``tuple[float, ...]``: a flag that takes one or more values)."""
    if isinstance(tp, str):
        tp = eval(tp, {"typing": typing, "types": types})  # annotations are strings (PEP 563)
    args = typing.get_args(tp)
    optional = type(None) in args
    if args and typing.get_origin(tp) is not tuple:
        tp = next(a for a in args if a is not type(None))
    return tp, optional


def _default(f):
    if f.default is not MISSING:
        return f.default
    return None


def cli_fields(cls) -> list:
    return [f for f in fields(cls) if f.metadata.get("help") and f.metadata.get("cli", True)]


def add_flags(parser, cls, skip=(), defaults: dict | None = None, seen: set | None = None) -> None:
    """Add one ``--flag`` per field of dataclass ``cls`` that has help text (``setting``).

    Flags already in ``seen`` (names) are skipped, so fields shared by several classes (the
    methods' ``eps``) are declared once. ``defaults`` shows other defaults in the help."""
    seen = set() if seen is None else seen
    for f in cli_fields(cls):
        if f.name in skip or f.name in seen:
            continue
        seen.add(f.name)
        tp, optional = _scalar_type(f.type)
        shown = (defaults or {}).get(f.name, _default(f))
        help_text = f.metadata["help"] + ("" if shown is None else f" (default: {shown})")
        kw = dict(default=argparse.SUPPRESS, help=help_text, dest=f.name)
        if tp is bool:
            parser.add_argument(_flag(f), action=argparse.BooleanOptionalAction, **kw)
            continue
        if f.metadata.get("choices"):
            kw["choices"] = list(f.metadata["choices"])
        if typing.get_origin(tp) is tuple:
            tp, kw["nargs"] = typing.get_args(tp)[0], "+"
        parser.add_argument(_flag(f), type=tp if tp in (int, float) else str, metavar=f.name.upper()
                            if not kw.get("choices") else None, **kw)


def flag_values(ns: argparse.Namespace, cls) -> dict:
    """The flags of ``cls``'s fields that were given on the command line."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in vars(ns).items() if k in names}


def load_config_file(path: str | Path) -> dict:
    """Flat settings from a YAML or JSON file (keys as on the command line, '-' or '_';
    a nested ``recipe:`` or ``method:`` mapping is flattened)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        data = read_yaml(path)
    else:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return flatten_settings(data)


def read_yaml(path: Path):
    """A YAML file's content; bad YAML is one error naming the file, line and problem."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None


def flatten_settings(data: dict) -> dict:
    """Settings with '-' in keys made '_', and a nested ``recipe:`` mapping and a ``method:``
    mapping (``{name: trades, beta: 6}``) flattened into one level."""
    data = dict(data or {})
    data = {**(data.pop("recipe", None) or {}), **data}
    if isinstance(data.get("method"), dict):
        m = dict(data.pop("method"))
        data = {**m, **data, "method": m.pop("name", "standard")}
    return {k.replace("-", "_"): v for k, v in data.items()}


@dataclass(frozen=True)
class Runtime:
    """Where a job runs and reads its data: never part of a run's identity."""

    device: str = setting("cpu", "cpu | cuda | cuda:N")
    data_root: str | None = setting(None, "folder with CIFAR / Tiny ImageNet (default: $MEMTOOL_DATA_ROOT, else ./data)")

    def __post_init__(self):
        if not isinstance(self.device, str) or not (self.device == "cpu" or self.device.startswith(("cuda", "mps"))):
            fail("device", self.device, "cpu, cuda or cuda:N")
        if getattr(self, "scheduler", None) is None:  # a Dask client needs no GPU of its own: its workers do
            check_device(self.device)


def check_device(device):
    """``device`` as a torch.device, refused (before anything is written) where this machine has none."""
    import torch

    try:
        d = torch.device(device)
    except RuntimeError as e:  # cudax, cuda:-1
        raise ValueError(f"device {device!r} is not a device torch knows ({e}); use cpu, cuda or cuda:N") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu, or "
                         "cuda:N with N below that count")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device}: MPS is not available here; use --device cpu")
    return d


def device_name(device) -> str:
    """Where a model was trained, as its records keep it: ``cpu``, or ``cuda:0 NVIDIA H200``."""
    import torch

    d = torch.device(device)
    if d.type != "cuda":
        return d.type
    index = torch.cuda.current_device() if d.index is None else d.index
    return f"cuda:{index} {torch.cuda.get_device_name(index)}"


def split_settings(settings: dict, *classes) -> list[dict]:
    """Split flat ``settings`` into one dict per dataclass in ``classes`` (by field name) and
    a last dict of the rest."""
    rest, parts = dict(settings), []
    for cls in classes:
        names = {f.name for f in fields(cls)}
        parts.append({k: rest.pop(k) for k in list(rest) if k in names})
    return parts + [rest]
