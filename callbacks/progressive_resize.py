"""Progressive resizing: train at low resolution first, ramp up towards the end.

ffcv-imagenet's schedule (train_imagenet.py, get_resolution): ``min_res`` until
``start_ramp``, ``max_res`` from ``end_ramp`` on, linear in between rounded to a multiple of
32. Its ResNet configs ramp 160 -> 192 over the last ~20% of the epochs: in all twelve
rn18/rn50 configs (16, 24, 32, 40, 56, 88 epochs) start_ramp = 3E/4 - 1 and end_ramp = 7E/8 - 1
exactly, so by default the ramp is derived from ``trainer.max_epochs`` and one recipe with
``--trainer.max_epochs N`` reproduces every published config.
"""

from __future__ import annotations

import logging
import lightning as L
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

log = logging.getLogger(__name__)
_info = rank_zero_only(log.info)


def default_ramp(max_epochs: int) -> tuple[int, int]:
    """ffcv-imagenet's (start_ramp, end_ramp) for ``max_epochs``: (3E/4 - 1, 7E/8 - 1), rounded.

    Exact for its published configs (E a multiple of 8: 16 -> 11/13, 88 -> 65/76).
    """
    return max(0, round(3 * max_epochs / 4) - 1), max(0, round(7 * max_epochs / 8) - 1)


def resolution_at(epoch: int, min_res: int, max_res: int, start_ramp: int, end_ramp: int, step: int = 32) -> int:
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = min_res + (max_res - min_res) * (epoch - start_ramp) / (end_ramp - start_ramp)
    return int(round(interp / step)) * step


class ProgressiveResize(L.Callback):
    """Sets the DataModule's train resolution (``set_train_resolution(res)``) every epoch.

    ``start_ramp``/``end_ramp`` None (default): :func:`default_ramp` of ``trainer.max_epochs``.
    An explicit ramp that ends after the last epoch is warned about (the run never reaches
    ``max_res``).
    """

    def __init__(
        self,
        min_res: int = 160,  # ffcv-imagenet rn50/rn18 configs: resolution.min_res
        max_res: int = 192,  # resolution.max_res
        start_ramp: int | None = None,
        end_ramp: int | None = None,
        step: int = 32,  # get_resolution rounds to multiples of 32
    ) -> None:
        if not 0 < min_res <= max_res:
            raise ValueError(f"ProgressiveResize needs 0 < min_res <= max_res, got {min_res} and {max_res}")
        if (start_ramp is None) != (end_ramp is None):
            raise ValueError("ProgressiveResize: give both start_ramp and end_ramp, or neither (derived from max_epochs)")
        if start_ramp is not None and not 0 <= start_ramp <= end_ramp:
            raise ValueError(f"ProgressiveResize needs 0 <= start_ramp <= end_ramp, got {start_ramp} and {end_ramp}")
        if step < 1:
            raise ValueError(f"ProgressiveResize step must be >= 1, got {step}")
        self.min_res, self.max_res = min_res, max_res
        self.start_ramp, self.end_ramp, self.step = start_ramp, end_ramp, step
        self.current: int | None = None
        self._ramp: tuple[int, int] | None = None

    def ramp(self, max_epochs: int | None) -> tuple[int, int]:
        """The (start_ramp, end_ramp) used for a run of ``max_epochs``."""
        if self.start_ramp is not None:
            return self.start_ramp, self.end_ramp
        if not max_epochs or max_epochs < 1:
            raise ValueError(
                "ProgressiveResize derives its ramp from trainer.max_epochs, which is not set: "
                "set trainer.max_epochs or the callback's start_ramp and end_ramp"
            )
        return default_ramp(max_epochs)

    def _apply(self, trainer) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "set_train_resolution"):
            raise ValueError(
                "ProgressiveResize needs a DataModule with set_train_resolution(res), "
                "such as datamodules.ImageNetDataModule"
            )
        if self._ramp is None:
            self._ramp = self.ramp(trainer.max_epochs)
            last = (trainer.max_epochs or 0) - 1
            if self.start_ramp is not None and trainer.max_epochs and self._ramp[1] > last:
                rank_zero_warn(
                    f"ProgressiveResize: the ramp ends at epoch {self._ramp[1]} but the last epoch is {last}: "
                    f"training never reaches {self.max_res} px; drop start_ramp/end_ramp to derive them from max_epochs "
                    f"({default_ramp(trainer.max_epochs)})"
                )
            else:
                _info(f"ProgressiveResize: {self.min_res} -> {self.max_res} px from epoch {self._ramp[0]} to {self._ramp[1]}")
        res = resolution_at(trainer.current_epoch, self.min_res, self.max_res, *self._ramp, self.step)
        if res != self.current:
            dm.set_train_resolution(res)
            _info(f"ProgressiveResize: epoch {trainer.current_epoch}: train resolution {res}")
            self.current = res

    # The first epoch's train iterator is created before on_train_epoch_start (Lightning's
    # FitLoop.setup_data), so the starting resolution is set at fit start (also on resume).
    def on_fit_start(self, trainer, pl_module) -> None:
        self._apply(trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._apply(trainer)
