"""What the BN callbacks share: the trainer's data, the EMA callback, their one-line messages."""

from __future__ import annotations

import logging
import math

from lightning.pytorch.utilities import rank_zero_only

from .._batches import iterate, train_loader, world_size


def find_ema(trainer):
    """The trainer's :class:`~callbacks.ema.WeightEMA`, or None."""
    from ..ema import WeightEMA

    return next((c for c in trainer.callbacks if isinstance(c, WeightEMA)), None)


def train_inputs(trainer, pl_module, num_samples: int):
    """Up to ``num_samples`` / world size training images of this rank, batch by batch, on the
    module's device; None without a train loader."""
    loader = train_loader(trainer)
    if loader is None:
        return None
    return (x for x, _ in iterate(loader, pl_module, max_samples=math.ceil(num_samples / world_size())))


def extra_pass_allowed(trainer) -> bool:
    """Whether a pass over the train loader may run now."""
    # Mid-epoch validation (val_check_interval < 1): restarting the train loader would reset
    # the running epoch's iterator (persistent workers, FFCV). At the end of an epoch it is done.
    if trainer.sanity_checking:
        return False
    if trainer.state.fn != "fit":
        return True
    done = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # batches of this epoch so far
    return bool(trainer.is_last_batch or done >= trainer.num_training_batches)


log = logging.getLogger("callbacks.bn")


def say(msg: str) -> None:
    """One line on the ``callbacks.bn`` logger, from rank 0."""
    rank_zero_only(log.info)(msg)


class SayOnce:
    """A message per key, once per callback."""

    def __init__(self) -> None:
        self._said: set[str] = set()

    def __call__(self, key: str, msg: str) -> None:
        if key not in self._said:
            self._said.add(key)
            say(msg)
