"""MetricLog: the run's scalars in ``<run dir>/metrics.jsonl``, whichever logger is used (or none).

W&B offline keeps its history in a binary ``.wandb`` file, TensorBoard in event files, and
``--run.logger none`` keeps nothing, so a run's curves could be drawn only with the logger's own
tools. This callback appends one JSON object per line, on rank zero only:

- a ``"kind": "step"`` row every ``every_n_steps`` optimizer steps (default: the trainer's
  ``log_every_n_steps``, when the loggers write too): ``train/loss`` of that batch, the learning
  rate of every parameter group (``lr/<its name>``, e.g. ``lr/backbone``, or ``lr/pg0``, ``lr/pg1``, ...) and ``throughput/img_per_s``, the
  images per second of all ranks together since the previous row (wall clock, data loading
  included);
- a ``"kind": "epoch"`` row at each train epoch's end: every epoch-level scalar the module and
  the callbacks logged (``train/loss_epoch``, ``train/acc1``, ``val/loss``, ``val/acc1``,
  ``diagnosis/*``, ...; ``val*`` only when a validation ran that epoch) and the fit diagnosis's
  verdict and reason (``callbacks.fit_diagnosis``) when it judged that epoch.

The loss of a step row is read from the step's output: one host-device sync per row, as a logger
writing ``train/loss_step`` costs. :func:`read_metric_log` reads the file back (a resumed run may
repeat steps; the last row of a step or epoch wins), or a CSVLogger's ``metrics.csv`` for runs
without one.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L

from ._batches import batch_size_of

FILENAME = "metrics.jsonl"


def _scalar(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError, RuntimeError):  # a tensor of several values
        return None
    return f if math.isfinite(f) else None


class MetricLog(L.Callback):
    """Args:
    filename: the file in the run directory (``trainer.default_root_dir``).
    every_n_steps: a step row every this many optimizer steps; ``None``: ``trainer.log_every_n_steps``.
    """

    def __init__(self, filename: str = FILENAME, every_n_steps: Optional[int] = None) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"MetricLog every_n_steps must be >= 1, got {every_n_steps}")
        self.filename = filename
        self.every_n_steps = every_n_steps
        self.path: Optional[Path] = None
        self._pending: Optional[dict] = None
        self._validated = False
        self._images = 0
        self._t0 = self._window_t0 = 0.0
        self._last_step = -1

    # ------------------------------------------------------------------ writing
    def _write(self, row: dict) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero:
            self.path = Path(trainer.default_root_dir) / self.filename

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._window_t0 = time.monotonic()
        self._images = 0
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._images += batch_size_of(batch)
        step = trainer.global_step
        every = self.every_n_steps or trainer.log_every_n_steps or 50
        if self.path is None or step == self._last_step or step % every:
            return  # not rank zero, no optimizer step in this batch (accumulation), or not due
        self._last_step = step
        now = time.monotonic()
        row: dict[str, Any] = {"kind": "step", "step": step, "epoch": trainer.current_epoch,
                               "time_s": round(now - self._t0, 3)}
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and (v := _scalar(loss.detach() if hasattr(loss, "detach") else loss)) is not None:
            row["train/loss"] = v
        groups = [g for opt in trainer.optimizers for g in opt.param_groups]
        for i, g in enumerate(groups):
            row[f"lr/{g.get('name') or f'pg{i}'}"] = float(g["lr"])
        dt = now - self._window_t0
        if dt > 0 and self._images:
            row["throughput/img_per_s"] = round(self._images * trainer.world_size / dt, 2)
        self._images, self._window_t0 = 0, now
        self._write(row)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # the row is written at the next epoch's start or at the fit's end: callbacks later in
        # the list (the fit diagnosis) log their epoch scalars after this hook
        self._flush(trainer)
        row: dict[str, Any] = {"kind": "epoch", "epoch": trainer.current_epoch, "step": trainer.global_step,
                               "time_s": round(time.monotonic() - self._t0, 3)}
        row.update(self._epoch_scalars(trainer))
        self._pending = row
        self._validated = False

    def _epoch_scalars(self, trainer) -> dict[str, float]:
        out = {}
        for k, v in trainer.callback_metrics.items():
            if k.endswith("_step") or (not self._validated and (k.startswith("val") or k.startswith("diagnosis/"))):
                continue
            if (f := _scalar(v)) is not None:
                out[k] = f
        return out

    def _flush(self, trainer) -> None:
        row, self._pending = self._pending, None
        if row is None or self.path is None:
            return
        if any(k.startswith("val") for k in row):  # what the diagnosis logged after this callback's hook
            for k, v in trainer.callback_metrics.items():
                if k.startswith("diagnosis/") and k not in row and (f := _scalar(v)) is not None:
                    row[k] = f
        for cb in trainer.callbacks:
            history = getattr(cb, "history", None)
            if type(cb).__name__ == "FitDiagnosis" and isinstance(history, list) and history:
                last = history[-1]
                if isinstance(last, dict) and last.get("epoch") == row["epoch"]:
                    row["diagnosis"] = str(last.get("verdict", ""))
                    row["diagnosis_reason"] = str(last.get("reason", ""))
        self._write(row)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._flush(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._flush(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._flush(trainer)


# ---------------------------------------------------------------------- reading
def _dedupe(rows: list[dict], key: str) -> list[dict]:
    last: dict[Any, dict] = {}
    for r in rows:
        if key in r:
            last[r[key]] = r  # a resumed run repeats steps after its checkpoint: the newest wins
    return [last[k] for k in sorted(last)]


def read_metric_log(run_dir: str | Path) -> tuple[list[dict], list[dict], Optional[Path]]:
    """(step rows, epoch rows, the file read) of a run: its ``metrics.jsonl``, else a CSVLogger's
    ``metrics.csv`` (``csv/metrics.csv``), else nothing."""
    run_dir = Path(run_dir)
    path = run_dir / FILENAME
    if path.is_file():
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        return (_dedupe([r for r in rows if r.get("kind") == "step"], "step"),
                _dedupe([r for r in rows if r.get("kind") == "epoch"], "epoch"), path)
    for path in sorted(run_dir.glob("*/metrics.csv")):
        return (*_from_csv(path), path)
    return [], [], None


def _from_csv(path: Path) -> tuple[list[dict], list[dict]]:
    """Lightning's CSVLogger: one row per logged step, blanks elsewhere."""
    steps: dict[int, dict] = {}
    epochs: dict[int, dict] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            vals = {k: _scalar(v) for k, v in r.items() if v not in ("", None)}
            vals = {k: v for k, v in vals.items() if v is not None}
            step, epoch = int(vals.get("step", 0)), vals.get("epoch")
            if "train/loss_step" in vals:
                s = steps.setdefault(step, {"kind": "step", "step": step})
                s["train/loss"] = vals["train/loss_step"]
                if epoch is not None:
                    s["epoch"] = int(epoch)
            for k, v in vals.items():  # LearningRateMonitor: lr/<group name> (the zoo's names) or lr-<optimizer>
                if k.startswith(("lr/", "lr-")):
                    steps.setdefault(step, {"kind": "step", "step": step})["lr/" + k[3:]] = v
            if "train/samples_per_sec" in vals:
                steps.setdefault(step, {"kind": "step", "step": step})["throughput/img_per_s"] = vals["train/samples_per_sec"]
            epoch_keys = {k: v for k, v in vals.items()
                          if k.startswith(("val", "diagnosis/")) or k in ("train/loss_epoch", "train/acc1")}
            if epoch_keys and epoch is not None:
                epochs.setdefault(int(epoch), {"kind": "epoch", "epoch": int(epoch)}).update(epoch_keys, step=step)
    return [steps[k] for k in sorted(steps)], [epochs[k] for k in sorted(epochs)]
