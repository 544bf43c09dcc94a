"""Batches for callbacks that run extra forward passes (EMA validation, BN statistics).

A batch goes through the module's own transfer hooks (``on_before_batch_transfer``,
``transfer_batch_to_device``, ``on_after_batch_transfer``), so uint8 images are normalised
exactly as in validation; outside training, ImageClassifier applies no augmentation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.distributed as dist


def to_device(pl_module, batch: Any, dataloader_idx: int = 0) -> Any:
    batch = pl_module.on_before_batch_transfer(batch, dataloader_idx)
    batch = pl_module.transfer_batch_to_device(batch, pl_module.device, dataloader_idx)
    return pl_module.on_after_batch_transfer(batch, dataloader_idx)


def batch_size_of(batch: Any) -> int:
    """Images in an (images, labels) batch, or in a bare image tensor (ThroughputMonitor's
    ``batch_size_fn``; BNStatsCheck's epoch count)."""
    x = batch if isinstance(batch, torch.Tensor) else batch[0]
    return int(x.shape[0])


def as_list(loaders: Any) -> list:
    if loaders is None:
        return []
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    if isinstance(loaders, dict):
        return list(loaders.values())
    return [loaders]


def train_loader(trainer) -> Optional[Any]:
    """The fit's train dataloader, or the DataModule's (``zoo validate``), or None."""
    loaders = as_list(trainer.train_dataloader)
    if loaders:
        return loaders[0]
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and hasattr(dm, "train_dataloader"):
        try:
            return dm.train_dataloader()
        except Exception:  # a DataModule set up for validation only
            return None
    return None


def iterate(loader: Any, pl_module, max_samples: Optional[int] = None, max_batches: Optional[float] = None,
            dataloader_idx: int = 0) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(inputs, labels-or-None) on the module's device, up to ``max_samples`` images.

    An FFCV Loader counts epochs on every ``iter()`` and seeds its order with it: the count is
    put back, so the extra pass leaves the training order of later epochs unchanged.
    """
    next_epoch = getattr(loader, "next_epoch", None)
    seen = 0
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            batch = to_device(pl_module, batch, dataloader_idx)
            if isinstance(batch, torch.Tensor):
                x, y = batch, None
            else:
                x, y = batch[0], (batch[1] if len(batch) > 1 else None)
            yield x, y
            seen += x.shape[0]
            if max_samples is not None and seen >= max_samples:
                break
    finally:
        if next_epoch is not None:
            loader.next_epoch = next_epoch


def precision_context(trainer):
    """The trainer's autocast (e.g. 16-mixed) for extra forward passes, as in its own steps."""
    import contextlib

    plugin = getattr(trainer, "precision_plugin", None)
    return plugin.forward_context() if plugin is not None else contextlib.nullcontext()


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over all ranks (no-op outside DDP); op: sum | max | min."""
    if distributed():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1
