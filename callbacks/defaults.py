"""The callbacks every `zoo fit` runs, declared as config sections ``run.callbacks.<name>``.

Each default is one section of the config, so ``zoo fit --print_config`` and the run's
``config.yaml`` show its class and every argument, and ``zoo fit --config RUN/config.yaml``
builds the same set::

    run:
      callbacks:
        best_checkpoint:                      # the best epoch by val/acc1
          class_path: callbacks.defaults.BestCheckpoint
          init_args: {monitor: val/acc1, save_top_k: 1, ...}
        dashboard: null                       # null: not added

``null`` removes one, ``--run.callbacks.<name>.<argument> VALUE`` (or ``init_args`` in a
recipe) configures it, and a ``class_path`` puts another class of the same kind in its place
(e.g. a different progress bar). A recipe's ``trainer.callbacks`` (WeightEMA,
ProgressiveResize) adds to these: they are separate sections, so neither replaces the other.

What stays computed in code (:func:`select`), because a config file cannot know it:

- a checkpoint section with ``dirpath: null`` writes to ``RUN/checkpoints`` (the run directory
  is named after the run id, made at start);
- a section is used only by the subcommands in its ``stages`` (checkpoints are fit's);
- the LR monitor and the throughput monitor log through the logger: not added without one;
- BNBufferSync is not added with ``trainer.sync_batchnorm`` (the buffers are already equal);
- the progress bar and model summary follow ``trainer.enable_progress_bar`` and
  ``trainer.enable_model_summary``;
- a callback of the section's kind in ``trainer.callbacks`` (a recipe's own ModelCheckpoint,
  progress bar, SlurmRequeue or MetricLog) takes the default's place, and a line says so.

Why the sections are plain jsonargparse subclass arguments rather than LightningCLI's
``add_lightning_class_args`` (its "forced callbacks"): LightningCLI appends every such
section to the trainer as it is, a ``None`` included, for every subcommand; the rules above
need to choose.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ThroughputMonitor

from callbacks._batches import batch_size_of

log = logging.getLogger(__name__)

PREFIX = "run.callbacks"  # the config key of the sections


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint of the best epoch by ``monitor`` (``mode`` max: an accuracy).

    ``filename`` null names the file after the monitored metric, without the "/" that a metric
    name has (``epoch=007-val_acc1=0.8125.ckpt``), so a recipe that monitors ``val_ema/acc1``
    changes one key. Every other argument is ModelCheckpoint's.
    """

    def __init__(self, monitor: Optional[str] = "val/acc1", mode: str = "max", filename: Optional[str] = None,
                 auto_insert_metric_name: bool = False, every_n_epochs: Optional[int] = 1, **kwargs: Any) -> None:
        if filename is None and monitor:
            filename = f"epoch={{epoch:03d}}-{monitor.replace('/', '_')}={{{monitor}:.4f}}"
        super().__init__(monitor=monitor, mode=mode, filename=filename, auto_insert_metric_name=auto_insert_metric_name,
                         every_n_epochs=every_n_epochs, **kwargs)


class ImageThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor counting the images of an (images, labels) batch.

    Lightning's takes the batch size as a function (``batch_size_fn``), which a YAML config
    cannot hold; this one fixes it to :func:`callbacks._batches.batch_size_of`.
    ``window_size``: batches per throughput figure; Lightning's default is 100, 50 gives a
    first figure sooner on short runs such as the demo.
    """

    def __init__(self, window_size: int = 50, separator: str = "/") -> None:
        if window_size < 2:  # Lightning's Throughput needs two points for a rate
            raise ValueError(f"ImageThroughputMonitor: window_size={window_size} must be >= 2")
        super().__init__(batch_size_fn=batch_size_of, window_size=window_size, separator=separator)


@dataclass(frozen=True)
class Default:
    """One default callback: its section ``run.callbacks.<key>`` and when it is used."""

    key: str
    kind: str  # the section takes this class or a subclass; one of this kind in trainer.callbacks replaces it
    class_path: str
    init_args: dict = field(default_factory=dict)
    stages: frozenset = frozenset({"fit"})
    needs_logger: bool = False
    help: str = ""


ALL_STAGES = frozenset({"fit", "validate", "test", "predict"})

# In the order they join the trainer (Lightning moves checkpoints to the end of its list itself).
DEFAULTS: tuple[Default, ...] = (
    Default("best_checkpoint", "lightning.pytorch.callbacks.ModelCheckpoint", "callbacks.defaults.BestCheckpoint",
            {"monitor": "val/acc1", "every_n_epochs": 1},
            help="the best epoch by `monitor` (val_ema/acc1 with callbacks.ema.WeightEMA); dirpath null: RUN/checkpoints"),
    # The newest epoch, to resume from. Not save_last=True on the best checkpoint: Lightning 2.6
    # writes last.ckpt only when the monitored checkpoint is saved, i.e. on improvement. No version
    # counter: after a resume (requeue, --ckpt_path) last.ckpt is overwritten instead of a
    # last-v1.ckpt appearing beside a stale last.ckpt.
    Default("last_checkpoint", "lightning.pytorch.callbacks.ModelCheckpoint", "lightning.pytorch.callbacks.ModelCheckpoint",
            {"filename": "last", "every_n_epochs": 1, "enable_version_counter": False},
            help="last.ckpt, the newest epoch, to resume from; dirpath null: RUN/checkpoints"),
    Default("fit_diagnosis", "callbacks.fit_diagnosis.FitDiagnosis", "callbacks.fit_diagnosis.FitDiagnosis",
            help="under/overfitting, stuck or diverging, from the logged metrics"),
    Default("nonfinite_loss", "callbacks.nonfinite.NonFiniteLossCheck", "callbacks.nonfinite.NonFiniteLossCheck",
            help="stop a fit whose training loss became NaN/inf, naming the step, its LR and the first bad layer"),
    # Slurm's SIGUSR1: all ranks save at one agreed step, then main() requeues (no save inside
    # Lightning's signal handler, which can deadlock DDP); a no-op outside Slurm
    Default("slurm_requeue", "callbacks.preemption.SlurmRequeue", "callbacks.preemption.SlurmRequeue",
            help="Slurm's warning signal: all ranks save at one step, then the job is requeued"),
    Default("run_report", "callbacks.metric_log.MetricLog", "callbacks.run_report.RunReport",
            help="RUN/metrics.jsonl whatever the logger; RUN/report/ at the end of fit"),
    Default("lr_monitor", "lightning.pytorch.callbacks.LearningRateMonitor", "lightning.pytorch.callbacks.LearningRateMonitor",
            {"logging_interval": "step"}, needs_logger=True, help="the learning rate of every step (needs a logger)"),
    Default("dashboard", "callbacks.dashboard.Dashboard", "callbacks.dashboard.Dashboard",
            help="augmented-image grid, confusion matrix, confident mistakes: RUN/plots (the run report's), and the logger"),
    Default("throughput", "lightning.pytorch.callbacks.ThroughputMonitor", "callbacks.defaults.ImageThroughputMonitor",
            {"window_size": 50}, needs_logger=True, help="images/s and MFU (needs a logger)"),
    # DDP without SyncBN: average BN buffers across ranks before validation and saving (timm's
    # --dist-bn reduce default); a no-op on one process
    Default("bn_buffer_sync", "callbacks.bn.BNBufferSync", "callbacks.bn.BNBufferSync",
            help="DDP: BN buffers averaged across ranks before validation and saving (not with sync_batchnorm)"),
    Default("model_summary", "lightning.pytorch.callbacks.ModelSummary", "callbacks.model_summary.ModelSummary",
            stages=ALL_STAGES, help="the layer table at start (Lightning's, without an uncounted FLOPs total)"),
    Default("progress_bar", "lightning.pytorch.callbacks.ProgressBar", "callbacks.progress.ThrottledProgressBar",
            stages=ALL_STAGES, help="Lightning's TQDM bar redrawn at most every 0.1 s"),
)
BY_KEY = {d.key: d for d in DEFAULTS}


def import_class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def add_arguments(parser) -> None:
    """One section per default (``run.callbacks.<key>``) with its class and arguments as default."""
    for d in DEFAULTS:
        parser.add_subclass_arguments(import_class(d.kind), f"{PREFIX}.{d.key}", required=False, fail_untyped=False,
                                      help=f"{d.help}{'' if d.stages == ALL_STAGES else ' (fit only)'}; null: not added")
        parser.set_defaults({f"{PREFIX}.{d.key}": {"class_path": d.class_path, "init_args": dict(d.init_args)}})


def _kind_in(callbacks: Iterable[Callback], d: Default) -> Optional[Callback]:
    kind = import_class(d.kind)
    return next((c for c in callbacks if isinstance(c, kind)), None)


def select(
    instances: dict[str, Optional[Callback]],
    stage: str,
    *,
    has_logger: bool,
    trainer_callbacks: Sequence[Callback] = (),
    sync_batchnorm: bool = False,
    enable_progress_bar: bool = True,
    enable_model_summary: bool = True,
    run_dir: Optional[Path] = None,
) -> list[Callback]:
    """The default callbacks that join the trainer, from the sections' instances (key -> callback
    or None), by the rules in the module docstring; checkpoints get ``run_dir/checkpoints``."""
    chosen, replaced = [], {}
    for d in DEFAULTS:
        cb = instances.get(d.key)
        if cb is None or stage not in d.stages or (d.needs_logger and not has_logger):
            continue
        if d.key == "bn_buffer_sync" and sync_batchnorm:
            continue
        if (d.key == "progress_bar" and not enable_progress_bar) or (d.key == "model_summary" and not enable_model_summary):
            continue
        own = _kind_in(trainer_callbacks, d)
        if own is not None:
            replaced.setdefault(type(own).__name__, []).append(d.key)
            continue
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is None and run_dir is not None:
            # what ModelCheckpoint(dirpath=...) stores; Lightning sets the same attribute in setup()
            cb.dirpath = os.path.realpath(Path(run_dir) / "checkpoints")
        chosen.append(cb)
    for name, keys in replaced.items():
        log.info("trainer.callbacks has a %s: it replaces %s", name, ", ".join(f"{PREFIX}.{k}" for k in keys))
    return chosen


def default_callbacks(stage: str = "fit", *, has_logger: bool = True, exclude: Sequence[str] = (),
                      init_args: Optional[dict[str, dict]] = None, **rules: Any) -> list[Callback]:
    """The callbacks `zoo fit` adds with no section configured, built outside the CLI (benchmarks).

    ``exclude``: section keys to leave out; ``init_args``: key -> arguments over the defaults;
    ``rules``: :func:`select`'s keyword arguments (``sync_batchnorm``, ``run_dir``, ...).
    """
    unknown = (set(exclude) | set(init_args or {})) - set(BY_KEY)
    if unknown:
        raise ValueError(f"unknown default callback(s) {sorted(unknown)}: choose from {', '.join(BY_KEY)}")
    instances = {
        d.key: import_class(d.class_path)(**{**d.init_args, **(init_args or {}).get(d.key, {})})
        for d in DEFAULTS if d.key not in exclude
    }
    return select(instances, stage, has_logger=has_logger, **rules)
