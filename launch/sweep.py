"""`zoo sweep SPEC.yaml`: hyperparameter search over any recipe, on a laptop or as a SLURM array.

    zoo sweep launch/sweeps/demo_lr_wd.yaml                  # trials one after another, here
    zoo sweep launch/sweeps/resnet50_lr.yaml --slurm --partition=gpu --gpus-per-node=8
    zoo sweep launch/sweeps/demo_lr_wd.yaml --status         # ranked table (CSV + plot), anytime

The engine is Optuna's ask/tell API on a journal file in the sweep directory
(``JournalStorage(JournalFileBackend(<sweep>/study.journal))``: no database server, works
offline and from many SLURM tasks at once through its file lock). This module only turns the
spec into Optuna distributions, runs each trial as a normal ``zoo fit`` run directory, and
reports. Spec (see launch/sweeps/*.yaml for commented examples)::

    name: demo_lr_wd                 # sweep directory <root>/<name>, W&B group
    recipe: demo                     # launch/recipes/<recipe>.yaml or a path
    budget: {trainer.max_epochs: 4}  # per-trial overrides that set the budget
    fixed: {data.batch_size: 64}     # other overrides for every trial
    metric: val/acc1                 # any logged validation metric
    direction: maximize              # or minimize
    search: grid                     # grid | random
    n_trials: 9                      # random: trials; grid: at most the grid size (default: all)
    retries: 1                       # a failed trial is re-run this many times with its params
    params:
      model.lr: {low: 0.01, high: 1.0, log: true, per_decade: 2}   # grid 0.01 0.0316 0.1 0.316 1
      model.weight_decay: {low: 1.0e-5, high: 1.0e-3, log: true}   # random: log-uniform
      model.optimizer: {values: [sgd, adamw]}
    refine: {n_trials: 4, top_k: 3}  # coarse-to-fine: a random round 2 in the narrowed ranges

A trial's value is the best (by ``direction``) of ``metric`` over its validations; its last
value is kept beside it. Trials run in subprocesses, so one crash fails that trial only.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from launch.errors import requeue, user_errors

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "launch" / "recipes"
SBATCH = REPO / "launch" / "slurm" / "sweep.sbatch"


class SpecError(ValueError):
    """A sweep spec the user must fix (one line)."""


# ----------------------------------------------------------------------------- spec
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
        return [a for k, v in {**self.fixed, **self.budget}.items() for a in (f"--{k}", _cli_value(v))]


def _cli_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "null" if v is None else str(v)


def _known_keys() -> dict[str, set[str]]:
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


def _check_key(key: str, where: str, known: dict[str, set[str]]) -> None:
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
    known = _known_keys()
    params = {}
    for key, p in (raw["params"] or {}).items():
        _check_key(key, where, known)
        params[key] = _param(key, p, where)
    for section in ("budget", "fixed"):
        for key in raw.get(section) or {}:
            _check_key(key, f"{where} ({section})", known)
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


def _param(key: str, p: Any, where: str) -> Param:
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


# ----------------------------------------------------------------------------- coarse to fine
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


# ----------------------------------------------------------------------------- the study
class Sweep:
    """The sweep directory: spec.yaml (a copy), study.journal, trials/<run id>/, logs/, results."""

    def __init__(self, spec: Spec, root: Path) -> None:
        self.spec = spec
        self.dir = (root / spec.name).resolve()

    def storage(self):
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.dir.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(self.dir / "study.journal")))

    def study_name(self, rnd: int) -> str:
        return f"{self.spec.name}-round{rnd}"

    def space(self, rnd: int, storage=None) -> dict[str, Param]:
        if rnd == 1:
            return self.spec.params
        import optuna

        storage = storage or self.storage()
        first = optuna.load_study(study_name=self.study_name(1), storage=storage)
        return narrow(self.spec.params, first.get_trials(deepcopy=False), self.spec.refine["top_k"], self.spec.direction)

    def study(self, rnd: int, storage=None, seed: Optional[int] = None):
        import optuna

        storage = storage or self.storage()
        space = self.space(rnd, storage)
        if rnd == 1 and self.spec.search == "grid":
            sampler = _AskTellGridSampler({k: p.grid() for k, p in space.items()}, seed=self.spec.seed)
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


def _grid_sampler_class():
    import optuna

    class AskTellGridSampler(optuna.samplers.GridSampler):
        """GridSampler whose after_trial does not call Study.stop(): that only works inside
        Study.optimize (RuntimeError under ask/tell); the drivers here count trials themselves."""

        def after_trial(self, study, trial, state, values) -> None:
            pass

    return AskTellGridSampler


def _AskTellGridSampler(*args, **kwargs):
    return _grid_sampler_class()(*args, **kwargs)


def _worker_key() -> str:
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm:{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}"
    return f"local:{socket.gethostname()}:{os.getpid()}"


def _worker_alive(key: str) -> bool:
    kind, _, rest = key.partition(":")
    if kind == "local":
        host, _, pid = rest.rpartition(":")
        if host != socket.gethostname():
            return True  # cannot tell from here: leave it to that machine
        try:
            os.kill(int(pid), 0)
            return True
        except (OSError, ValueError):
            return False
    if kind == "slurm":
        try:
            out = subprocess.run(["squeue", "-h", "-j", rest, "-o", "%T"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return True  # no answer from Slurm: do not fail what may still run
        if out.returncode != 0:
            return "Invalid job id" not in out.stderr  # finished jobs leave squeue
        return bool(out.stdout.strip())
    return True


def fail_stale(study, sweep: Sweep) -> list[int]:
    """Mark RUNNING trials whose worker is gone (killed, timed out, node lost) as FAIL, and
    enqueue their retry: no trial is silently lost. (JournalStorage has no heartbeat.)"""
    from optuna.trial import TrialState

    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        key = t.user_attrs.get("worker")
        if key and key != _worker_key() and not _worker_alive(key):
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except Exception:  # noqa: BLE001 - another process told it first
                continue
            failed.append(t.number)
            _maybe_retry(study, sweep, t)
    return failed


def _maybe_retry(study, sweep: Sweep, t) -> None:
    attempt = int(t.user_attrs.get("attempt", 1))
    if attempt <= sweep.spec.retries:
        study.enqueue_trial(t.params, user_attrs={"attempt": attempt + 1, "retry_of": t.number})


# ----------------------------------------------------------------------------- one trial
def _trial_id(rnd: int, number: int) -> str:
    return f"r{rnd}-t{number:03d}"


def run_trial(
    sweep: Sweep, rnd: int, study, space: dict[str, Param], *, slurm: bool = False, in_process: bool = False
) -> tuple[int, Optional[float], str]:
    """Ask the study for a trial (or resume this SLURM task's running one), train, tell.

    Returns (trial number, value or None if failed, run directory)."""
    import optuna
    from optuna.trial import TrialState

    key = _worker_key()
    mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.user_attrs.get("worker") == key]
    if mine:  # a requeued (preempted) SLURM task: continue the same trial and run directory
        number, params, trial = mine[0].number, mine[0].params, optuna.Trial(study, mine[0]._trial_id)
    else:
        trial = study.ask({k: p.distribution() for k, p in space.items()})
        number, params = trial.number, trial.params
        trial.set_user_attr("worker", key)
        trial.set_user_attr("attempt", int(trial.user_attrs.get("attempt", 1)))
    rid = _trial_id(rnd, number)
    run_dir = sweep.dir / "trials" / rid
    trial.set_user_attr("run_dir", str(run_dir))
    result = run_dir / "sweep_result.json"
    result.unlink(missing_ok=True)
    args = ["fit", "--config", str(sweep.spec.recipe), *sweep.spec.overrides(),
            *[a for k, v in params.items() for a in (f"--{k}", _cli_value(v))],
            "--run.root", str(sweep.dir), "--run.name", "trials"]
    last = run_dir / "checkpoints" / "last.ckpt"
    # a preempted trial resumes from its hpc checkpoint (Lightning finds it by itself under Slurm)
    if last.is_file() and not (slurm and any(run_dir.glob("hpc_ckpt_*.ckpt"))):
        args += ["--ckpt_path", str(last)]
    env = {**os.environ, "ZOO_RUN_ID": rid, "WANDB_RUN_GROUP": sweep.spec.name,
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "launch.sweep", "_train", str(result), sweep.spec.metric, sweep.spec.direction, "--", *args]
    if slurm:  # train.sbatch's semantics: one task per device, Lightning reads the Slurm env
        nodes = os.environ.get("SLURM_NNODES", "1")
        per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]
        # Slurm >= 22.05: srun no longer inherits sbatch's --cpus-per-task; pass it on, or every
        # task gets one CPU (and ffcv's num_workers > 1 fails in numba.set_num_threads)
        cpus = [f"--cpus-per-task={os.environ['SLURM_CPUS_PER_TASK']}"] if os.environ.get("SLURM_CPUS_PER_TASK") else []
        cmd = ["srun", "--kill-on-bad-exit=1", *cpus, *cmd, "--trainer.num_nodes", nodes, "--trainer.devices", per_node]
    log = sweep.dir / "logs" / f"{rid}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if in_process:  # no interpreter start per trial (tests, quick local sweeps); output to the console
        rc = _train_in_process(cmd[cmd.index("_train") + 1:], {k: env[k] for k in ("ZOO_RUN_ID", "WANDB_RUN_GROUP")})
    else:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd()).returncode
    if rc == PREEMPTED_EXIT:  # saved and requeued: the requeued task finds this RUNNING trial ("mine") again
        raise TrialPreempted(f"round {rnd} trial {number}: preempted; the requeued task resumes it ({run_dir})")
    value = None
    if rc == 0 and result.is_file():
        r = json.loads(result.read_text())
        if r.get("completed") and r.get("best") is not None and math.isfinite(r["best"]):
            value = float(r["best"])
            trial.set_user_attr("last_value", r.get("last"))
            trial.set_user_attr("best_epoch", r.get("best_epoch"))
    if value is None:
        study.tell(number, state=TrialState.FAIL)
        _maybe_retry(study, sweep, study.get_trials(deepcopy=False)[number])
    else:
        study.tell(number, value)
    return number, value, str(run_dir)


# sysexits.h EX_TEMPFAIL ("try again later"): a trial that callbacks.preemption saved and requeued
PREEMPTED_EXIT = 75


class TrialPreempted(Exception):
    """The trial's job was requeued; it is neither failed nor complete."""


def _train_in_process(argv: list[str], env: dict[str, str]) -> int:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # launch.run_dir.run_id() reads ZOO_RUN_ID first
    try:
        return _train_main(argv)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - one trial's crash fails that trial, not the sweep
        print(f"trial failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _train_main(argv: list[str]) -> int:
    """`python -m launch.sweep _train RESULT METRIC DIRECTION -- <zoo fit args>` (one trial)."""
    result, metric, direction = Path(argv[0]), argv[1], argv[2]
    fit_args = argv[argv.index("--") + 1:]
    import lightning as L

    from datamodules.imagenet import ImageNetDataModule
    from callbacks.preemption import Preempted
    from launch.zoo_cli import ZooCLI  # Lightning: imported when a trial runs, not for `zoo sweep --status`
    from zoo.base import ImageClassifier

    class Tracker(L.Callback):
        def __init__(self):
            self.history: list[float] = []

        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking and metric in trainer.callback_metrics:
                self.history.append(float(trainer.callback_metrics[metric]))

        def on_fit_end(self, trainer, pl_module):
            if not trainer.is_global_zero:
                return
            h = self.history
            pick = max if direction == "maximize" else min
            best = pick(h) if h else None
            out = {"completed": not trainer.interrupted and bool(h), "best": best, "last": h[-1] if h else None,
                   "best_epoch": h.index(best) if h else None, "history": h, "metric": metric}
            result.parent.mkdir(parents=True, exist_ok=True)
            tmp = result.with_suffix(".tmp")
            tmp.write_text(json.dumps(out))
            tmp.replace(result)

    tracker = Tracker()

    class TrialCLI(ZooCLI):
        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            trainer.callbacks.insert(0, tracker)
            return trainer

    try:
        TrialCLI(ImageClassifier, ImageNetDataModule, args=fit_args, save_config_kwargs={"overwrite": True},
                 parser_kwargs={"parser_mode": "yaml"})
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as stop:  # every rank: saved at one step; rank 0 requeues the job
        return requeue(stop) or PREEMPTED_EXIT
    return 0


# ----------------------------------------------------------------------------- report
def rows(sweep: Sweep, storage=None) -> list[dict]:
    import optuna

    storage = storage or sweep.storage()
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    out = []
    for rnd in sweep.rounds():
        if sweep.study_name(rnd) not in names:
            continue
        study = optuna.load_study(study_name=sweep.study_name(rnd), storage=storage)
        for t in study.get_trials(deepcopy=False):
            out.append({"round": rnd, "trial": t.number, "state": t.state.name, "value": t.value,
                        "last_value": t.user_attrs.get("last_value"), **{k: t.params.get(k) for k in sweep.spec.params},
                        "attempt": t.user_attrs.get("attempt", 1), "run_dir": t.user_attrs.get("run_dir", "")})
    sign = -1 if sweep.spec.direction == "maximize" else 1
    done = sorted((r for r in out if r["state"] == "COMPLETE"), key=lambda r: sign * r["value"])
    for i, r in enumerate(done, 1):
        r["rank"] = i
    return done + [r for r in out if r["state"] != "COMPLETE"]


def report(sweep: Sweep, storage=None, to_wandb: bool = False) -> tuple[Path, Optional[Path]]:
    """Print the ranked table; write results.csv and sweep.png. Returns their paths."""
    import optuna

    storage = storage or sweep.storage()
    for rnd in sweep.rounds():
        try:
            fail_stale(optuna.load_study(study_name=sweep.study_name(rnd), storage=storage), sweep)
        except KeyError:
            pass
    table = rows(sweep, storage)
    keys = list(sweep.spec.params)
    m = sweep.spec.metric
    print(f"sweep {sweep.spec.name}: {m} ({sweep.spec.direction}), {sweep.dir}")
    head = f"{'rank':>4s} {'rnd':>3s} {'trial':>5s} {'state':9s} {m:>10s} " + " ".join(f"{k:>18s}" for k in keys)
    print(head)
    for r in table:
        val = f"{r['value']:10.4f}" if r["value"] is not None else f"{'-':>10s}"
        ps = " ".join(f"{_fmt(r[k]):>18s}" for k in keys)
        print(f"{r.get('rank', ''):>4} {r['round']:>3d} {r['trial']:>5d} {r['state']:9s} {val} {ps}")
    csv_path = sweep.dir / "results.csv"
    cols = ["rank", "round", "trial", "state", "value", "last_value", *keys, "attempt", "run_dir"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)
    png = _plot(sweep, table, storage) if any(r["state"] == "COMPLETE" for r in table) else None
    if to_wandb and png is not None:
        _to_wandb(sweep, table, cols, png)
    return csv_path, png


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plot(sweep: Sweep, table: list[dict], storage) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = sweep.spec.params
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.6), squeeze=False)
    done = [r for r in table if r["state"] == "COMPLETE"]
    for ax, (name, p) in zip(axes[0], params.items()):
        for rnd, marker in ((1, "o"), (2, "^")):
            pts = [(r[name], r["value"]) for r in done if r["round"] == rnd]
            if pts:
                xs, ys = zip(*pts)
                if p.values is not None:
                    xs = [p.values.index(x) for x in xs]
                ax.scatter(xs, ys, marker=marker, label=f"round {rnd}" + (" (refined)" if rnd == 2 else ""))
        if done:
            b = done[0]
            bx = p.values.index(b[name]) if p.values is not None else b[name]
            ax.scatter([bx], [b["value"]], s=160, facecolors="none", edgecolors="red", label="best")
        if p.log:
            ax.set_xscale("log")
        if p.values is not None:
            ax.set_xticks(range(len(p.values)), [str(v) for v in p.values])
        ax.set_xlabel(name + (" (log)" if p.log else ""))
        ax.set_ylabel(sweep.spec.metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"sweep {sweep.spec.name}: {sweep.spec.metric} per trial")
    fig.tight_layout()
    png = sweep.dir / "sweep.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _to_wandb(sweep: Sweep, table: list[dict], cols: list[str], png: Path) -> None:
    if str(sweep.spec.fixed.get("run.logger", "wandb")) != "wandb":
        return
    import wandb

    mode = "online" if os.environ.get("WANDB_MODE") == "online" else "offline"
    run = wandb.init(project=str(sweep.spec.fixed.get("run.project", "lightning-zoo")), group=sweep.spec.name,
                     job_type="sweep", name=f"{sweep.spec.name}-summary", dir=str(sweep.dir), mode=mode,
                     reinit="finish_previous")
    run.log({"sweep/results": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in table]),
             "sweep/plot": wandb.Image(str(png))})
    run.finish()
    print(f"W&B ({mode}): group {sweep.spec.name}" + (f"; wandb sync {sweep.dir / 'wandb'} --sync-all" if mode == "offline" else ""))


