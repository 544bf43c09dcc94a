"""BNBufferSync: average BN buffers across DDP ranks (timm ``distribute_bn``).

Under DDP without SyncBN every rank's buffers drift apart; average them across ranks before
validation, at the end of each train epoch and before saving (timm ``distribute_bn(...,
reduce=True)``, its train.py default ``--dist-bn reduce``). The alternative is Lightning's
SyncBN, ``--trainer.sync_batchnorm true``, which synchronises batch statistics at every
training forward (one all-reduce per BN layer per step).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch

from .._batches import distributed
from .common import find_ema
from .population import bn_layers, rank_max_diff, reduce_bn_buffers


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
        ema = find_ema(trainer)
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
