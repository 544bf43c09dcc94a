"""The sweep spec: its schema (:class:`Spec`, :class:`Param`) and :func:`load_spec`, which
answers a mistake with one line (:class:`SpecError`)."""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "launch" / "recipes"


class SpecError(ValueError):
    """A sweep spec the user must fix (one line)."""


@dataclass
class Param:
    name: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    per_decade: int = 3  # grid points per factor of 10 (log grids)
    num: int = 5  # grid points (linear grids)
    values: Optional[list] = None
    is_int: bool = False

    def grid(self) -> list:
        if self.values is not None:
            return list(self.values)
        if self.log:
            k = self.per_decade
            n = int(math.floor(math.log10(self.high / self.low) * k + 1e-9))
            vals = [self.low * 10 ** (i / k) for i in range(n + 1)]
            vals = [float(f"{v:.3g}") for v in vals]
        else:
            step = (self.high - self.low) / max(self.num - 1, 1)
            vals = [float(f"{self.low + i * step:.6g}") for i in range(self.num)]
        if self.is_int:
            vals = sorted({int(round(v)) for v in vals})
        return vals

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.values is not None:
            return CategoricalDistribution(self.values)
        if self.is_int:
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(float(self.low), float(self.high), log=self.log)

    def as_dict(self) -> dict:
        if self.values is not None:
            return {"values": list(self.values)}
        d = {"low": self.low, "high": self.high, "log": self.log}
        return d | ({"type": "int"} if self.is_int else {})


@dataclass
class Spec:
    name: str
    recipe: Path
    params: dict[str, Param]
    metric: str = "val/acc1"
    direction: str = "maximize"
    search: str = "grid"
    n_trials: Optional[int] = None
    retries: int = 1
    budget: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    refine: Optional[dict] = None
    seed: int = 0
    path: Optional[Path] = None

    @property
    def target(self) -> int:
        """Completed trials wanted in round 1."""
        if self.search == "grid":
            size = math.prod(len(p.grid()) for p in self.params.values())
            return min(self.n_trials or size, size)
        return int(self.n_trials)

    def overrides(self) -> list[str]:
        return [a for k, v in {**self.fixed, **self.budget}.items() for a in (f"--{k}", cli_value(v))]


def cli_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "null" if v is None else str(v)


def known_keys() -> dict[str, set[str]]:
    """Top-level `zoo fit` option groups and their keys (for the one-line unknown-key error)."""
    import lightning as L

    from datamodules.imagenet import ImageNetDataModule
    from zoo.base import ImageClassifier

    sig = lambda f: {p for p in inspect.signature(f).parameters if p not in ("self", "args", "kwargs")}
    return {
        "model": sig(ImageClassifier.__init__),
        "data": sig(ImageNetDataModule.__init__),
        "trainer": sig(L.Trainer.__init__),
        "run": {"root", "name", "logger", "project", "checkpoint_every_n_epochs"},
        "": {"seed_everything", "ckpt_path"},
    }


def check_key(key: str, where: str, known: dict[str, set[str]]) -> None:
    group, _, leaf = key.rpartition(".")
    if group not in known or leaf not in known[group]:
        close = sorted(f"{g}.{k}" if g else k for g, ks in known.items() for k in ks if leaf and leaf.lower() in k.lower())
        hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
        raise SpecError(f"{where}: unknown parameter {key!r}{hint}; use `zoo fit` option names such as model.lr")


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"sweep spec {path} not found; see launch/sweeps/ for examples")
    raw = yaml.safe_load(path.read_text()) or {}
    where = f"sweep spec {path}"
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a mapping with name, recipe and params")
    allowed = {"name", "recipe", "params", "metric", "direction", "search", "n_trials", "retries", "budget",
               "fixed", "refine", "seed"}
    extra = set(raw) - allowed
    if extra:
        raise SpecError(f"{where}: unknown key(s) {sorted(extra)}; allowed: {sorted(allowed)}")
    for k in ("name", "recipe", "params"):
        if not raw.get(k):
            raise SpecError(f"{where}: missing {k!r}")
    recipe = Path(str(raw["recipe"]))
    if not recipe.suffix:
        recipe = RECIPES / f"{recipe}.yaml"
    elif not recipe.is_absolute() and not recipe.exists():
        recipe = (path.parent / recipe) if (path.parent / recipe).exists() else REPO / recipe
    if not recipe.is_file():
        raise SpecError(f"{where}: recipe {raw['recipe']!r} not found ({recipe}); name one of launch/recipes/")
    direction = raw.get("direction", "maximize")
    if direction not in ("maximize", "minimize"):
        raise SpecError(f"{where}: direction must be maximize or minimize, got {direction!r}")
    search = raw.get("search", "grid")
    if search not in ("grid", "random"):
        raise SpecError(f"{where}: search must be grid or random, got {search!r}")
    known = known_keys()
    params = {}
    for key, p in (raw["params"] or {}).items():
        check_key(key, where, known)
        params[key] = parse_param(key, p, where)
    for section in ("budget", "fixed"):
        for key in raw.get(section) or {}:
            check_key(key, f"{where} ({section})", known)
    n_trials = raw.get("n_trials")
    if search == "random" and not n_trials:
        raise SpecError(f"{where}: random search needs n_trials")
    if n_trials is not None and int(n_trials) < 1:
        raise SpecError(f"{where}: n_trials must be >= 1, got {n_trials}")
    refine = raw.get("refine")
    if refine is not None:
        if not isinstance(refine, dict) or int(refine.get("n_trials", 0)) < 1:
            raise SpecError(f"{where}: refine needs n_trials >= 1, e.g. refine: {{n_trials: 4, top_k: 3}}")
        refine = {"n_trials": int(refine["n_trials"]), "top_k": int(refine.get("top_k", 3))}
    spec = Spec(
        name=str(raw["name"]), recipe=recipe.resolve(), params=params, metric=raw.get("metric", "val/acc1"),
        direction=direction, search=search, n_trials=n_trials and int(n_trials), retries=int(raw.get("retries", 1)),
        budget=dict(raw.get("budget") or {}), fixed=dict(raw.get("fixed") or {}), refine=refine,
        seed=int(raw.get("seed", 0)), path=path.resolve(),
    )
    if "/" in spec.name or not spec.name.strip():
        raise SpecError(f"{where}: name {spec.name!r} must be a plain directory name")
    return spec


def parse_param(key: str, p: Any, where: str) -> Param:
    if isinstance(p, list):
        p = {"values": p}
    if not isinstance(p, dict):
        raise SpecError(f"{where}: {key} must be {{low, high[, log]}} or {{values: [...]}}, got {p!r}")
    if "values" in p:
        vals = p["values"]
        if not isinstance(vals, list) or not vals:
            raise SpecError(f"{where}: {key} has an empty range (values: {vals!r}); list at least one value")
        return Param(key, values=vals)
    if "low" not in p or "high" not in p:
        raise SpecError(f"{where}: {key} needs low and high (or values: [...])")
    low, high, log = float(p["low"]), float(p["high"]), bool(p.get("log", False))
    if not low < high:
        raise SpecError(f"{where}: {key} has an empty range (low {low:g} >= high {high:g}); make low < high")
    if log and low <= 0:
        raise SpecError(f"{where}: {key} is searched on a log scale but low is {low:g}; give low > 0")
    par = Param(key, low=low, high=high, log=log, per_decade=int(p.get("per_decade", 3)), num=int(p.get("num", 5)),
                is_int=p.get("type") == "int")
    if par.per_decade < 1 or par.num < 1:
        raise SpecError(f"{where}: {key}: per_decade and num must be >= 1")
    return par
