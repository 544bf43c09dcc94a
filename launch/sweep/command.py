"""`zoo sweep SPEC`: the command, and the driver that runs the rounds here, one trial after another."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml
from optuna.trial import TrialState
from tqdm import tqdm

from .report import fmt, report
from .liveness import fail_stale
from .slurm import submit_slurm, worker_main
from .spec import SpecError, load_spec
from .study import Sweep
from .trial import TrialPreempted, run_trial, trial_id


def run_local(sweep: Sweep, in_process: bool = False) -> None:
    runner = None
    if in_process:
        from . import train  # Lightning: imported when a trial runs here, not for `zoo sweep --status`

        runner = train.train_in_process
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
                number, value, run_dir = run_trial(sweep, rnd, study, space, in_process=runner)
            except TrialPreempted as e:  # a local sweep inside a Slurm job that was preempted and requeued
                bar.close()
                tqdm.write(str(e), file=sys.stderr)
                return
            params = study.get_trials(deepcopy=False)[number].params
            desc = " ".join(f"{k}={fmt(v)}" for k, v in params.items())
            msg = f"{sweep.spec.metric} {value:.4f}" if value is not None else f"FAILED (log: {sweep.dir / 'logs' / (trial_id(rnd, number) + '.log')})"
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
        from .train import train_main

        return train_main(argv[1:])
    if argv and argv[0] == "worker":
        return worker_main(argv[1:])
    return main(argv)
