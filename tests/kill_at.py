"""A callback that SIGKILLs its own process at a chosen point (tests/test_resume.py).

Used as ``--trainer.callbacks+=tests.kill_at.KillAt --trainer.callbacks.point=... --trainer.callbacks.step=N``.
"""

from __future__ import annotations

import os
import signal

import lightning as L


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(L.Callback):
    """points: ``mid_epoch`` (after optimizer step ``step``), ``validation`` (in the first val batch
    once ``global_step >= step``), ``checkpoint_save`` (inside torch.save of the first checkpoint
    written once ``global_step >= step``), ``accumulating`` (after micro-batch ``step`` whose
    gradients are not yet applied; needs accumulate_grad_batches > 1), ``mid_epoch_checkpoint``
    (after optimizer step ``step``, first save ``<checkpoints>/mid.ckpt`` there, as a preempted
    job's hpc checkpoint is saved at a batch boundary), ``beton_write`` (while the first .beton
    is written: ``step`` 0 inside ffcv's writer, with the temporary file half written; ``step`` 1
    right after it is renamed into place, cut to half its size and without its sidecar, i.e. what
    a non-atomic writer would leave)."""

    def __init__(self, point: str, step: int = 1) -> None:
        self.point, self.step = point, step
        self._micro = 0
        if point == "beton_write":  # prepare_data runs before any callback hook: patch now
            self._patch_beton_writer()

    def _patch_beton_writer(self) -> None:
        if self.step == 0:
            from ffcv.writer import DatasetWriter

            real_write = DatasetWriter.from_indexed_dataset

            def write_half_then_die(writer, *a, **k):
                real_write(writer, *a, **k)
                os.truncate(writer.fname, os.path.getsize(writer.fname) // 2)
                _die()

            DatasetWriter.from_indexed_dataset = write_half_then_die
        else:
            from datamodules import ffcv_io

            real_os = ffcv_io.beton.os

            class _Os:  # ffcv_io.beton's os, whose replace() of a .beton dies after the rename
                def __getattr__(self, name):
                    return getattr(real_os, name)

                @staticmethod
                def replace(src, dst, *a, **k):
                    real_os.replace(src, dst, *a, **k)
                    if str(dst).endswith(".beton"):
                        real_os.truncate(dst, real_os.path.getsize(dst) // 2)
                        _die()

            ffcv_io.beton.os = _Os()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.point == "mid_epoch" and trainer.global_step >= self.step:
            _die()
        if self.point == "mid_epoch_checkpoint" and trainer.global_step >= self.step:
            trainer.save_checkpoint(os.path.join(trainer.checkpoint_callback.dirpath, "mid.ckpt"))
            _die()
        if self.point == "accumulating":
            self._micro += 1
            if self._micro >= self.step and self._micro % trainer.accumulate_grad_batches:
                _die()

    def on_validation_batch_end(self, trainer, *args, **kwargs) -> None:
        if self.point == "validation" and not trainer.sanity_checking and trainer.global_step >= self.step:
            _die()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.point == "checkpoint_save" and trainer.global_step >= self.step:
            import torch

            real_save = torch.save

            def save_then_die(obj, f, *a, **k):  # part of the file written, then the kill
                real_save(obj, f, *a, **k)
                if hasattr(f, "flush"):
                    f.truncate(max(1, f.tell() // 2))
                    f.flush()
                else:  # a path: a writer that saves in place
                    os.truncate(f, max(1, os.path.getsize(f) // 2))
                _die()

            torch.save = save_then_die
