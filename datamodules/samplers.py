"""Repeated-augmentation sampling (Hoffer et al. 2020; Berman et al. 2019), for both backends.

torchvision's references/classification/sampler.py ``RASampler`` (``--ra-sampler --ra-reps 4`` in
the ResNet-50 v2 recipe, +0.18 top-1 in torchvision's ablation): every epoch, a seeded
permutation of the dataset; each index repeated ``reps`` times in a row; padded to a multiple of
the world size; rank ``r`` takes every ``world_size``-th index from ``r``; and each rank keeps
only ``floor(len(dataset) // 256 * 256 / world_size)`` of them, so an epoch still visits about
``len(dataset)`` samples (each of ~1/reps of the images, ``reps`` times, on different ranks).

:func:`ra_indices` is that order; :class:`RASampler` serves it to a torch DataLoader (a
DistributedSampler subclass, so Lightning neither replaces nor wraps it and calls its
``set_epoch``); :func:`ffcv_ra_order` to an ffcv Loader.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DistributedSampler


def ra_indices(n: int, epoch: int, *, reps: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> list[int]:
    """The indices rank ``rank`` visits in ``epoch`` (torchvision's RASampler.__iter__)."""
    num_samples = int(math.ceil(n * float(reps) / world_size))
    total_size = num_samples * world_size
    num_selected = int(math.floor(n // 256 * 256 / world_size)) or int(math.ceil(n / world_size))  # tiny sets: keep all
    if shuffle:
        g = torch.Generator()
        g.manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    order = [i for i in order for _ in range(reps)]
    order += order[: total_size - len(order)]
    return order[rank:total_size:world_size][:num_selected]


class RASampler(DistributedSampler):
    """torchvision's RASampler as a DistributedSampler (``set_epoch`` each epoch)."""

    def __init__(self, dataset, *, reps: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0):
        if reps < 1:
            raise ValueError(f"ra_reps={reps} must be >= 1 (torchvision's recipe: 4)")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.reps = reps

    def __iter__(self):
        return iter(ra_indices(len(self.dataset), self.epoch, reps=self.reps, seed=self.seed, rank=self.rank,
                               world_size=self.num_replicas, shuffle=self.shuffle))

    def __len__(self) -> int:
        return len(ra_indices(len(self.dataset), 0, reps=self.reps, seed=self.seed, rank=self.rank,
                              world_size=self.num_replicas, shuffle=False))


def ffcv_ra_order(reps: int):
    """An ffcv ``order=`` value giving the RASampler order (ffcv 1.0.2 calls ``order(loader)``
    after an ``isinstance(order, TraversalOrder)`` check, so this is an instance that builds one)."""
    from ffcv.traversal_order.base import TraversalOrder

    class RAOrder(TraversalOrder):
        cache_key = ("ra", reps)  # ffcv_io.make_loader: Loaders built with an equal order may be reused

        def __init__(self, loader=None):
            self.reps = reps
            if loader is not None:
                super().__init__(loader)

        def __call__(self, loader) -> "RAOrder":
            return RAOrder(loader)

        def sample_order(self, epoch: int) -> Sequence[int]:
            rank, world = 0, 1
            if self.distributed:
                rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            pos = ra_indices(len(self.indices), epoch, reps=self.reps, seed=self.seed or 0, rank=rank, world_size=world)
            return np.asarray(self.indices)[pos]

    return RAOrder()


def per_class_subset(labels: Sequence[int], per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` samples of each class (all of a class with fewer), drawn
    without replacement by a generator seeded with ``seed``: a function of the labels and the
    seed only, so every backend and every rank that sees the same split picks the same images."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
