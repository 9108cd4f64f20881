"""Model registry and the built-in models.

A model is a factory ``build(in_shape, num_classes, **kwargs) -> nn.Module``: the built-ins
and a user's own network take the same road (timm's ``register_model`` / ``create_model``).

    @memtool.register_model                      # a name for the registry
    def my_net(in_shape, num_classes, width=64): ...

    create_model("cnn", (1, 28, 28), 10)          # a registered name
    create_model("mypkg.nets:resnet", (3, 32, 32), 100, depth=20)   # MODULE:FUNCTION, imported

A model spec is a registered name, ``wrn-D-W``, or ``MODULE:FUNCTION``. Only
:func:`resolve_model` imports, and only the callers that act on what a user named (a command
line flag, a ``model=`` argument) call it: a spec read back from a run directory is looked up
in the registry and never imported (:func:`registered_factory`), so a run received from
someone else cannot run code by itself. :func:`model_digest` (parameter and buffer names and
shapes) is recorded with every run and checkpoint, and a model whose digest differs is refused.

Every built-in takes inputs in [0, 1] of shape (batch, C, H, W) and returns logits; any input
normalization lives inside the model, so attacks never need to know about it.

- ``mlp`` and ``cnn``: small BatchNorm-free nets for MNIST-sized data on a CPU; the engine
  stacks many of them (see :mod:`memtool.ensemble`). ``mlp`` takes any feature shape.
- ``preact-resnet18`` and ``wrn-D-W`` (e.g. ``wrn-28-10``, ``wrn-34-10``): the paper-scale
  models for 32x32 and 64x64 images (global average pooling makes them size-agnostic).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Factory = Callable[..., nn.Module]
_REGISTRY: dict[str, Factory] = {}
SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")  # MODULE:FUNCTION


class ModelSpecError(ValueError):
    """A model spec that cannot be resolved or a factory that does not build a usable model;
    the message names the spec and the fix."""


def register_model(fn: Factory | None = None, *, name: str | None = None):
    """Register ``fn(in_shape, num_classes, **kwargs) -> nn.Module`` under ``name`` (default:
    its function name with ``_`` as ``-``); usable as ``@register_model`` or
    ``@register_model(name="x")``. Registering another factory under a taken name is an error."""
    def add(f: Factory) -> Factory:
        key = name or f.__name__.replace("_", "-")
        if _REGISTRY.get(key, f) is not f:
            raise ValueError(f"a model named {key!r} is already registered ({_REGISTRY[key].__module__}."
                             f"{_REGISTRY[key].__qualname__}); choose another name")
        _REGISTRY[key] = f
        return f

    return add(fn) if fn is not None else add


def list_models() -> list[str]:
    """The registered model names (``wrn-D-W`` stands for every depth and width)."""
    return sorted(_REGISTRY) + ["wrn-D-W"]


def spec_of(factory: Factory) -> str:
    """The spec recorded for a callable: its registered name, else MODULE:QUALNAME."""
    for key, f in _REGISTRY.items():
        if f is factory:
            return key
    target = getattr(factory, "func", factory)  # functools.partial
    return f"{getattr(target, '__module__', '?')}:{getattr(target, '__qualname__', type(target).__name__)}"


def check_factory(factory) -> None:
    """A factory a run can record by name: a registered one, or a function or class defined at
    the top level of a module (MODULE:FUNCTION); not a built network, a lambda or a nested function."""
    if isinstance(factory, nn.Module):
        raise ModelSpecError(f"model= takes the factory that builds the network, build(in_shape, num_classes) -> "
                             f"nn.Module, not a built {type(factory).__name__}: every model is trained from a fresh "
                             "one; pass the function (or class) that builds it")
    qualname = getattr(getattr(factory, "func", factory), "__qualname__", "")
    registered = any(f is factory for f in _REGISTRY.values())  # recorded by its registered name
    if not registered and ("<lambda>" in qualname or "<locals>" in qualname):
        raise ModelSpecError(f"model= {qualname}: a lambda or nested function has no name a run can record "
                             "(MODULE:FUNCTION, to reopen it); define it at the top level of a module: "
                             "def build(in_shape, num_classes): ...")


def check_model_spec(spec) -> None:
    """Syntax only (nothing is imported): a registered name, wrn-D-W or MODULE:FUNCTION."""
    if not isinstance(spec, str) or not (SPEC.fullmatch(spec) or re.fullmatch(r"[\w-]+", spec)):
        raise ModelSpecError(f"model must be a registered name ({', '.join(list_models())}) or MODULE:FUNCTION "
                             f"(e.g. mypkg.nets:resnet), got {spec!r}")


def registered_factory(spec: str) -> Factory:
    """The factory of a registered name or ``wrn-D-W``; never imports. A MODULE:FUNCTION spec
    (user code) must be named again by the user: :func:`resolve_model`."""
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if m := re.fullmatch(r"wrn-(\d+)-(\d+)", spec):
        return lambda in_shape, num_classes, **kw: wide_resnet(in_shape, num_classes, int(m[1]), int(m[2]), **kw)
    if SPEC.fullmatch(spec):
        raise ModelSpecError(f"model {spec!r} is user code, and memtool never imports code named in a run directory "
                             f"or checkpoint: name it yourself (--model {spec}, or model=<the factory> in Python)")
    raise ModelSpecError(f"model {spec!r} is not registered in this process: choose one of {', '.join(list_models())}, "
                         "import the module that registers it, or give MODULE:FUNCTION")


def resolve_model(model, flag: str = "--model") -> Factory:
    """The factory a user named: a callable as it is, a registered name, or MODULE:FUNCTION
    (imported here: call this only on what the user gave)."""
    if callable(model):
        return model
    check_model_spec(model)
    if not SPEC.fullmatch(model):
        return registered_factory(model)
    return import_spec(model, flag)


def import_spec(model: str, flag: str):
    """The callable MODULE:FUNCTION names (the user named it with ``flag``)."""
    module, _, attr = model.partition(":")
    try:
        obj = importlib.import_module(module)
    except Exception as e:  # the module is not found, or importing it raised
        missing = isinstance(e, ModuleNotFoundError) and e.name is not None and (module + ".").startswith(e.name + ".")
        raise ModelSpecError(f"{flag} {model}: cannot import module {module!r} ({type(e).__name__}: {e}); " +
                             ("is it in the current directory, on PYTHONPATH or installed?" if missing else
                              "the error is inside that module")) from e
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ModelSpecError(f"{flag} {model}: module {module!r} has no attribute {attr!r}")
    if not callable(obj):
        raise ModelSpecError(f"{flag} {model}: {attr!r} is not callable")
    return obj


def parse_model_kwargs(kwargs) -> dict:
    """The factory's keyword arguments: a mapping, or its JSON text (``--model-kwargs '{"width": 64}'``)."""
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as e:
            raise ValueError(f"model_kwargs must be a JSON object, got {kwargs!r} ({e.msg})") from None
    if not isinstance(kwargs or {}, dict):
        raise ValueError(f"model_kwargs must be a mapping of keyword arguments, got {kwargs!r}")
    return dict(kwargs or {})


