"""The Optuna study behind a sweep: the sweep directory with its journal storage, one study per
round, the grid sampler for ask/tell, and the narrowed ranges of the coarse-to-fine round."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from .spec import Param, Spec, SpecError


def narrow(params: dict[str, Param], trials: list, top_k: int, direction: str) -> dict[str, Param]:
    """Round-2 ranges: for each parameter, the span of the ``top_k`` best completed trials,
    widened by half a grid step on each side (a factor ``10**(0.5/per_decade)`` on a log scale,
    ``(high - low)/(num - 1)/2`` on a linear one: up to the midpoints towards the neighbouring grid
    values, the region a grid point stands for), clipped to the round-1 range. A whole step
    would give back the full range of a 3-point grid. Categorical parameters keep the values
    that appear among the best trials."""
    done = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
    if not done:
        raise SpecError("coarse-to-fine: round 1 has no completed trial to narrow around")
    best = sorted(done, key=lambda t: t.value, reverse=direction == "maximize")[: max(top_k, 1)]
    out = {}
    for name, p in params.items():
        seen = [t.params[name] for t in best if name in t.params]
        if p.values is not None:
            out[name] = Param(name, values=[v for v in p.values if v in seen] or list(p.values))
            continue
        lo, hi = min(seen), max(seen)
        if p.log:
            f = 10 ** (0.5 / p.per_decade)
            lo, hi = max(p.low, lo / f), min(p.high, hi * f)
        else:
            step = (p.high - p.low) / max(p.num - 1, 1) / 2
            lo, hi = max(p.low, lo - step), min(p.high, hi + step)
        out[name] = Param(name, low=lo, high=hi, log=p.log, per_decade=p.per_decade, num=p.num, is_int=p.is_int)
    return out


class Sweep:
    """The sweep directory: spec.yaml (a copy), study.journal, trials/<run id>/, logs/, results."""

    def __init__(self, spec: Spec, root: Path) -> None:
        self.spec = spec
        self.dir = (root / spec.name).resolve()

    def storage(self):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.dir.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(self.dir / "study.journal")))

    def study_name(self, rnd: int) -> str:
        return f"{self.spec.name}-round{rnd}"

    def space(self, rnd: int, storage=None) -> dict[str, Param]:
        if rnd == 1:
            return self.spec.params
        storage = storage or self.storage()
        first = optuna.load_study(study_name=self.study_name(1), storage=storage)
        return narrow(self.spec.params, first.get_trials(deepcopy=False), self.spec.refine["top_k"], self.spec.direction)

    def study(self, rnd: int, storage=None, seed: Optional[int] = None):
        storage = storage or self.storage()
        space = self.space(rnd, storage)
        if rnd == 1 and self.spec.search == "grid":
            sampler = AskTellGridSampler({k: p.grid() for k, p in space.items()}, seed=self.spec.seed)
        else:  # random search, and the coarse-to-fine round
            sampler = optuna.samplers.RandomSampler(seed=self.spec.seed + rnd if seed is None else seed)
        study = optuna.create_study(
            study_name=self.study_name(rnd), storage=storage, sampler=sampler,
            direction=self.spec.direction, load_if_exists=True,
        )
        if "space" not in study.user_attrs:  # what this round searched, for --status and the plot
            study.set_user_attr("space", {k: p.as_dict() for k, p in space.items()})
            study.set_user_attr("metric", self.spec.metric)
        return study, space

    def target(self, rnd: int) -> int:
        return self.spec.target if rnd == 1 else self.spec.refine["n_trials"]

    def rounds(self) -> list[int]:
        return [1, 2] if self.spec.refine else [1]


class AskTellGridSampler(optuna.samplers.GridSampler):
    """GridSampler whose after_trial does not call Study.stop(): that only works inside
    Study.optimize (RuntimeError under ask/tell); the drivers here count trials themselves."""

    def after_trial(self, study, trial, state, values) -> None:
        pass
