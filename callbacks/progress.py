"""The progress display: a TQDM bar on a terminal, plain log lines everywhere else.

On a terminal, :class:`ThrottledProgressBar` is Lightning's ``TQDMProgressBar`` redrawn at most
every ``min_interval_s`` seconds. Lightning's bar redraws every ``refresh_rate`` batches whatever
the time: it sets the count and calls ``refresh()`` itself, which bypasses tqdm's own
``mininterval`` (0.1 s), and each redraw formats the bar, writes to the terminal and converts the
bar's metrics to Python numbers. At 100+ steps per second (small models, the demo, a fast GPU)
that is ~0.3 ms of the training thread per step (benchmarks/overhead.py's profile). This bar keeps
Lightning's rule and adds tqdm's: a batch count is drawn only if ``min_interval_s`` has passed
since the last redraw of that bar, and the last batch of a known total always is.

When standard output is not a terminal (a Slurm job's log, ``nohup``, CI), a redrawn bar is a
stream of carriage returns that grows the log by a line's width per redraw. There the same
callback prints plain lines instead, as timm's ``train.py --log-interval`` and torchvision's
``MetricLogger(print_freq)`` do: one line every ``log_interval`` batches (timm's default, 50) and
one at each epoch's end, with the loss, the rate in images per second and the time left.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Optional

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from ._batches import batch_size_of


def _clock(seconds: float) -> str:
    """``H:MM:SS`` (or ``M:SS`` under an hour)."""
    s = int(round(max(seconds, 0.0)))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def _number(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class ThrottledProgressBar(TQDMProgressBar):
    """``TQDMProgressBar(refresh_rate, process_position, leave)`` plus:

    min_interval_s: on a terminal, the least time between two redraws of a bar (tqdm's default
        ``mininterval``, 0.1 s; 0 gives Lightning's behaviour).
    log_interval: off a terminal, a line every this many batches (timm's ``--log-interval``
        default, 50), besides one at each epoch's end.
    plain: ``None`` (default): lines when standard output is not a terminal, the bar when it
        is; ``True``/``False`` force lines/the bar.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False,
                 min_interval_s: float = 0.1, log_interval: int = 50, plain: Optional[bool] = None) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}")
        if log_interval < 1:
            raise ValueError(f"log_interval must be >= 1 batch, got {log_interval}")
        self.min_interval_s = min_interval_s
        self.log_interval = log_interval
        self.plain = plain
        self._drawn_at: dict[int, float] = {}  # bar id -> monotonic time of its last redraw
        self._lines: Optional[_Lines] = None

    def get_metrics(self, trainer, pl_module):
        # and what the model adds when the bar redraws (ImageClassifier.progress_bar_values: the loss, read here only)
        values = getattr(pl_module, "progress_bar_values", None)
        return {**super().get_metrics(trainer, pl_module), **(values() if callable(values) else {})}

    @property
    def plain_output(self) -> bool:
        """True where this bar prints lines (decided on first use, from standard output)."""
        if self.plain is None:
            isatty = getattr(sys.stdout, "isatty", None)
            self.plain = not (isatty is not None and isatty())
        return self.plain

    # ------------------------------------------------------------------ the terminal bar
    def _should_update(self, current: int, total) -> bool:
        if self.plain_output or not super()._should_update(current, total):
            return False  # off a terminal the bars stay closed; _Lines prints instead
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

    def _closed(self, init):
        return Tqdm(disable=True) if self.plain_output else init()

    def init_sanity_tqdm(self) -> Tqdm:
        return self._closed(super().init_sanity_tqdm)

    def init_train_tqdm(self) -> Tqdm:
        return self._closed(super().init_train_tqdm)

    def init_validation_tqdm(self) -> Tqdm:
        return self._closed(super().init_validation_tqdm)

    def init_test_tqdm(self) -> Tqdm:
        return self._closed(super().init_test_tqdm)

    def init_predict_tqdm(self) -> Tqdm:
        return self._closed(super().init_predict_tqdm)

    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        if self.plain_output:  # LightningModule.print goes through the bar, closed here
            if self.is_enabled:
                print(*args, sep=sep, **kwargs, flush=True)
            return
        super().print(*args, sep=sep, **kwargs)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if self.plain_output and self.is_enabled:
            self._lines = _Lines(self, trainer)

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        if self._lines is not None:
            self._lines.epoch_start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._lines is not None:
            self._lines.batch(pl_module, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._lines is not None:
            self._lines.epoch_end(pl_module)
        else:
            # an epoch of unknown length ends on a batch that may not have been drawn
            bar = self._train_progress_bar
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if bar is not None and not bar.disable and bar.n != done:
                bar.n = done
                bar.refresh()
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, *args) -> None:
        super().on_train_end(*args)
        self._lines = None

    # validate / test / predict on their own: a line every log_interval batches and at the end
    def _eval_line(self, trainer, what: str, batch_idx: int, total, end: bool = False) -> None:
        if not (self.plain_output and self.is_enabled) or trainer.sanity_checking or trainer.state.fn == "fit":
            return
        n = batch_idx + 1
        if end or n % self.log_interval == 0:
            of = f"/{total}" if total is not None and math.isfinite(total) else ""
            print(f"{what}: batch {n}{of}" + (" done" if end else ""), flush=True)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._eval_line(trainer, "validate", batch_idx, self.total_val_batches_current_dataloader)
        self._eval_n = batch_idx

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._eval_line(trainer, "test", batch_idx, self.total_test_batches_current_dataloader)
        self._eval_n = batch_idx

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._eval_line(trainer, "predict", batch_idx, self.total_predict_batches_current_dataloader)
        self._eval_n = batch_idx

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        self._eval_line(trainer, "validate", getattr(self, "_eval_n", -1), None, end=True)

    def on_test_end(self, trainer, pl_module) -> None:
        super().on_test_end(trainer, pl_module)
        self._eval_line(trainer, "test", getattr(self, "_eval_n", -1), None, end=True)

    def on_predict_end(self, trainer, pl_module) -> None:
        super().on_predict_end(trainer, pl_module)
        self._eval_line(trainer, "predict", getattr(self, "_eval_n", -1), None, end=True)


