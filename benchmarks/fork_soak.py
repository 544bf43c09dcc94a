"""How often a 2-rank CPU DDP fit with DataLoader workers hangs, per worker start method.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/fork_soak.py --runs 20 --methods fork,forkserver

Each run is what a preempted Slurm job does, without Slurm: two `zoo fit` ranks (the Slurm
environment variables srun sets, each rank pinned to one core, gloo, the torchvision backend with
one worker per loader, W&B offline), 2 epochs, then the same run resumed from its last checkpoint
to 4 epochs. A run that has not finished after `--timeout` seconds is a hang; the ranks and their
workers are killed. The methods alternate run by run (fork, forkserver, fork, ...), so both see the
same machine load. On CPython before 3.11.10 a forked worker could deadlock at birth
(python/cpython#112275; see datamodules/processes/workers.worker_start_method). Not part of
`make test`: it runs for minutes by design.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _part(work: Path, data: Path, job: str, epochs: int, method: str, timeout: float, resume: bool) -> tuple[bool, float]:
    from tests.test_launch import _free_port, _srun_task_env  # what srun gives each task, as the launch tests use

    zoo = str(Path(sys.executable).with_name("zoo"))
    port, cores = _free_port(), sorted(os.sched_getaffinity(0))
    args = [zoo, "fit", "--config", str(REPO / "launch/recipes/demo.yaml"), "--data.root", str(data),
            "--data.backend", "torchvision", "--data.batch_size", "6", "--data.num_workers", "1",
            "--data.train_res", "32", "--data.val_res", "32", "--trainer.accelerator", "cpu",
            "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_epochs", str(epochs),
            "--trainer.log_every_n_steps", "1", "--run.root", str(work / "runs"), "--run.logger", "wandb",
            "--run.dashboard", "false"]
    if resume:
        args += ["--ckpt_path", str(work / "runs" / "convnet" / f"slurm-{job}.0" / "checkpoints" / "last.ckpt")]
    procs = []
    for rank in range(2):
        env = {**_srun_task_env(job, rank, 2, port, work), "ZOO_WORKER_START": method}
        pin = ["taskset", "-c", str(cores[rank % len(cores)])]
        log = open(work / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen(pin + args, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    t0 = time.monotonic()
    ok = True
    for p in procs:
        try:
            ok &= p.wait(timeout=max(timeout - (time.monotonic() - t0), 1)) == 0
        except subprocess.TimeoutExpired:
            ok = False
    for p in procs:  # the ranks, their workers and forkservers (one session each)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    return ok, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="runs per method")
    ap.add_argument("--methods", default="fork,forkserver")
    ap.add_argument("--timeout", type=float, default=100.0, help="seconds per part before it counts as a hang")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/fork_soak.md"))
    args = ap.parse_args()

    from benchmarks._common import machine_line, write_result
    from tests.conftest import make_image_folder

    load = os.getloadavg()[0]
    methods = args.methods.split(",")
    stats = {m: {"runs": 0, "hangs": 0, "walls": []} for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_image_folder(Path(tmp) / "data")
        for i in range(args.runs):
            for m in methods:
                work = Path(tmp) / f"{m}-{i}"
                work.mkdir()
                job = str(90000 + i)
                ok, wall = _part(work, data, job, 2, m, args.timeout, resume=False)
                if ok:
                    ok, wall2 = _part(work, data, job, 4, m, args.timeout, resume=True)
                    wall += wall2
                s = stats[m]
                s["runs"] += 1
                s["hangs"] += not ok
                if ok:
                    s["walls"].append(wall)
                print(f"run {i} {m}: {'ok' if ok else 'HANG'} {wall:.1f} s", flush=True)
    lines = ["# DDP fit + resume with DataLoader workers: hangs per worker start method", "",
             f"Command: `{' '.join(['python', *sys.argv])}`", "",
             machine_line("cpu", load, f"Python {sys.version.split()[0]}"), "",
             "| start method | runs | hung | finished run, median wall (s) |", "| --- | ---: | ---: | ---: |"]
    for m in methods:
        s = stats[m]
        med = sorted(s["walls"])[len(s["walls"]) // 2] if s["walls"] else float("nan")
        lines.append(f"| {m} | {s['runs']} | {s['hangs']} | {med:.1f} |")
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
