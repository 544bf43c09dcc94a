"""Batch-norm statistics: a population estimator, checks, precise BN, cross-rank reduction.

In eval mode a BN layer normalises with the exponential moving average of the batch
statistics it saw in training. When that average is stale (the weights moved faster than the
average), ranks disagree, or variances collapse, accuracy drops silently. Three callbacks:

- :class:`~callbacks.bn.stats_check.BNStatsCheck`: five checks after each validation
  (:mod:`callbacks.bn.checks`), scheduled within an overhead budget
  (:mod:`callbacks.bn.schedule`), a per-layer table (:mod:`callbacks.bn.table`).
- :class:`~callbacks.bn.precise_bn.PreciseBN`: recompute population statistics before each
  validation, on the model and on the :class:`~callbacks.ema.WeightEMA` weights.
- :class:`~callbacks.bn.buffer_sync.BNBufferSync`: average BN buffers across DDP ranks.

:mod:`callbacks.bn.population` holds the estimator and the cross-rank reduction they share.
"""

from .buffer_sync import BNBufferSync
from .population import (
    NUM_SAMPLES_PRECISE,
    apply_population_stats,
    bn_layers,
    bn_train_mode,
    estimate_population_stats,
    rank_max_diff,
    reduce_bn_buffers,
    using_stats,
)
from .precise_bn import PreciseBN
from .stats_check import BNStatsCheck, BNStatsError

__all__ = [
    "BNBufferSync", "BNStatsCheck", "BNStatsError", "NUM_SAMPLES_PRECISE", "PreciseBN", "apply_population_stats",
    "bn_layers", "bn_train_mode", "estimate_population_stats", "rank_max_diff", "reduce_bn_buffers", "using_stats",
]