# ----------------------------------------------------------------------------- drivers
def run_local(sweep: Sweep, in_process: bool = False) -> None:
    from optuna.trial import TrialState
    from tqdm import tqdm

    storage = sweep.storage()
    for rnd in sweep.rounds():
        study, space = sweep.study(rnd, storage)
        fail_stale(study, sweep)
        target = sweep.target(rnd)
        max_tries = target * (1 + sweep.spec.retries)
        done = lambda: len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        bar = tqdm(total=target, initial=min(done(), target), desc=f"{sweep.spec.name} round {rnd}", unit="trial",
                   file=sys.stderr)
        tries = 0
        while done() < target and tries < max_tries:
            tries += 1
            try:
                number, value, run_dir = run_trial(sweep, rnd, study, space, in_process=in_process)
            except TrialPreempted as e:  # a local sweep inside a Slurm job that was preempted and requeued
                bar.close()
                tqdm.write(str(e), file=sys.stderr)
                return
            params = study.get_trials(deepcopy=False)[number].params
            desc = " ".join(f"{k}={_fmt(v)}" for k, v in params.items())
            msg = f"{sweep.spec.metric} {value:.4f}" if value is not None else f"FAILED (log: {sweep.dir / 'logs' / (_trial_id(rnd, number) + '.log')})"
            tqdm.write(f"round {rnd} trial {number}: {desc} -> {msg}", file=sys.stderr)
            bar.n = min(done(), target)
            bar.refresh()
        bar.close()
        if rnd == 1 and sweep.spec.refine:
            new = sweep.space(2, storage)
            for k, p in new.items():
                old = sweep.spec.params[k]
                if p.values is None:
                    print(f"coarse-to-fine: {k} [{old.low:.3g}, {old.high:.3g}] -> [{p.low:.3g}, {p.high:.3g}]")


