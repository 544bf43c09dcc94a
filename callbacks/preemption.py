"""Slurm preemption that cannot deadlock: the ranks stop together at a batch boundary.

Lightning 2.6 (``SLURMEnvironment(auto_requeue=True)``) saves the hpc checkpoint inside its
SIGUSR1 handler, on each rank wherever the signal finds it. The save has collectives (a
barrier), so a rank that gets the signal while the others are inside a gradient all-reduce
waits for them forever, and the job is never requeued (1 of 2 preempted 2-task jobs on the
local Slurm; always, when the signal reaches one rank only).

Here the handler only notes the signal. At the end of a training batch that every rank reaches
(every ``check_every_n_steps`` optimizer steps) the ranks agree on it with one all-reduce: if
any rank was signalled, every rank saves ``<default_root_dir>/hpc_ckpt_N.ckpt`` (where Lightning
looks for it under Slurm and resumes from it by itself), the next batch does not start, the
loggers are flushed and closed, and :class:`Preempted` (a ``SystemExit`` with code 0) leaves
``trainer.fit``. Requeue after the trainer has torn down, on every rank, so Slurm's SIGTERM that
follows the requeue finds nothing half-done::

    trainer = Trainer(callbacks=[SlurmRequeue()], ...)
    try:
        trainer.fit(model, datamodule)
    except Preempted as stop:
        stop.requeue()  # every rank: ignore SIGTERM, barrier; then rank 0: scontrol requeue $SLURM_JOB_ID

``zoo fit`` does this itself (launch/zoo_cli.py, launch/errors.py). Outside Slurm the callback does nothing.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)
_info = rank_zero_only(log.info)


class Preempted(SystemExit):
    """Raised on every rank after the hpc checkpoint was saved; exit code 0 when uncaught."""

    def __init__(self, ckpt_path: str, global_step: int, is_global_zero: bool, signum: int) -> None:
        super().__init__(0)
        self.ckpt_path, self.global_step, self.is_global_zero, self.signum = ckpt_path, global_step, is_global_zero, signum

    def requeue(self, env: Optional[dict[str, str]] = None) -> Optional[str]:
        """Rank 0: ``scontrol requeue`` this job; returns an error line, or None when requeued (or not rank 0).

        Call it on every rank, after the trainer has torn down. The requeue makes Slurm send
        SIGTERM to the whole step at once; a rank still inside Lightning's teardown would run
        Lightning's SIGTERM handler, whose broadcast fails against a rank that is gone (a
        traceback in the job's log, seen on the local Slurm). So every rank first ignores
        SIGTERM, then all meet in a barrier, and only then does rank 0 requeue. Slurm's SIGKILL
        after KillWait remains the backstop for a process that does not leave.
        """
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # every rank is out of the trainer (Lightning's DDP teardown keeps the group)
        if not self.is_global_zero:
            return None
        env = dict(os.environ) if env is None else env
        job = slurm_job_id(env)
        if job is None:
            return "not a Slurm job (no SLURM_JOB_ID): resume with --ckpt_path " + self.ckpt_path
        _stop_wandb_service()
        try:
            r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            return f"scontrol requeue {job} failed ({e}): resubmit the job; it resumes from {self.ckpt_path}"
        if r.returncode != 0:
            why = (r.stderr or r.stdout).strip().splitlines()
            return (f"scontrol requeue {job} failed ({why[0] if why else f'exit {r.returncode}'}): resubmit the job "
                    f"(sbatch --requeue); it resumes from {self.ckpt_path}")
        return None


def _stop_wandb_service() -> None:
    """Shut W&B's service process down (``wandb.teardown``) before the requeue: its SIGTERM
    reaches the whole step at once, and a service killed by it before this process exits makes
    W&B's atexit hook print a ConnectionResetError traceback into the job's log (seen on the
    local Slurm in 3 of 4 preempted test jobs in a row). The run itself was finished at the
    stop (``_stop``)."""
    if "wandb" not in sys.modules:
        return
    try:
        sys.modules["wandb"].teardown()
    except Exception as e:  # never let W&B keep the job from being requeued
        log.warning(f"zoo: W&B teardown before the requeue failed ({type(e).__name__}: {e})")


def slurm_job_id(env: dict[str, str]) -> Optional[str]:
    """The id ``scontrol requeue`` takes: ``ARRAYJOB_TASK`` for an array task (as Lightning's handler)."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job = env.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def hpc_save_path(root: str) -> str:
    """``hpc_ckpt_<max N + 1>.ckpt``: the name Lightning's hpc resume looks for (highest N wins)."""
    numbers = [int(m.group(1)) for p in Path(root).glob("hpc_ckpt_*.ckpt") if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return str(Path(root) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


class SlurmRequeue(L.Callback):
    """Turn Slurm's warning signal into a checkpoint saved by all ranks at the same step.

    Args:
        check_every_n_steps: how often (optimizer steps) the ranks agree on the signal: one
            4-byte all-reduce each time (Lightning 2.6 already broadcasts its SIGTERM flag at
            every step: this adds a tenth of that). With 10, the save starts at most 10 steps
            after the signal, inside the 90 s that ``--signal=SIGUSR1@90`` leaves
            (launch/slurm/train.sbatch) while a step takes under 9 s.
        enabled: None: where Lightning's own handler would act (the trainer runs in a
            ``SLURMEnvironment`` with ``auto_requeue=True``, on that environment's signal).
    """

    def __init__(self, check_every_n_steps: int = 10, enabled: Optional[bool] = None) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"SlurmRequeue: check_every_n_steps={check_every_n_steps} must be >= 1")
        self.check_every_n_steps = check_every_n_steps
        self.enabled = enabled
        self.signalled: Optional[tuple[int, float]] = None  # (signum, time.monotonic()) on this rank
        self.saved: Optional[Preempted] = None
        self._checked_step = -1
        self._previous: Any = None
        self._signum: Optional[int] = None

    # --------------------------------------------------------------------------- the handler
    def _on_signal(self, signum: int, frame: Any) -> None:
        # Nothing else: no print (not reentrant), no collective (the other ranks are elsewhere)
        if self.signalled is None:
            self.signalled = (signum, time.monotonic())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.signalled, self.saved, self._checked_step = None, None, -1
        # DDP strategies name their cluster environment; one device under Slurm has none
        env = getattr(trainer.strategy, "cluster_environment", None)
        if env is None and SLURMEnvironment.detect():
            env = SLURMEnvironment()
        on_slurm = isinstance(env, SLURMEnvironment) and env.auto_requeue  # as Lightning's own handler
        if stage != "fit" or not (on_slurm if self.enabled is None else self.enabled):
            return
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        requeue_signal = env.requeue_signal if isinstance(env, SLURMEnvironment) else None
        self._signum = int(requeue_signal or signal.SIGUSR1)
        # Installed before Lightning registers its handlers (after the setup hooks): it sees a
        # handler and does not add its own saving one (_SignalConnector._has_already_handler).
        self._previous = signal.signal(self._signum, self._on_signal)
        # in place of Lightning's "SLURM auto-requeueing enabled" (launch/output.py hides it):
        # its handler is not the one that runs
        _info(f"zoo: Slurm preemption: {signal.Signals(self._signum).name} saves a checkpoint at a step "
                       f"every rank agrees on (checked every {self.check_every_n_steps} steps), then the job is requeued")

    def _restore(self) -> None:
        if self._signum is not None and signal.getsignal(self._signum) == self._on_signal:
            signal.signal(self._signum, self._previous if self._previous is not None else signal.SIG_DFL)
        self._signum = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    # --------------------------------------------------------------------------- the agreement
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._signum is None or self.saved is not None:
            return
        step = trainer.global_step
        # once per optimizer step (not per micro-batch), the same steps on every rank
        if step == self._checked_step or step % self.check_every_n_steps:
            return
        self._checked_step = step
        # Not at the last batch of an epoch (Lightning then skips that epoch's validation on
        # resume) nor at the end of training (the job finishes by itself): the next check does.
        if batch_idx + 1 >= trainer.num_training_batches or (trainer.max_steps > 0 and step >= trainer.max_steps):
            return
        if not trainer.strategy.reduce_boolean_decision(self.signalled is not None, all=False):
            return
        # Every rank is here, at the end of the same batch: Lightning's own point for
        # ModelCheckpoint(every_n_train_steps), from which it resumes at the next batch.
        path = hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path, weights_only=False)  # the full state: optimizer, loops, callbacks
        signum = self.signalled[0] if self.signalled else self._signum
        self.saved = Preempted(path, step, trainer.is_global_zero, int(signum))
        if trainer.is_global_zero:
            waited = f" ({time.monotonic() - self.signalled[1]:.1f} s after it)" if self.signalled else ""
            log.info(f"zoo: {signal.Signals(signum).name} (Slurm preemption or time limit): every rank stopped at step "
                     f"{step}{waited}; saved {path}")

    # This batch's metrics are logged after on_train_batch_end; stop before the next one starts.
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._stop(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop(trainer)

    def _stop(self, trainer: L.Trainer) -> None:
        if self.saved is None:
            return
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            logger.save()
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                # flushed and closed now, before the requeue's SIGTERM reaches wandb's service process
                logger.experiment.finish()
        self._restore()
        raise self.saved
