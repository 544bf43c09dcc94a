"""A TQDM progress bar that redraws at most every ``min_interval_s`` seconds.

Lightning's ``TQDMProgressBar`` redraws every ``refresh_rate`` batches whatever the time: it sets
the count and calls ``refresh()`` itself, which bypasses tqdm's own ``mininterval`` (0.1 s), and
each redraw formats the bar, writes to the terminal and converts the bar's metrics to Python
numbers. At 100+ steps per second (small models, the demo, a fast GPU) that is ~0.3 ms of the
training thread per step (benchmarks/overhead.py's profile). This bar keeps Lightning's rule and
adds tqdm's: a batch count is drawn only if ``min_interval_s`` has passed since the last redraw of
that bar, and the last batch of a known total always is.
"""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import TQDMProgressBar


class ThrottledProgressBar(TQDMProgressBar):
    """``TQDMProgressBar(refresh_rate, process_position, leave)`` plus ``min_interval_s``
    (tqdm's default ``mininterval``, 0.1 s; 0 gives Lightning's behaviour)."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False,
                 min_interval_s: float = 0.1) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}")
        self.min_interval_s = min_interval_s
        self._drawn_at: dict[int, float] = {}  # bar id -> monotonic time of its last redraw

    def get_metrics(self, trainer, pl_module):
        # and what the model adds when the bar redraws (ImageClassifier.progress_bar_values: the loss, read here only)
        values = getattr(pl_module, "progress_bar_values", None)
        return {**super().get_metrics(trainer, pl_module), **(values() if callable(values) else {})}

    def _should_update(self, current: int, total) -> bool:
        if not super()._should_update(current, total):
            return False
        if current == total or self.min_interval_s == 0:
            return True
        now, key = time.monotonic(), id(self._active_bar())
        if now - self._drawn_at.get(key, float("-inf")) < self.min_interval_s:
            return False
        self._drawn_at[key] = now
        return True

    def _active_bar(self):
        """The bar being advanced: the innermost one open (validation runs inside a training epoch)."""
        for name in ("_predict_progress_bar", "_test_progress_bar", "_val_progress_bar"):
            bar = getattr(self, name, None)
            if bar is not None and not bar.disable:
                return bar
        return self._train_progress_bar

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # an epoch of unknown length ends on a batch that may not have been drawn
        bar = self._train_progress_bar
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if bar is not None and not bar.disable and bar.n != done:
            bar.n = done
            bar.refresh()
        super().on_train_epoch_end(trainer, pl_module)
