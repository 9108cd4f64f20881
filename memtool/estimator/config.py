"""The estimator's configuration: what defines a run's results (and so must match on reopen).

How the work is executed (number of trials, models per ensemble, device, processes, shard)
is not part of it: the same run directory can be extended with more trials, or finished
on another machine with another ensemble size, and each trial's result stays the same."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..recipe import TrainRecipe

RECIPE_FIELDS = {f.name for f in fields(TrainRecipe)}


@dataclass(frozen=True)
class EstimateConfig:
    dataset: str = "mnist"
    limit: int | None = None  # keep the first N training samples
    label_noise: float = 0.0  # fraction of training labels flipped (seeded by `seed`)
    ratio: float = 0.7  # subset size / training set size
    seed: int = 0  # plan, label noise, model inits and minibatch orders all derive from it
    robust: bool | None = None  # also record PGD correctness; default: when recipe.train == "pgd-at"
    recipe: TrainRecipe = field(default_factory=TrainRecipe)

    def __post_init__(self):
        if not 0.0 < self.ratio < 1.0:
            raise ValueError(f"ratio must be strictly between 0 and 1, got {self.ratio}")
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label_noise must be in [0, 1), got {self.label_noise}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be a positive number of samples, got {self.limit}")
        if self.robust is None:
            object.__setattr__(self, "robust", self.recipe.train == "pgd-at")

    @classmethod
    def from_kwargs(cls, **kw) -> "EstimateConfig":
        """Build from flat keyword arguments (the command line's names, with underscores)."""
        own = {f.name for f in fields(cls)}
        unknown = set(kw) - own - RECIPE_FIELDS
        if unknown:
            raise TypeError(f"unknown estimate setting(s) {sorted(unknown)}; valid: {sorted(own | RECIPE_FIELDS)}")
        recipe_kw = {k: kw.pop(k) for k in list(kw) if k in RECIPE_FIELDS}
        recipe = kw.pop("recipe", None) or TrainRecipe()
        return cls(recipe=replace(recipe, **recipe_kw), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "EstimateConfig":
        d = dict(d)
        return cls(recipe=TrainRecipe(**d.pop("recipe", {})), **d)

    def to_dict(self) -> dict:
        return asdict(self)


def load_config_file(path: str | Path) -> dict:
    """Flat settings from a YAML or JSON file (keys as on the command line, '-' or '_')."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    flat = dict(data.pop("recipe", {}) or {}, **data)
    return {k.replace("-", "_"): v for k, v in flat.items()}


def diff_configs(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two config dicts, field by field."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_configs(a, b, prefix + k + ".")
        elif a != b:
            out.append(f"{prefix}{k}: run has {a!r}, this call asks for {b!r}")
    return out