def create_model(model, in_shape, num_classes: int, **kwargs) -> nn.Module:
    """Build ``model`` (a factory, or a registered name: never imported here) for inputs of
    ``in_shape``; the factory must return an ``nn.Module`` with parameters (see also
    :func:`check_output`)."""
    factory = model if callable(model) else registered_factory(model)
    name = model if isinstance(model, str) else spec_of(model)
    try:
        net = factory(tuple(in_shape), int(num_classes), **kwargs)
    except Exception as e:
        raise ModelSpecError(f"model {name}: build{(tuple(in_shape), int(num_classes))}"
                             f"{' with ' + str(kwargs) if kwargs else ''} raised {type(e).__name__}: {e}") from e
    if not isinstance(net, nn.Module):
        raise ModelSpecError(f"model {name}: the factory returned {type(net).__name__}, not an nn.Module")
    if not any(True for _ in net.parameters()):
        raise ModelSpecError(f"model {name}: the module it built has no parameters: nothing to train")
    return net


def check_output(net: nn.Module, name: str, in_shape, num_classes: int) -> None:
    """One forward pass of two zero inputs must give (2, num_classes) logits."""
    p = next(net.parameters(), None)
    was = net.training
    try:
        with torch.no_grad():
            out = net.eval()(torch.zeros(2, *in_shape, device=p.device if p is not None else "cpu"))
    except Exception as e:
        raise ModelSpecError(f"model {name}: a forward pass on inputs of shape (2, {', '.join(map(str, in_shape))}) "
                             f"raised {type(e).__name__}: {e}") from e
    finally:
        net.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelSpecError(f"model {name}: inputs of shape (2, {', '.join(map(str, in_shape))}) gave output {shape}; "
                             f"it must return logits of shape (batch, {num_classes})")


