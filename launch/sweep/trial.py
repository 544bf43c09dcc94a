"""One trial: ask the study (or resume this Slurm task's running trial), train it as a normal
``zoo fit`` run directory in a subprocess (or in this process), tell the study its value."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Callable, Optional

import optuna
from optuna.trial import TrialState

from .liveness import maybe_retry, worker_key
from .spec import REPO, Param, cli_value
from .study import Sweep


def trial_id(rnd: int, number: int) -> str:
    return f"r{rnd}-t{number:03d}"


def run_trial(
    sweep: Sweep, rnd: int, study, space: dict[str, Param], *, slurm: bool = False,
    in_process: Optional[Callable[[list[str], dict[str, str]], int]] = None,
) -> tuple[int, Optional[float], str]:
    """Ask the study for a trial (or resume this SLURM task's running one), train, tell.

    ``in_process``: run the trial's process in this one (:func:`launch.sweep.train.train_in_process`,
    given by the caller: this module does not import Lightning).

    Returns (trial number, value or None if failed, run directory)."""
    key = worker_key()
    mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.user_attrs.get("worker") == key]
    if mine:  # a requeued (preempted) SLURM task: continue the same trial and run directory
        number, params, trial = mine[0].number, mine[0].params, optuna.Trial(study, mine[0]._trial_id)
    else:
        trial = study.ask({k: p.distribution() for k, p in space.items()})
        number, params = trial.number, trial.params
        trial.set_user_attr("worker", key)
        trial.set_user_attr("attempt", int(trial.user_attrs.get("attempt", 1)))
    rid = trial_id(rnd, number)
    run_dir = sweep.dir / "trials" / rid
    trial.set_user_attr("run_dir", str(run_dir))
    result = run_dir / "sweep_result.json"
    result.unlink(missing_ok=True)
    args = ["fit", "--config", str(sweep.spec.recipe), *sweep.spec.overrides(),
            *[a for k, v in params.items() for a in (f"--{k}", cli_value(v))],
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
    if in_process is not None:  # no interpreter start per trial (tests, quick local sweeps); output to the console
        rc = in_process(cmd[cmd.index("_train") + 1:], {k: env[k] for k in ("ZOO_RUN_ID", "WANDB_RUN_GROUP")})
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
        maybe_retry(study, sweep, study.get_trials(deepcopy=False)[number])
    else:
        study.tell(number, value)
    return number, value, str(run_dir)


# sysexits.h EX_TEMPFAIL ("try again later"): a trial that callbacks.preemption saved and requeued
PREEMPTED_EXIT = 75


class TrialPreempted(Exception):
    """The trial's job was requeued; it is neither failed nor complete."""