def submit_slurm(sweep: Sweep, sbatch_opts: list[str]) -> list[str]:
    """One job array per round (round 2 after round 1), then a report job. Returns job ids."""
    log_dir = sweep.dir / "slurm"
    log_dir.mkdir(parents=True, exist_ok=True)
    jobs: list[str] = []
    for rnd in sweep.rounds():
        n = sweep.target(rnd)
        cmd = ["sbatch", "--parsable", f"--array=0-{n - 1}", f"--job-name={sweep.spec.name}-r{rnd}",
               f"--output={log_dir}/%A_%a.out", *(["--dependency=afterany:" + jobs[-1]] if jobs else []),
               *sbatch_opts, str(SBATCH), str(sweep.dir), str(rnd)]
        jobs.append(_sbatch(cmd))
    cmd = ["sbatch", "--parsable", f"--job-name={sweep.spec.name}-report", f"--output={log_dir}/report-%j.out",
           "--dependency=afterany:" + jobs[-1], "--ntasks=1", *[o for o in sbatch_opts if o.startswith(("--partition", "-p", "--account", "-A", "--qos"))],
           str(SBATCH), str(sweep.dir), "report"]
    jobs.append(_sbatch(cmd))
    return jobs


def _sbatch(cmd: list[str]) -> str:
    env = {**os.environ, "ZOO_HOME": str(REPO)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode != 0:
        raise SpecError(f"sbatch failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return r.stdout.strip().split(";")[0]


def worker_main(argv: list[str]) -> int:
    """`python -m launch.sweep worker SWEEP_DIR ROUND|report`: what each array task runs."""
    sweep_dir = Path(argv[0])
    sweep = Sweep(load_spec(sweep_dir / "spec.yaml"), sweep_dir.parent)
    storage = sweep.storage()
    if argv[1] == "report":
        csv_path, png = report(sweep, storage, to_wandb=True)
        print(f"table: {csv_path}\nplot: {png}")
        return 0
    rnd = int(argv[1])
    task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    study, space = sweep.study(rnd, storage, seed=sweep.spec.seed + 1000 * rnd + task + int(time.time()) % 100000)
    fail_stale(study, sweep)
    from optuna.trial import TrialState

    for _ in range(1 + sweep.spec.retries):
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if len(complete) >= sweep.target(rnd) and not waiting:  # a resubmitted or surplus task
            print(f"round {rnd}: {len(complete)} trials complete (target {sweep.target(rnd)}); nothing to do")
            return 0
        try:
            number, value, run_dir = run_trial(sweep, rnd, study, space, slurm=True)
        except TrialPreempted as e:
            print(e, flush=True)
            return 0
        print(f"round {rnd} trial {number}: {value} ({run_dir})", flush=True)
        if value is not None:
            return 0
    return 1


# the spellings before one flag style (launch/flags.py): accepted with a deprecation line
RENAMED = {"--root": ("--run.root",), "--no-wandb": ("--wandb", "false"), "--in-process": ("--in_process",)}


def main(argv: list[str]) -> int:
    """Hyperparameter sweep of a recipe (Optuna), here or as a Slurm array."""
    from launch.flags import add_bool, deprecated

    slurm_opts = None
    if "--slurm" in argv:
        i = argv.index("--slurm")
        argv, slurm_opts = argv[:i], argv[i + 1:]
    argv = deprecated(argv, RENAMED, "zoo sweep")
    p = argparse.ArgumentParser(prog="zoo sweep", description="hyperparameter sweep (Optuna, journal file)",
                                epilog="--slurm [SBATCH OPTIONS...]: submit the rounds as Slurm job arrays; the words "
                                       "after --slurm go to sbatch (e.g. --partition=gpu --gpus-per-node=8)")
    p.add_argument("spec", help="sweep spec YAML (launch/sweeps/*.yaml)")
    p.add_argument("--run.root", dest="root", default="runs/sweeps", help="parent of sweep directories")
    add_bool(p, "--status", False, "print the ranked table (and write CSV + plot), run nothing")
    add_bool(p, "--wandb", True, "log the summary to W&B")
    add_bool(p, "--in_process", False,
             help="local: train trials in this process (no interpreter start per trial; an exception fails the trial, a hard crash such as an OOM kill ends the sweep)")
    args = p.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        sweep = Sweep(spec, Path(args.root))
        if not args.status:
            sweep.dir.mkdir(parents=True, exist_ok=True)
            # the copy pins the resolved recipe path: array tasks read it from any directory
            data = yaml.safe_load(Path(args.spec).read_text())
            data["recipe"] = str(spec.recipe)
            copy = sweep.dir / "spec.yaml"
            if copy.is_file() and yaml.safe_load(copy.read_text()) != data:
                raise SpecError(f"{sweep.dir} holds a different spec of the same name; rename the sweep or remove {sweep.dir}")
            copy.write_text(f"# copied from {spec.path}\n" + yaml.safe_dump(data, sort_keys=False))
        if args.status:
            if not (sweep.dir / "study.journal").is_file():
                raise SpecError(f"no sweep has run yet in {sweep.dir}; start it with zoo sweep {args.spec}")
        elif slurm_opts is not None:
            jobs = submit_slurm(sweep, slurm_opts)
            print(f"submitted: round arrays {', '.join(jobs[:-1])}, report job {jobs[-1]}")
            print(f"status: zoo sweep {args.spec} --run.root {args.root} --status")
            print(f"logs: {sweep.dir / 'slurm'}")
            return 0
        else:
            run_local(sweep, in_process=args.in_process)
        csv_path, png = report(sweep, to_wandb=not args.status and args.wandb)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"table: {csv_path}")
    print(f"plot: {png}" if png else "plot: none yet (no completed trial)")
    return 0


def internal_main(argv: list[str]) -> int:
    """`python -m launch.sweep _train ...` (one trial's process) and `... worker ...` (one Slurm
    array task, launch/slurm/sweep.sbatch): the sweep's own verbs, not offered by `zoo sweep`."""
    if argv and argv[0] == "_train":
        return _train_main(argv[1:])
    if argv and argv[0] == "worker":
        return worker_main(argv[1:])
    return main(argv)


if __name__ == "__main__":
    sys.exit(internal_main(sys.argv[1:]))
