"""The run directory and the run id: where a run writes, and how every rank and node agrees on it.

A run writes under ``--run.root/<name>/<id>``; the id is the same on every rank and node
(Slurm step, torchrun agent store or ``ZOO_RUN_ID``) and stable across a Slurm requeue.
A resumed checkpoint leads back to its run directory, and the directory keeps its W&B id.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from launch.errors import LaunchError


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def new_run_id() -> str:
    """Date for sorting plus 6 random hex digits: parallel runs started in the same second differ."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _slurm_step(env: Mapping[str, str]) -> Optional[str]:
    """``JOBID.STEPID`` when this process is a task that srun started (Lightning's SLURMEnvironment).

    Every task of one srun step shares it, on every node, and a requeued job gets it back
    (same job id, its first srun is step 0 again), so the requeued run finds its run directory
    and hpc checkpoint. Two sruns in one allocation are two steps, hence two runs.
    """
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None  # Lightning's _is_slurm_interactive_mode: the user starts processes himself
    job, step = env.get("SLURM_JOB_ID"), env.get("SLURM_STEP_ID")
    if not job or step is None or not step.isdigit() or int(step) >= 0xFFFFFFF0:
        return None  # the batch script itself (no srun): SLURM_STEP_ID unset or a special step
    return f"{job}.{step}"


def _torchrun_agreed_id(env: Mapping[str, str]) -> Optional[str]:
    """A fresh id that every torchrun worker, on every node, reads back from the agent's store.

    torchrun's rendezvous id is the user's (often reused, or "none" on every node); the
    elastic agent's TCPStore at MASTER_ADDR:MASTER_PORT is what all workers of one run share.
    """
    if "TORCHELASTIC_RUN_ID" not in env or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=120))
    key = f"zoo/run_id/{env['TORCHELASTIC_RUN_ID']}"
    return store.compare_set(key, "", new_run_id()).decode()


def run_id(env: Optional[Mapping[str, str]] = None) -> str:
    """The id of this run: different for every run, the same on every rank and node.

    - ``ZOO_RUN_ID`` if set: by the user, or by ``main()`` for the DDP processes Lightning
      starts (they inherit rank 0's environment while it runs);
    - ``slurm-JOBID.STEPID`` for a task started by srun (stable across a requeue), or
      ``slurm-JOBID.batch`` in a one-task batch script without srun;
    - a fresh id agreed through torchrun's agent store for torchrun workers;
    - else a fresh id.
    """
    env = os.environ if env is None else env
    if env.get("ZOO_RUN_ID"):
        return env["ZOO_RUN_ID"]
    step = _slurm_step(env)
    if step:
        return f"slurm-{step}"
    if env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS") == "1" and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        # a one-task batch script running `zoo fit` without srun: Lightning requeues it too, and
        # the requeued script must find the same directory (its hpc checkpoint) again
        return f"slurm-{env['SLURM_JOB_ID']}.batch"
    return _torchrun_agreed_id(env) or new_run_id()


def check_slurm_launch(devices, num_nodes: int, env: Optional[Mapping[str, str]] = None) -> None:
    """Fail in one line, before any process group waits, where a Slurm launch cannot work."""
    env = os.environ if env is None else env
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return
    ntasks = int(env["SLURM_NTASKS"])
    if _slurm_step(env) is None and ntasks > 1:
        raise LaunchError(
            f"Slurm job {env.get('SLURM_JOB_ID')} has {ntasks} tasks but this process was not started by srun "
            "(every task would wait for the others): run `srun zoo fit ...`, as launch/slurm/train.sbatch does"
        )
    per_node = env.get("SLURM_NTASKS_PER_NODE")
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if per_node and per_node.isdigit() and isinstance(devices, int) and int(per_node) != devices:
        raise LaunchError(
            f"--ntasks-per-node={per_node} but --trainer.devices={devices}: Slurm starts one task per device, "
            f"so set both to the same number (train.sbatch passes --trainer.devices {per_node} itself)"
        )
    nnodes = env.get("SLURM_NNODES")
    if nnodes and nnodes.isdigit() and int(nnodes) != num_nodes:
        raise LaunchError(f"Slurm gave {nnodes} nodes but --trainer.num_nodes={num_nodes}: set them equal")


WANDB_ID_FILE = "wandb_id"  # in the run directory: a resume or requeue continues the same W&B run


def wandb_run_id(run_dir: Path) -> str:
    """The run directory's W&B id, created on first use (rank 0 only calls this)."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    # W&B's own form (wandb.sdk.lib.runid): 8 characters of [a-z0-9]
    wid = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
    _PENDING_WANDB_IDS[run_dir] = wid  # written by save_wandb_run_id() once the inputs were checked
    return wid


_PENDING_WANDB_IDS: dict[Path, str] = {}


def save_wandb_run_id(run_dir: Path) -> None:
    """Write the id wandb_run_id() made up for ``run_dir`` (the run directory exists by now)."""
    wid = _PENDING_WANDB_IDS.pop(run_dir, None)
    if wid is None:
        return
    path = run_dir / WANDB_ID_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(wid + "\n")
    os.replace(tmp, path)


def resumed_run_dir(ckpt_path: Optional[str]) -> Optional[Path]:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` or ``<run>/hpc_ckpt_N.ckpt``)."""
    if not ckpt_path or ckpt_path in ("last", "hpc", "best", "registry"):
        return None
    ckpt = Path(ckpt_path).expanduser().resolve()
    for d in (ckpt.parent.parent, ckpt.parent) if ckpt.parent.name == "checkpoints" else (ckpt.parent,):
        if (d / WANDB_ID_FILE).is_file() or (d / "config.yaml").is_file():
            return d
    return None
