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

Modules: :mod:`~launch.sweep.spec` (schema, parsing), :mod:`~launch.sweep.study` (Optuna
study per round, coarse-to-fine ranges), :mod:`~launch.sweep.trial` (one trial, ask/train/tell),
:mod:`~launch.sweep.train` (the trial's process), :mod:`~launch.sweep.liveness` (workers and
stale trials), :mod:`~launch.sweep.slurm` (job arrays), :mod:`~launch.sweep.report` (table,
plot, W&B), :mod:`~launch.sweep.command` (``zoo sweep``).
"""

from .command import internal_main, main, run_local
from .liveness import fail_stale, worker_alive, worker_key
from .report import report, rows
from .slurm import submit_slurm, worker_main
from .spec import RECIPES, REPO, Param, Spec, SpecError, load_spec
from .study import Sweep, narrow
from .trial import PREEMPTED_EXIT, TrialPreempted, run_trial

__all__ = [
    "PREEMPTED_EXIT", "RECIPES", "REPO", "Param", "Spec", "SpecError", "Sweep", "TrialPreempted", "fail_stale",
    "internal_main", "load_spec", "main", "narrow", "report", "rows", "run_local", "run_trial", "submit_slurm",
    "worker_alive", "worker_key", "worker_main",
]
