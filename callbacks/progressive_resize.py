"""Progressive resizing: train at low resolution first, ramp up towards the end.

ffcv-imagenet's schedule (train_imagenet.py, get_resolution): ``min_res`` until
``start_ramp``, ``max_res`` from ``end_ramp`` on, linear in between rounded to a multiple of
32. Its ResNet configs ramp 160 -> 192 over the last ~20% of the epochs.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


def resolution_at(epoch: int, min_res: int, max_res: int, start_ramp: int, end_ramp: int, step: int = 32) -> int:
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = min_res + (max_res - min_res) * (epoch - start_ramp) / (end_ramp - start_ramp)
    return int(round(interp / step)) * step


class ProgressiveResize(L.Callback):
    """Sets the DataModule's train resolution (``set_train_resolution(res)``) every epoch."""

    def __init__(self, min_res: int = 160, max_res: int = 192, start_ramp: int = 65, end_ramp: int = 76, step: int = 32) -> None:
        if not 0 < min_res <= max_res:
            raise ValueError(f"ProgressiveResize needs 0 < min_res <= max_res, got {min_res} and {max_res}")
        if not 0 <= start_ramp <= end_ramp:
            raise ValueError(f"ProgressiveResize needs 0 <= start_ramp <= end_ramp, got {start_ramp} and {end_ramp}")
        if step < 1:
            raise ValueError(f"ProgressiveResize step must be >= 1, got {step}")
        self.min_res, self.max_res = min_res, max_res
        self.start_ramp, self.end_ramp, self.step = start_ramp, end_ramp, step
        self.current: int | None = None

    def _apply(self, trainer) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "set_train_resolution"):
            raise ValueError(
                "ProgressiveResize needs a DataModule with set_train_resolution(res), "
                "such as datamodules.ImageNetDataModule"
            )
        res = resolution_at(trainer.current_epoch, self.min_res, self.max_res, self.start_ramp, self.end_ramp, self.step)
        if res != self.current:
            dm.set_train_resolution(res)
            rank_zero_info(f"ProgressiveResize: epoch {trainer.current_epoch}: train resolution {res}")
            self.current = res

    # The first epoch's train iterator is created before on_train_epoch_start (Lightning's
    # FitLoop.setup_data), so the starting resolution is set at fit start (also on resume).
    def on_fit_start(self, trainer, pl_module) -> None:
        self._apply(trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._apply(trainer)