def model_digest(net: nn.Module) -> str:
    """A structural digest: the names and shapes of every parameter and buffer, in order."""
    h = hashlib.sha256()
    for name, t in list(net.named_parameters()) + list(net.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)};".encode())
    return h.hexdigest()[:16]


def model_record(net: nn.Module, spec: str) -> dict:
    """What a run directory and a checkpoint record of their model (run.json ``model``)."""
    return {"spec": spec, "digest": model_digest(net), "parameters": sum(p.numel() for p in net.parameters())}


def check_model_record(recorded: dict | None, current: dict, where) -> None:
    """Refuse a model whose structure differs from the one ``where`` was made with, naming both
    (records from before digests existed are not compared)."""
    if recorded and recorded.get("digest") and recorded["digest"] != current["digest"]:
        from .rundir import RunMismatchError

        raise RunMismatchError(
            f"{where} was made with model {recorded['spec']} (digest {recorded['digest']}, {recorded['parameters']:,} "
            f"parameters), but this call builds {current['spec']} (digest {current['digest']}, "
            f"{current['parameters']:,} parameters): the architectures differ. Nothing was changed; use a new output "
            "directory, or give the model the run was made with")


class Normalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


@register_model
def mlp(in_shape, num_classes, hidden: int = 256) -> nn.Module:
    """One hidden ReLU layer over the flattened input (any input shape)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


@register_model
def cnn(in_shape, num_classes, hidden: int = 128, width: int = 32) -> nn.Module:
    """Two 3x3 conv + max-pool blocks and a hidden fully connected layer (no BatchNorm)."""
    if len(in_shape) != 3:
        raise ValueError(f"cnn takes images (C, H, W), got inputs of shape {tuple(in_shape)}: use mlp or your own model")
    c, h, w = in_shape
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )  # fmt: skip


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet18(nn.Module):
    def __init__(self, in_ch, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
        layers, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(512)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideResNet(nn.Module):
    def __init__(self, in_ch, num_classes, depth=28, widen=10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6k+4 (16, 22, 28, 34, ...), got {depth}")
        n, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                layers.append(PreActBlock(cin, cout, stride if i == 0 else 1))  # WRN's basic block
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.layers(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model(name="preact-resnet18")
def preact_resnet18(in_shape, num_classes) -> nn.Module:
    return PreActResNet18(in_shape[0], num_classes)


def wide_resnet(in_shape, num_classes, depth: int = 28, widen: int = 10) -> nn.Module:
    return WideResNet(in_shape[0], num_classes, depth, widen)


HIDDEN_TAKERS = ("mlp", "cnn")  # the built-ins whose width is the recipe's ``hidden``


def build_model(name, in_shape, num_classes: int, hidden: int = 256, mean=None, std=None, **kwargs) -> nn.Module:
    """Build model ``name`` (a spec or a factory; see :func:`create_model`) for inputs of
    ``in_shape``; ``hidden`` goes to the built-ins that take it (mlp, cnn), ``kwargs`` to the
    factory. ``mean``/``std`` (per channel, on the [0, 1] scale) add a normalization layer in front."""
    if name in HIDDEN_TAKERS:
        kwargs = {"hidden": hidden, **kwargs}
    net = create_model(name, in_shape, num_classes, **kwargs)
    if mean is not None:
        net = nn.Sequential(Normalize(mean, std), net)
    return net


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
