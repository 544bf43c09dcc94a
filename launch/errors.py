"""A user's mistake in one line: which exceptions are the user's, and how each becomes an exit code.

``zoo`` answers DataError, ConfigError, WeightsError, LaunchError (and the others in
user_errors()) with one ``error: ...`` line on stderr and exit code 2; ``ZOO_DEBUG=1`` shows
the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Optional


class LaunchError(RuntimeError):
    """A launch mistake (Slurm tasks vs devices, no srun) that the CLI answers in one line."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions ``zoo`` answers with one line and exit code 2 (imported on use: `zoo --help` stays fast)."""
    from datamodules.imagenet import DataError
    from zoo.registry import UnknownModelError
    from zoo.weights import WeightsError

    from launch.safety import ConfigError

    # FloatingPointError: callbacks.nonfinite.NonFiniteLossCheck (step, LR, first bad layer)
    return (DataError, UnknownModelError, WeightsError, FileNotFoundError, LaunchError, ConfigError, FloatingPointError)


def requeue(stop) -> int:
    """After a preemption stop (callbacks.preemption): the trainer is down; rank 0 requeues the job."""
    from callbacks.preemption import slurm_job_id

    error = stop.requeue()
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if stop.is_global_zero:
        print(f"zoo: requeued Slurm job {slurm_job_id(dict(os.environ))}: it resumes from {stop.ckpt_path} "
              f"(step {stop.global_step})", flush=True)
    return 0


def disk_error(e: OSError) -> Optional[str]:
    """One line for a full, read-only or forbidden disk (writing .beton files, checkpoints, logs)."""
    import errno

    where = f" writing {e.filename}" if e.filename else ""
    fixes = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
    }
    if e.errno not in fixes:
        return None
    return (f"{fixes[e.errno]}{where}: free space or point data.beton_dir (or $ZOO_DATA_DIR for .beton "
            "files) and --run.root to a writable disk with room")


def fail(message: str, discard: bool = True) -> int:
    """A user's error: one line, and no run directory or W&B run left half-started."""
    from launch.safety import discard_failed_run, redact

    discard_failed_run(delete=discard)
    lines = message.strip().splitlines() or ["failed"]
    more = " (details: rerun with ZOO_DEBUG=1)" if len(lines) > 1 else ""
    print(f"error: {redact(lines[0])}{more}", file=sys.stderr)
    return 2


def one_line_parse_error(message: str, subcommand: str) -> str:
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if lines and lines[0].startswith('Linked "model.num_classes"'):
        return ("model.num_classes comes from the data (the class folders of data.root) or from --model.weights: "
                "drop --model.num_classes")
    given = next((ln for ln in lines if ln.startswith("Given value:")), None)
    first = lines[0] if lines else "invalid arguments"
    if given and given not in first:
        first = f"{first.rstrip(':')} {given[0].lower()}{given[1:]}"
    return f"{first} (see `zoo {subcommand} --help`)"
