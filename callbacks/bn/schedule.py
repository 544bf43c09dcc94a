"""When BNStatsCheck runs and on how many images: its overhead budget.

A count, not a timing: the cost of one check is counted in forward passes against a train
epoch's, so every rank and every rerun of a seed decides the same.
"""

from __future__ import annotations

import math
from typing import Optional

from .._batches import world_size
from .checks import HELDOUT_SIZE

# BNStatsCheck's default overhead budget: the goal of issue #7 (<= 2% of an epoch)
MAX_OVERHEAD = 0.02
# Costs in eval forward passes, for BNStatsCheck's schedule. Training one image (forward +
# backward + step): about 3 (Kaplan et al. 2020: 6N vs 2N FLOPs); per-image costs measured by
# benchmarks/bn_overhead.py (docs/benchmarks.md, "BN check overhead") give 3-5 for training
# and 2-3 for the estimator's forward (BN in train mode, a hook computing fp32 mean/var at
# every BN input), depending on the model, the device and the precision. 3 and 3: the training
# side at its smallest, the estimator near its largest, so the schedule errs towards checking
# less often.
TRAIN_COST_IN_FORWARDS = 3.0
ESTIMATOR_COST_IN_FORWARDS = 3.0


def min_samples(mean_tol: float) -> int:
    """The fewest images a shrunken check uses (train and val each): (4 / mean_tol)^2, 256 at
    the default 0.25. The population mean of a channel estimated from N images has a
    standard error of at most sigma / sqrt(N) (per-image means vary by at most sigma), here
    a quarter of the staleness tolerance; a val-accuracy change of ``acc_tol`` (0.05) is
    then 13 images or more."""
    return math.ceil((4.0 / mean_tol) ** 2)


def check_cost(samples: tuple[int, int], train_images: int, val_images: int) -> float:
    """Forward passes of one check per rank (``ESTIMATOR_COST_IN_FORWARDS`` per estimator
    image, 1 per val image), as a fraction of one train epoch's compute
    (``TRAIN_COST_IN_FORWARDS`` per train image). ``samples``: (train, val) images, all
    ranks together; ``train_images``, ``val_images``: one epoch's, per rank."""
    ws = world_size()
    k_train, k_val = samples
    train = ESTIMATOR_COST_IN_FORWARDS * min(math.ceil(k_train / ws), train_images)
    val = min(math.ceil(k_val / ws), val_images)
    held = 2 * min(HELDOUT_SIZE, val_images)
    return (train + 2 * val + held) / max(TRAIN_COST_IN_FORWARDS * train_images, 1.0)


def shrink(budget: float, full: tuple[int, int], train_images: int, val_images: int, floor: int) -> tuple[int, int]:
    """(train, val) images, all ranks, for one check costing at most ``budget`` train epochs:
    both of ``full`` scaled by one factor, each at least ``floor`` (or all there are)."""
    ws = world_size()
    full_train = min(full[0], train_images * ws)
    full_val = min(full[1], val_images * ws)
    fixed = check_cost((0, 0), train_images, val_images)  # the held-out batch
    scale = max(0.0, budget - fixed) / max(check_cost((full_train, full_val), train_images, val_images) - fixed, 1e-12)

    def scaled(n: int) -> int:
        return min(n, max(floor, math.floor(n * min(scale, 1.0))))

    return scaled(full_train), scaled(full_val)


def plan(
    full: tuple[int, int], train_images: int, val_images: int, max_overhead: float, floor: int,
    max_epochs: Optional[int],
) -> tuple[int, Optional[tuple[int, int]], str]:
    """The period in epochs that keeps the checks within ``max_overhead`` of the training
    compute; for a fit shorter than that period, the (train, val) images of its one check;
    and the line that tells the user."""
    cost = check_cost(full, train_images, val_images)
    every = max(1, math.ceil(cost / max_overhead - 1e-9))
    epochs = max_epochs if max_epochs and max_epochs > 0 else None
    short = None
    if epochs is not None and epochs < every:
        short = shrink(max_overhead * epochs, full, train_images, val_images, floor)
        k_train, k_val = short
        share = check_cost(short, train_images, val_images) / epochs
        how = (f"this fit has {epochs} epoch(s): one check at its end, on {k_train} train and {k_val} val "
               f"images (at least {floor} each), ~{100 * share:.3g}% of the fit "
               f"(every_n_epochs to choose)")
    else:
        how = (f"it runs every {every} epoch(s), the last epoch included, to stay within "
               f"{100 * max_overhead:g}% (every_n_epochs to choose)")
    return every, short, (f"BNStatsCheck: one check costs {100 * cost:.3g}% of a train epoch here "
                          f"(forward passes counted); {how}")


def due(epoch: int, every: int, max_epochs: Optional[int]) -> bool:
    """Every ``every`` epochs, counted back from the last one so that the final model is checked."""
    last = max_epochs - 1 if max_epochs and max_epochs > 0 else None
    if last is None:
        return (epoch + 1) % every == 0
    return (last - epoch) % every == 0
