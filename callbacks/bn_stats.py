"""Batch-norm statistics: a population estimator, checks, precise BN, cross-rank reduction.

In eval mode a BN layer normalises with the exponential moving average of the batch
statistics it saw in training. When that average is stale (the weights moved faster than the
average), ranks disagree, or variances collapse, accuracy drops silently. Three callbacks:

- :class:`BNStatsCheck`: five checks after each validation (NaN/Inf and never-updated buffers,
  collapsed variances, running vs population statistics with the val accuracy of each,
  train/eval gap on a held-out batch, cross-rank buffer differences).
- :class:`PreciseBN`: recompute population statistics before each validation (Wu & Johnson
  2021, "Rethinking 'Batch' in BatchNorm"; pycls/fvcore ``update_bn_stats``), on the model and
  on the :class:`~callbacks.ema.WeightEMA` weights.
- :class:`BNBufferSync`: under DDP without SyncBN every rank's buffers drift apart; average them
  across ranks before validation, at the end of each train epoch and before saving (timm
  ``distribute_bn(..., reduce=True)``, its train.py default ``--dist-bn reduce``). The
  alternative is Lightning's SyncBN, ``--trainer.sync_batchnorm true``, which synchronises
  batch statistics at every training forward (one all-reduce per BN layer per step).

The estimator is written here (fvcore is not a dependency of this project and torch has only
``torch.optim.swa_utils.update_bn``, which uses a cumulative moving average of per-batch
*unbiased* variances, equal-weighted per batch, and no cross-rank reduction). It hooks each BN
layer's input with the BN layers in train mode (every later layer sees batch-normalised
activations, as in training) and everything else in eval mode (dropout and drop-path off),
and combines per-batch means and biased variances with Chan et al.'s parallel formula,
weighted by the number of values: pop_mean = E[x], pop_var = E[x^2] - pop_mean^2 with no
Bessel correction (as fvcore undoes it), then across ranks the same way.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._batches import all_reduce, as_list, batch_size_of, distributed, iterate, precision_context, train_loader, world_size

# pycls config NUM_SAMPLES_PRECISE = 8192 (pycls/core/config.py, "Rethinking 'Batch' in BatchNorm")
NUM_SAMPLES_PRECISE = 8192
HELDOUT_SIZE = 64  # images in check 4's held-out batch (a common per-GPU batch size)
HELDOUT_PER_BATCH = 8
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


def bn_layers(net: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """BatchNorm layers that keep running statistics, by qualified name."""
    return [
        (n, m) for n, m in net.named_modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


@contextlib.contextmanager
def bn_train_mode(net: nn.Module):
    """BN layers in train mode (batch statistics), everything else in eval mode; the modes and
    the BN buffers are restored afterwards (the forward passes leave no trace)."""
    modes = {m: m.training for m in net.modules()}
    layers = bn_layers(net)
    saved = {n: (m.running_mean.clone(), m.running_var.clone(),
                 None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for n, m in layers}
    net.eval()
    for _, m in layers:
        m.train()
    try:
        yield layers
    finally:
        for m, mode in modes.items():
            m.training = mode
        for n, m in layers:
            mean, var, nbt = saved[n]
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt)


def _combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al. (1979) parallel update of (count, mean, sum of squared deviations)."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / n)
    return n, mean, m2


@torch.no_grad()
def estimate_population_stats(
    net: nn.Module, inputs: Iterable[torch.Tensor], num_samples: int = NUM_SAMPLES_PRECISE, reduce_ranks: bool = True
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """Population mean and (biased) variance of every BN layer's input.

    Runs ``net`` on ``inputs`` until ``num_samples`` images (per rank: ``num_samples`` / world
    size) have been seen. Returns ``({layer: (mean, var)}, images used over all ranks)``.
    ``reduce_ranks``: combine the statistics of all DDP ranks (every rank must call).
    """
    layers = bn_layers(net)
    acc: dict[str, list] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().float()
            dims = [0] + list(range(2, x.ndim))
            n_b = float(x.numel() // x.shape[1])
            var_b, mean_b = torch.var_mean(x, dim=dims, correction=0)
            if name in acc:
                acc[name] = list(_combine(*acc[name], n_b, mean_b, var_b * n_b))
            else:
                acc[name] = [n_b, mean_b, var_b * n_b]
        return fn

    per_rank = math.ceil(num_samples / world_size()) if reduce_ranks else num_samples
    seen = 0
    with bn_train_mode(net):
        handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
        try:
            for x in inputs:
                net(x)
                seen += x.shape[0]
                if seen >= per_rank:
                    break
        finally:
            for h in handles:
                h.remove()
    total = torch.tensor([float(seen)], device=next(net.parameters()).device)
    if reduce_ranks:
        all_reduce(total, "sum")
    out = {}
    if not layers:
        return out, int(total.item())
    if reduce_ranks and distributed():
        # two all-reduces over one flat tensor each: global mean, then sum of squared deviations
        names = [n for n, _ in layers]
        for n, m in layers:  # a rank that saw nothing contributes zeros
            acc.setdefault(n, [0.0, torch.zeros_like(m.running_mean, dtype=torch.float32),
                               torch.zeros_like(m.running_var, dtype=torch.float32)])
        counts = torch.tensor([acc[n][0] for n in names], device=total.device, dtype=torch.float32)
        sums = torch.cat([acc[n][1] * acc[n][0] for n in names])
        g_counts = all_reduce(counts.clone(), "sum")
        g_sums = all_reduce(sums.clone(), "sum")
        offs, m2s = 0, []
        g_means = {}
        for i, n in enumerate(names):
            c = acc[n][1].numel()
            g_means[n] = g_sums[offs:offs + c] / g_counts[i].clamp_min(1)
            d = acc[n][1] - g_means[n]
            m2s.append(acc[n][2] + acc[n][0] * d * d)
            offs += c
        g_m2 = all_reduce(torch.cat(m2s), "sum")
        offs = 0
        for i, n in enumerate(names):
            c = acc[n][1].numel()
            out[n] = (g_means[n], g_m2[offs:offs + c] / g_counts[i].clamp_min(1))
            offs += c
    else:
        for n, (cnt, mean, m2) in acc.items():
            out[n] = (mean, m2 / max(cnt, 1.0))
    return out, int(total.item())


@torch.no_grad()
def apply_population_stats(net: nn.Module, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    for n, m in bn_layers(net):
        if n in stats:
            mean, var = stats[n]
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)


@contextlib.contextmanager
def using_stats(net: nn.Module, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """The given statistics in the BN buffers inside the block, the old ones after."""
    layers = bn_layers(net)
    saved = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in layers}
    apply_population_stats(net, stats)
    try:
        yield
    finally:
        apply_population_stats(net, saved)


@torch.no_grad()
def rank_max_diff(net: nn.Module) -> dict[str, float]:
    """Per BN layer, the largest |difference| of its running mean/var between any two ranks."""
    layers = bn_layers(net)
    if not layers or not distributed():
        return {n: 0.0 for n, _ in layers}
    flat = torch.cat([torch.cat([m.running_mean.float(), m.running_var.float()]) for _, m in layers])
    hi, lo = all_reduce(flat.clone(), "max"), all_reduce(flat.clone(), "min")
    diff, out, offs = hi - lo, {}, 0
    for n, m in layers:
        c = 2 * m.running_mean.numel()
        out[n] = float(diff[offs:offs + c].max())
        offs += c
    return out


@torch.no_grad()
def reduce_bn_buffers(tensors: list[torch.Tensor], op: Literal["mean", "broadcast"] = "mean") -> None:
    """Average (timm 'reduce') or broadcast from rank 0 (timm 'broadcast') in place, one
    collective over one flat tensor."""
    if not tensors or not distributed():
        return
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors])
    if op == "mean":
        all_reduce(flat, "sum")
        flat /= world_size()
    else:
        torch.distributed.broadcast(flat, src=0)
    offs = 0
    for t in tensors:
        t.copy_(flat[offs:offs + t.numel()].view_as(t))
        offs += t.numel()


def _find_ema(trainer):
    from .ema import WeightEMA

    return next((c for c in trainer.callbacks if isinstance(c, WeightEMA)), None)


def _train_inputs(trainer, pl_module, num_samples: int):
    loader = train_loader(trainer)
    if loader is None:
        return None
    return (x for x, _ in iterate(loader, pl_module, max_samples=math.ceil(num_samples / world_size())))


def _extra_pass_allowed(trainer) -> bool:
    # Mid-epoch validation (val_check_interval < 1): restarting the train loader would reset
    # the running epoch's iterator (persistent workers, FFCV). At the end of an epoch it is done.
    if trainer.sanity_checking:
        return False
    if trainer.state.fn != "fit":
        return True
    done = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # batches of this epoch so far
    return bool(trainer.is_last_batch or done >= trainer.num_training_batches)


def _say(msg: str) -> None:
    rank_zero_only(print)(msg, flush=True)


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
        self._said: set[str] = set()

    def _once(self, key: str, msg: str) -> None:
        if key not in self._said:
            self._said.add(key)
            _say(msg)

    @torch.no_grad()
    def recompute(self, trainer, pl_module) -> Optional[int]:
        net = pl_module.net
        if not bn_layers(net):
            self._once("nobn", "PreciseBN: the model has no BatchNorm layers with running statistics; nothing to do")
            return None
        targets = [contextlib.nullcontext()]
        ema = _find_ema(trainer) if self.on_ema else None
        if ema is not None and ema.ema is not None:
            targets.append(ema.swapped(pl_module))
        used = None
        for ctx in targets:
            inputs = _train_inputs(trainer, pl_module, self.num_samples)
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
        if _extra_pass_allowed(trainer):
            self.recompute(trainer, pl_module)
        else:
            self._once("mid", "PreciseBN: validation in the middle of an epoch: statistics recomputed only at epoch ends")


class BNBufferSync(L.Callback):
    """Average BN running statistics across DDP ranks (timm ``distribute_bn`` 'reduce').

    Before validation and at the end of each train epoch (so before every epoch-end checkpoint;
    see the note at the end of the class); also the BN entries of the WeightEMA weights. No-op
    on one process.
    Logs ``bn/rank_max_diff_before_sync`` (largest buffer difference it removed).

    Args:
        mode: ``mean`` (timm 'reduce') or ``broadcast`` (rank 0's buffers, timm 'broadcast').
    """

    def __init__(self, mode: Literal["mean", "broadcast"] = "mean") -> None:
        if mode not in ("mean", "broadcast"):
            raise ValueError(f"BNBufferSync mode must be 'mean' or 'broadcast', got {mode!r}")
        self.mode = mode
        self.last_diff = 0.0

    def _tensors(self, trainer, pl_module) -> tuple[list[torch.Tensor], list[str]]:
        tensors, names = [], []
        for n, m in bn_layers(pl_module):
            tensors += [m.running_mean, m.running_var]
            names += [f"{n}.running_mean", f"{n}.running_var"]
        ema = _find_ema(trainer)
        if ema is not None and ema.ema is not None:
            for n, _ in bn_layers(pl_module.net):
                for b in ("running_mean", "running_var"):
                    if f"{n}.{b}" in ema.ema:
                        tensors.append(ema.ema[f"{n}.{b}"])
        return tensors, names

    @torch.no_grad()
    def sync(self, trainer, pl_module) -> None:
        if not distributed():
            return
        diffs = rank_max_diff(pl_module.net)
        self.last_diff = max(diffs.values(), default=0.0)
        tensors, _ = self._tensors(trainer, pl_module)
        reduce_bn_buffers(tensors, self.mode)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.sync(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if distributed() and not trainer.sanity_checking:
            pl_module.log("bn/rank_max_diff_before_sync", self.last_diff, sync_dist=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.sync(trainer, pl_module)

    # No collective in on_save_checkpoint: Lightning also saves from its SIGUSR1 handler (Slurm
    # preemption), which runs on each rank wherever that rank happens to be; an all-reduce there
    # meets the other rank's gradient all-reduce and hangs. ModelCheckpoint saves after
    # on_validation_start or on_train_epoch_end, where the buffers were just reduced; a mid-epoch
    # (hpc) checkpoint holds rank 0's buffers, which the next validation reduces again.


class BNStatsError(RuntimeError):
    pass


class BNStatsCheck(L.Callback):
    """Five checks of every BatchNorm layer after each validation (or ``zoo validate``).

    1. NaN/Inf in running_mean/running_var; num_batches_tracked > 0.
    2. Variance collapse: channels with running_var < ``collapse_factor`` x eps.
    3. Running vs population statistics, re-estimated on ``num_samples`` training images
       (see :func:`estimate_population_stats`): per layer mean over channels of
       |mu_run - mu_pop| / sigma_pop and |log(var_run / var_pop)|; val accuracy on up to
       ``val_samples`` images with the running and with the recomputed statistics.
    4. Train/eval gap on one held-out batch (64 val images, a few from every val batch of
       check 3, so classes mix): accuracy and relative logit difference with batch
       statistics vs running statistics.
    5. Under DDP: the largest difference of each BN buffer across ranks.

    Summary scalars ``bn/*`` go to the logger each time; the per-layer table to a W&B table
    (``bn/layers``) with a WandbLogger, and to ``<run dir>/bn_stats/epoch=NNN.csv`` (for the run report). Each
    finding prints as one line naming the layer.

    Args:
        action: ``warn`` (print), ``recalibrate`` (on findings, apply the recomputed statistics,
            all-reduced across ranks, and log the accuracy before and after), ``fail`` (raise).
        mean_tol, logvar_tol: thresholds for check 3 (defaults: a mean off by 0.25 sigma, a
            variance off by a factor 1.5; this project's choice, no published standard).
        acc_tol: a val-accuracy loss of the running statistics against the recomputed ones
            (check 3) or of eval against train mode (check 4) above this is a finding.
        rank_tol: check 5 threshold on the absolute buffer difference.
        every_n_epochs: run after every n-th validation (epochs 0, n, 2n, ...). ``None`` (the
            default): chosen so that the checks cost at most ``max_overhead`` of the training
            compute. After the first train epoch the check counts, per rank, its own forward
            passes (3 x min(num_samples, train images) + 2 x min(val_samples, val images) + 2 x 64)
            against the epoch's (see ``check_cost``) and runs every n = ceil(ratio /
            max_overhead) epochs, counted back from the last epoch so that the final model is
            always checked. A fit shorter than n epochs is checked once, at its end, on fewer
            images: ``num_samples`` and ``val_samples`` scaled down so that the one check fits
            ``max_overhead`` of the fit, but not below ``min_samples`` each. On ImageNet
            (1.28 M train images, K = 8,192) n = 1; on the demo (2,944 train images, all of them
            one check at the full K) n = 57, so its 20-epoch fit gets one check on ~1,000 train
            and 256 val images. A count, not a timing: every rank and every rerun of a seed
            decides the same.
        max_overhead: the budget of ``every_n_epochs=None`` (issue #7's goal, 2%).
    """

    def __init__(
        self,
        num_samples: int = NUM_SAMPLES_PRECISE,
        val_samples: int = NUM_SAMPLES_PRECISE,
        action: Literal["warn", "recalibrate", "fail"] = "warn",
        collapse_factor: float = 10.0,
        mean_tol: float = 0.25,
        logvar_tol: float = math.log(1.5),
        acc_tol: float = 0.05,
        rank_tol: float = 1e-4,
        every_n_epochs: Optional[int] = None,
        max_overhead: float = MAX_OVERHEAD,
    ) -> None:
        if action not in ("warn", "recalibrate", "fail"):
            raise ValueError(f"BNStatsCheck action must be 'warn', 'recalibrate' or 'fail', got {action!r}")
        if num_samples < 1 or val_samples < 0 or (every_n_epochs is not None and every_n_epochs < 1):
            raise ValueError("BNStatsCheck needs num_samples >= 1, val_samples >= 0, every_n_epochs >= 1 (or None)")
        if not 0.0 < max_overhead <= 1.0:
            raise ValueError(f"BNStatsCheck max_overhead must be in (0, 1], got {max_overhead}")
        self.num_samples, self.val_samples, self.action = num_samples, val_samples, action
        self.collapse_factor, self.mean_tol, self.logvar_tol = collapse_factor, mean_tol, logvar_tol
        self.acc_tol, self.rank_tol, self.every_n_epochs = acc_tol, rank_tol, every_n_epochs
        self.max_overhead = max_overhead
        self.auto_every: Optional[int] = None  # every_n_epochs=None: decided after the first train epoch
        # (train, val) images of the one check of a fit too short for auto_every; None: the full K
        self.short_fit_samples: Optional[tuple[int, int]] = None
        self._train_images = self._val_images = 0
        self._ran_epoch: Optional[int] = None
        self._said: set[str] = set()
        self.last_findings: list[str] = []
        self.last_summary: dict[str, float] = {}
        self.last_rows: list[dict] = []
        self._heldout: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def _once(self, key: str, msg: str) -> None:
        if key not in self._said:
            self._said.add(key)
            _say(msg)

    # ------------------------------------------------------------------ hooks
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.auto_every is None:  # counted in the first epoch only
            self._train_images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.auto_every is None:
            self._train_images += batch_size_of(batch)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.auto_every is None:
            self._val_images = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.auto_every is None and dataloader_idx == 0:
            self._val_images += batch_size_of(batch)

    @property
    def min_samples(self) -> int:
        """The fewest images a shrunken check uses (train and val each): (4 / mean_tol)^2, 256 at
        the default 0.25. The population mean of a channel estimated from N images has a
        standard error of at most sigma / sqrt(N) (per-image means vary by at most sigma), here
        a quarter of the staleness tolerance; a val-accuracy change of ``acc_tol`` (0.05) is
        then 13 images or more."""
        return math.ceil((4.0 / self.mean_tol) ** 2)

    def _samples(self, trainer) -> tuple[int, int]:
        """(train, val) images a check uses now: the shrunken pair of a fit too short for
        ``auto_every`` during that fit, else the full ``num_samples``/``val_samples`` (also in
        ``zoo validate``, which pays for one check only)."""
        if self.short_fit_samples and trainer.state.fn == "fit":
            return self.short_fit_samples
        return self.num_samples, self.val_samples

    def check_cost(self, samples: Optional[tuple[int, int]] = None) -> float:
        """Forward passes of one check per rank (``ESTIMATOR_COST_IN_FORWARDS`` per estimator
        image, 1 per val image), as a fraction of one train epoch's compute
        (``TRAIN_COST_IN_FORWARDS`` per train image). ``samples``: (train, val) images, all
        ranks together (default: the full ``num_samples``, ``val_samples``)."""
        ws = world_size()
        k_train, k_val = samples or (self.num_samples, self.val_samples)
        train = ESTIMATOR_COST_IN_FORWARDS * min(math.ceil(k_train / ws), self._train_images)
        val = min(math.ceil(k_val / ws), self._val_images)
        held = 2 * min(HELDOUT_SIZE, self._val_images)
        return (train + 2 * val + held) / max(TRAIN_COST_IN_FORWARDS * self._train_images, 1.0)

    def _shrink(self, budget: float) -> tuple[int, int]:
        """(train, val) images, all ranks, for one check costing at most ``budget`` train epochs:
        both scaled by one factor, each at least :attr:`min_samples` (or all there are)."""
        ws = world_size()
        full_train = min(self.num_samples, self._train_images * ws)
        full_val = min(self.val_samples, self._val_images * ws)
        fixed = self.check_cost((0, 0))  # the held-out batch
        scale = max(0.0, budget - fixed) / max(self.check_cost((full_train, full_val)) - fixed, 1e-12)

        def scaled(full: int) -> int:
            return min(full, max(self.min_samples, math.floor(full * min(scale, 1.0))))

        return scaled(full_train), scaled(full_val)

    def _due(self, trainer) -> bool:
        epoch = trainer.current_epoch
        if trainer.state.fn != "fit":
            return True
        if self.every_n_epochs is not None:
            return epoch % self.every_n_epochs == 0
        if self.auto_every is None:
            if not self._train_images:  # validation before any training (val_check_interval)
                return False
            cost = self.check_cost()
            self.auto_every = max(1, math.ceil(cost / self.max_overhead - 1e-9))
            epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
            if epochs is not None and epochs < self.auto_every:
                self.short_fit_samples = self._shrink(self.max_overhead * epochs)
                k_train, k_val = self.short_fit_samples
                share = self.check_cost(self.short_fit_samples) / epochs
                plan = (f"this fit has {epochs} epoch(s): one check at its end, on {k_train} train and {k_val} val "
                        f"images (at least {self.min_samples} each), ~{100 * share:.3g}% of the fit "
                        f"(every_n_epochs to choose)")
            else:
                plan = (f"it runs every {self.auto_every} epoch(s), the last epoch included, to stay within "
                        f"{100 * self.max_overhead:g}% (every_n_epochs to choose)")
            _say(f"BNStatsCheck: one check costs {100 * cost:.3g}% of a train epoch here (forward passes counted); {plan}")
        last = trainer.max_epochs - 1 if trainer.max_epochs and trainer.max_epochs > 0 else None
        if last is None:
            return (epoch + 1) % self.auto_every == 0
        return (last - epoch) % self.auto_every == 0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self._due(trainer):
            return
        self.run(trainer, pl_module)

    @torch.no_grad()
    def run(self, trainer, pl_module) -> list[str]:
        t0 = time.perf_counter()
        self._ran_epoch = trainer.current_epoch
        net = pl_module.net
        layers = bn_layers(net)
        self.last_findings, self.last_summary, self.last_rows = [], {}, []
        if not layers:
            self._once("nobn", "BNStatsCheck: the model has no BatchNorm layers with running statistics; nothing to check")
            return []
        was_training = pl_module.training
        pl_module.eval()
        findings: list[str] = []
        rows = {n: {"layer": n, "channels": m.num_features} for n, m in layers}
        summary: dict[str, float] = {}

        # 1. NaN/Inf, never updated; 2. collapsed variance
        bad = 0
        collapsed_total = 0
        for n, m in layers:
            nonfinite = int((~torch.isfinite(m.running_mean)).sum() + (~torch.isfinite(m.running_var)).sum())
            rows[n]["nonfinite"] = nonfinite
            if nonfinite:
                bad += 1
                findings.append(f"{n}: {nonfinite} NaN/Inf values in running_mean/running_var")
            if m.num_batches_tracked is not None and int(m.num_batches_tracked) == 0:
                findings.append(f"{n}: num_batches_tracked is 0 (the running statistics were never updated)")
            collapsed = int((m.running_var < self.collapse_factor * m.eps).sum())
            rows[n]["collapsed"] = collapsed
            collapsed_total += collapsed
            if collapsed:
                findings.append(
                    f"{n}: {collapsed}/{m.num_features} channels with running_var < {self.collapse_factor:g} x eps "
                    f"(variance collapse)"
                )
        summary["bn/nonfinite_layers"] = float(bad)
        summary["bn/collapsed_channels"] = float(collapsed_total)

        # 3. running vs population statistics
        stats = None
        if not _extra_pass_allowed(trainer):
            self._once("mid", "BNStatsCheck: validation in the middle of an epoch: check 3 (population statistics) "
                              "runs only at epoch ends")
        else:
            k_train = self._samples(trainer)[0]
            inputs = _train_inputs(trainer, pl_module, k_train)
            if inputs is None:
                self._once("nodata", "BNStatsCheck: no training data in this stage; check 3 (population statistics) skipped")
            else:
                with precision_context(trainer):
                    stats, used = estimate_population_stats(net, inputs, k_train)
                if used < k_train:
                    self._once("few", f"BNStatsCheck: the train data gave {used} samples < {k_train} "
                                      "requested; estimated from all of them")
        if stats:
            worst_mean = worst_var = 0.0
            for n, m in layers:
                mean_pop, var_pop = stats[n]
                sigma = (var_pop + m.eps).sqrt()
                rel = ((m.running_mean.float() - mean_pop).abs() / sigma)
                logv = ((m.running_var.float() + m.eps) / (var_pop + m.eps)).log().abs()
                rel = torch.nan_to_num(rel, nan=math.inf)
                logv = torch.nan_to_num(logv, nan=math.inf)
                r_mean, r_var = float(rel.mean()), float(logv.mean())
                rows[n].update(mean_err=r_mean, mean_err_max=float(rel.max()), logvar=r_var, logvar_max=float(logv.max()))
                worst_mean, worst_var = max(worst_mean, r_mean), max(worst_var, r_var)
                if r_mean > self.mean_tol or r_var > self.logvar_tol:
                    findings.append(
                        f"{n}: running statistics differ from the population's (mean error {r_mean:.3g} sigma, "
                        f"|log var ratio| {r_var:.3g}): stale"
                    )
            summary["bn/mean_err_max"] = worst_mean
            summary["bn/logvar_max"] = worst_var
            acc = self._val_accuracy(trainer, pl_module, stats)
            if acc is not None:
                summary["bn/val_acc1_running"], summary["bn/val_acc1_recomputed"] = acc
                if acc[1] - acc[0] > self.acc_tol:
                    findings.append(
                        f"model: val accuracy {acc[0]:.4f} with the running statistics vs {acc[1]:.4f} recomputed"
                    )

        # 4. train/eval gap on a held-out batch
        gap = self._train_eval_gap(trainer, pl_module)
        if gap is not None:
            acc_train, acc_eval, logit_diff = gap
            summary["bn/heldout_acc1_batchstats"] = acc_train
            summary["bn/heldout_acc1_running"] = acc_eval
            summary["bn/heldout_logit_rel_diff"] = logit_diff
            if acc_train - acc_eval > self.acc_tol:
                findings.append(
                    f"model: held-out batch accuracy {acc_eval:.4f} with running statistics vs {acc_train:.4f} "
                    f"with batch statistics (logits differ by {logit_diff:.3g} relative)"
                )

        # 5. ranks
        if distributed():
            diffs = rank_max_diff(net)
            for n, d in diffs.items():
                rows[n]["rank_max_diff"] = d
                if d > self.rank_tol:
                    findings.append(f"{n}: BN buffers differ across ranks by up to {d:.3g}")
            summary["bn/rank_max_diff"] = max(diffs.values(), default=0.0)

        summary["bn/findings"] = float(len(findings))
        for f in findings:
            _say(f"BNStatsCheck: {f}")
        if not findings:
            _say(f"BNStatsCheck: {len(layers)} BN layers healthy")

        if findings and self.action == "recalibrate":
            if stats:
                apply_population_stats(net, stats)
                summary["bn/recalibrated"] = 1.0
                if "bn/val_acc1_running" in summary:
                    _say(f"BNStatsCheck: recalibrated {len(layers)} BN layers: val accuracy "
                         f"{summary['bn/val_acc1_running']:.4f} -> {summary['bn/val_acc1_recomputed']:.4f}")
            else:
                _say("BNStatsCheck: cannot recalibrate: no population statistics (no training data)")
        pl_module.train(was_training)
        summary["bn/check_seconds"] = time.perf_counter() - t0
        self.last_findings, self.last_summary, self.last_rows = findings, summary, list(rows.values())
        for k, v in summary.items():
            pl_module.log(k, v, sync_dist=False)
        self._write_table(trainer)
        if findings and self.action == "fail":
            raise BNStatsError(f"BNStatsCheck: {len(findings)} findings, first: {findings[0]}")
        return findings

    def state_dict(self) -> dict:
        # the period chosen in the first epoch: a resume from a mid-epoch checkpoint would count
        # a partial epoch and choose another
        return {"auto_every": self.auto_every, "short_fit_samples": self.short_fit_samples}

    def load_state_dict(self, state_dict: dict) -> None:
        self.auto_every = state_dict.get("auto_every")
        short = state_dict.get("short_fit_samples")
        self.short_fit_samples = tuple(short) if short is not None else None

    # ------------------------------------------------------------------ pieces
    def _val_loader(self, trainer):
        loaders = as_list(trainer.val_dataloaders)
        return loaders[0] if loaders else None

    @torch.no_grad()
    def _val_accuracy(self, trainer, pl_module, stats) -> Optional[tuple[float, float]]:
        loader = self._val_loader(trainer)
        k_val = self._samples(trainer)[1]
        if loader is None or k_val == 0:
            return None
        net = pl_module.net
        hits = torch.zeros(3, device=pl_module.device)  # running, recomputed, count
        picks_x, picks_y = [], []
        for x, y in iterate(loader, pl_module, max_samples=math.ceil(k_val / world_size())):
            if y is None:
                return None
            # the held-out batch of check 4: a few images from every val batch, so that it
            # mixes classes (a sequential val loader gives one class per batch)
            picks_x.append(x[:HELDOUT_PER_BATCH])
            picks_y.append(y[:HELDOUT_PER_BATCH].clone())  # FFCV reuses its batch buffers
            with precision_context(trainer):
                a = net(x).argmax(-1) == y
                with using_stats(net, stats):
                    b = net(x).argmax(-1) == y
            hits += torch.stack([a.sum().float(), b.sum().float(), torch.full((), float(y.numel()), device=hits.device)])
        all_reduce(hits, "sum")
        if picks_x:
            xs, ys = torch.cat(picks_x), torch.cat(picks_y)
            keep = torch.linspace(0, len(ys) - 1, min(HELDOUT_SIZE, len(ys)), device=ys.device).round().long()
            self._heldout = (xs[keep], ys[keep])
        n = max(float(hits[2]), 1.0)
        return float(hits[0]) / n, float(hits[1]) / n

    @torch.no_grad()
    def _train_eval_gap(self, trainer, pl_module) -> Optional[tuple[float, float, float]]:
        batch = self._heldout
        self._heldout = None
        if batch is None:  # check 3 did not run: the first val batch
            loader = self._val_loader(trainer)
            batch = next(iterate(loader, pl_module, max_batches=1), None) if loader is not None else None
        if batch is None or batch[1] is None or batch[0].shape[0] < 2:
            return None
        x, y = batch
        net = pl_module.net
        with precision_context(trainer):
            eval_logits = net(x).float()
            with bn_train_mode(net):
                train_logits = net(x).float()
        res = torch.stack([
            (train_logits.argmax(-1) == y).float().mean(), (eval_logits.argmax(-1) == y).float().mean(),
            (train_logits - eval_logits).norm() / train_logits.norm().clamp_min(1e-12),
        ])
        all_reduce(res, "sum")
        res /= world_size()
        return float(res[0]), float(res[1]), float(res[2])

    @rank_zero_only
    def _write_table(self, trainer) -> None:
        if not self.last_rows:
            return
        cols = ["layer", "channels", "nonfinite", "collapsed", "mean_err", "mean_err_max", "logvar",
                "logvar_max", "rank_max_diff"]
        data = [[r.get(c) for c in cols] for r in self.last_rows]
        logger = trainer.logger
        if type(logger).__name__ == "WandbLogger":
            logger.log_table(key="bn/layers", columns=cols, data=data)
        out = Path(trainer.default_root_dir) / "bn_stats"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"epoch={trainer.current_epoch:03d}-step={trainer.global_step}.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            w.writerows(data)
        self.last_table = path
