"""The sweep as Slurm job arrays: one array per round, a report job after them, and what each
array task runs (``python -m launch.sweep worker SWEEP_DIR ROUND|report``, launch/slurm/sweep.sbatch)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from optuna.trial import TrialState

from .liveness import fail_stale
from .report import report
from .spec import REPO, SpecError, load_spec
from .study import Sweep
from .trial import TrialPreempted, run_trial

SBATCH = REPO / "launch" / "slurm" / "sweep.sbatch"


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
        jobs.append(sbatch(cmd))
    cmd = ["sbatch", "--parsable", f"--job-name={sweep.spec.name}-report", f"--output={log_dir}/report-%j.out",
           "--dependency=afterany:" + jobs[-1], "--ntasks=1", *[o for o in sbatch_opts if o.startswith(("--partition", "-p", "--account", "-A", "--qos"))],
           str(SBATCH), str(sweep.dir), "report"]
    jobs.append(sbatch(cmd))
    return jobs


def sbatch(cmd: list[str]) -> str:
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
