"""The process of one trial: ``zoo fit`` with a callback that records the metric's history
and writes the trial's result file, which the sweep reads back (:mod:`launch.sweep.trial`)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L

from callbacks.preemption import Preempted
from datamodules.imagenet import ImageNetDataModule
from launch.errors import requeue, user_errors
from launch.zoo_cli import ZooCLI
from zoo.base import ImageClassifier

from .trial import PREEMPTED_EXIT


class TrialTracker(L.Callback):
    """Records ``metric`` after each validation; at the end of the fit, rank zero writes the
    best (by ``direction``) and last values to ``result`` (JSON, atomically)."""

    def __init__(self, result: Path, metric: str, direction: str) -> None:
        self.result, self.metric, self.direction = result, metric, direction
        self.history: list[float] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and self.metric in trainer.callback_metrics:
            self.history.append(float(trainer.callback_metrics[self.metric]))

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        h = self.history
        pick = max if self.direction == "maximize" else min
        best = pick(h) if h else None
        out = {"completed": not trainer.interrupted and bool(h), "best": best, "last": h[-1] if h else None,
               "best_epoch": h.index(best) if h else None, "history": h, "metric": self.metric}
        self.result.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.result.with_suffix(".tmp")
        tmp.write_text(json.dumps(out))
        tmp.replace(self.result)


class TrialCLI(ZooCLI):
    """:class:`~launch.zoo_cli.ZooCLI` with a :class:`TrialTracker` first among the callbacks."""

    def __init__(self, tracker: TrialTracker, *args, **kwargs) -> None:
        self.tracker = tracker
        super().__init__(*args, **kwargs)

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.insert(0, self.tracker)
        return trainer


def train_main(argv: list[str]) -> int:
    """`python -m launch.sweep _train RESULT METRIC DIRECTION -- <zoo fit args>` (one trial)."""
    result, metric, direction = Path(argv[0]), argv[1], argv[2]
    fit_args = argv[argv.index("--") + 1:]
    tracker = TrialTracker(result, metric, direction)
    try:
        TrialCLI(tracker, ImageClassifier, ImageNetDataModule, args=fit_args, save_config_kwargs={"overwrite": True},
                 parser_kwargs={"parser_mode": "yaml"})
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as stop:  # every rank: saved at one step; rank 0 requeues the job
        return requeue(stop) or PREEMPTED_EXIT
    return 0


def train_in_process(argv: list[str], env: dict[str, str]) -> int:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # launch.run_dir.run_id() reads ZOO_RUN_ID first
    try:
        return train_main(argv)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - one trial's crash fails that trial, not the sweep
        print(f"trial failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
