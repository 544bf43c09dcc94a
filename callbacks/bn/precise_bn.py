"""PreciseBN: recompute BN population statistics before each validation (Wu & Johnson 2021,
"Rethinking 'Batch' in BatchNorm"; pycls/fvcore ``update_bn_stats``)."""

from __future__ import annotations

import contextlib
from typing import Optional

import lightning as L
import torch

from .._batches import precision_context
from .common import SayOnce, extra_pass_allowed, find_ema, train_inputs
from .population import NUM_SAMPLES_PRECISE, apply_population_stats, bn_layers, estimate_population_stats


class PreciseBN(L.Callback):
    """Recompute BN population statistics on ``num_samples`` training images (all ranks
    together) before each validation, on the model and on the WeightEMA weights.

    Args:
        num_samples: pycls NUM_SAMPLES_PRECISE = 8192.
        on_ema: also recompute the statistics of the EMA weights (a second pass).
    """

    def __init__(self, num_samples: int = NUM_SAMPLES_PRECISE, on_ema: bool = True) -> None:
        if num_samples < 1:
            raise ValueError(f"PreciseBN num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.on_ema = on_ema
        self._once = SayOnce()

    @torch.no_grad()
    def recompute(self, trainer, pl_module) -> Optional[int]:
        net = pl_module.net
        if not bn_layers(net):
            self._once("nobn", "PreciseBN: the model has no BatchNorm layers with running statistics; nothing to do")
            return None
        targets = [contextlib.nullcontext()]
        ema = find_ema(trainer) if self.on_ema else None
        if ema is not None and ema.ema is not None:
            targets.append(ema.swapped(pl_module))
        used = None
        for ctx in targets:
            inputs = train_inputs(trainer, pl_module, self.num_samples)
            if inputs is None:
                self._once("nodata", "PreciseBN: no training data in this stage; statistics left as they are")
                return None
            with ctx, precision_context(trainer):
                stats, used = estimate_population_stats(net, inputs, self.num_samples)
                apply_population_stats(net, stats)
        if used is not None and used < self.num_samples:
            self._once("few", f"PreciseBN: the train data gave {used} samples < {self.num_samples} requested; "
                              "estimated from all of them")
        return used

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if extra_pass_allowed(trainer):
            self.recompute(trainer, pl_module)
        else:
            self._once("mid", "PreciseBN: validation in the middle of an epoch: statistics recomputed only at epoch ends")