class _Lines:
    """The lines of one fit: rate over the batches since the last line, ETA from the time per
    batch (this epoch) and per epoch (the last whole epoch, validation included)."""

    def __init__(self, bar: ThrottledProgressBar, trainer) -> None:
        self.bar, self.trainer = bar, trainer
        self.first = True
        self.last_epoch_s: Optional[float] = None
        # a fit resumed inside an epoch (a requeued job's hpc checkpoint) gets no on_train_epoch_start
        # before its first batch: start the epoch's counters here too
        self.epoch_start()

    def epoch_start(self) -> None:
        now = time.monotonic()
        self.epoch_t0 = self.window_t0 = self.train_t1 = now
        self.window_images = self.epoch_images = 0
        self.window_batches = 0
        self.batch_s: Optional[float] = None

    def _metrics(self, pl_module) -> str:
        items = self.bar.get_metrics(self.trainer, pl_module)  # a host sync: once per line
        items.pop("v_num", None)
        return "  ".join(f"{k} {_number(v)}" for k, v in items.items())

    def _epochs(self) -> str:
        total = self.trainer.max_epochs
        e = self.trainer.current_epoch  # counted from 0, as in checkpoint names and the diagnosis
        return f"epoch {e}" + (f" ({e + 1} of {total})" if total and total > 0 else "")

    def _fit_left(self, batches_left: float) -> Optional[float]:
        """Seconds left in the fit, or None when the end is unknown (max_epochs -1, an unsized loader)."""
        t = self.trainer
        total = self.bar.total_train_batches
        epochs_left = (t.max_epochs - 1 - t.current_epoch) if t.max_epochs and t.max_epochs > 0 else None
        if epochs_left is None or self.batch_s is None or not math.isfinite(batches_left):
            return None
        per_epoch = self.last_epoch_s if self.last_epoch_s is not None else (
            total * self.batch_s if math.isfinite(total) else None)
        if per_epoch is None:
            return None
        return batches_left * self.batch_s + epochs_left * per_epoch

    def batch(self, pl_module, batch: Any, batch_idx: int) -> None:
        now = time.monotonic()
        n = batch_idx + 1
        images = batch_size_of(batch)
        self.window_images += images
        self.epoch_images += images
        self.window_batches += 1
        self.train_t1 = now
        total = self.bar.total_train_batches
        if not (self.first or n % self.bar.log_interval == 0) or n == total:  # the epoch's line follows
            return
        dt = max(now - self.window_t0, 1e-9)
        of = f"/{total}" if math.isfinite(total) else ""
        if self.first:  # loader start-up (ffcv compiles its pipeline) is no rate to extrapolate from
            timing = f"  first batch after {dt:.1f} s"
        else:
            self.batch_s = dt / self.window_batches
            left = self._fit_left(total - n if math.isfinite(total) else math.inf)
            timing = f"  {self.window_images / dt:.1f} img/s" + (f"  ETA {_clock(left)}" if left is not None else "")
        print(f"{self._epochs()}  batch {n}{of}  {self._metrics(pl_module)}{timing}", flush=True)
        self.first = False
        self.window_t0, self.window_images, self.window_batches = now, 0, 0

    def epoch_end(self, pl_module) -> None:
        now = time.monotonic()
        train_s = max(self.train_t1 - self.epoch_t0, 1e-9)
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches:
            self.batch_s = train_s / batches
        self.last_epoch_s = now - self.epoch_t0
        left = self._fit_left(0)
        eta = f"  ETA {_clock(left)}" if left is not None else ""
        print(f"{self._epochs()}  done in {_clock(self.last_epoch_s)}  {self._metrics(pl_module)}  "
              f"{self.epoch_images / train_s:.1f} img/s{eta}", flush=True)
        self.first = False
