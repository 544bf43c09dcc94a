"""Which worker runs a trial, whether it still lives, and what becomes of a trial whose worker
is gone (JournalStorage has no heartbeat): failed and, within the spec's retries, queued again."""

from __future__ import annotations

import os
import socket
import subprocess

from optuna.trial import TrialState

from .study import Sweep


def worker_key() -> str:
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm:{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}"
    return f"local:{socket.gethostname()}:{os.getpid()}"


def worker_alive(key: str) -> bool:
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
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        key = t.user_attrs.get("worker")
        if key and key != worker_key() and not worker_alive(key):
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except Exception:  # noqa: BLE001 - another process told it first
                continue
            failed.append(t.number)
            maybe_retry(study, sweep, t)
    return failed


def maybe_retry(study, sweep: Sweep, t) -> None:
    attempt = int(t.user_attrs.get("attempt", 1))
    if attempt <= sweep.spec.retries:
        study.enqueue_trial(t.params, user_attrs={"attempt": attempt + 1, "retry_of": t.number})
