"""Repeated-augmentation order (torchvision's RASampler) for both backends."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from datamodules.imagenet import ImageNetDataModule
from datamodules.samplers import RASampler, ra_indices


def test_ra_order_repeats_each_index_and_splits_ranks_like_torchvision():
    n, reps = 1024, 4
    one = ra_indices(n, 0, reps=reps, seed=0)
    assert len(one) == n  # floor(n // 256 * 256 / 1): an epoch still visits ~n samples
    assert all(one[i] == one[i - i % reps] for i in range(len(one)))  # runs of `reps` copies
    assert len(set(one)) == n // reps
    ranks = [ra_indices(n, 0, reps=reps, seed=0, rank=r, world_size=2) for r in range(2)]
    assert [len(r) for r in ranks] == [n // 2, n // 2]
    assert Counter(ranks[0]) == Counter(ranks[1])  # the copies of an image land on both ranks
    assert ra_indices(n, 1, reps=reps, seed=0) != one  # a new permutation every epoch
    assert ra_indices(n, 0, reps=reps, seed=0) == one


def test_ra_sampler_is_a_distributed_sampler_with_set_epoch():
    s = RASampler(list(range(512)), reps=4, num_replicas=2, rank=1, seed=3)
    assert isinstance(s, torch.utils.data.DistributedSampler)  # Lightning keeps it, calls set_epoch
    a = list(s)
    s.set_epoch(1)
    assert list(s) != a and len(a) == len(s) == 256
    with pytest.raises(ValueError, match="ra_reps"):
        RASampler(list(range(8)), reps=0)


def test_torchvision_backend_serves_repeated_images(tiny_imagenet):
    dm = ImageNetDataModule(root=str(tiny_imagenet), backend="torchvision", batch_size=6, num_workers=0,
                            train_res=24, val_res=24, ra_reps=3, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, RASampler)
    x, y = next(iter(loader))
    assert y[0] == y[1] == y[2]  # three copies of one image in a row
    assert not (torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]))  # with different crops/flips


def test_distributed_epoch_sampler_splits_epoch_sampler_draws_across_ranks():
    from datamodules.torchvision_backend import DistributedEpochSampler, EpochSampler

    one = EpochSampler(10, seed=5)
    one.set_epoch(2)
    whole = dict(one)  # index -> its crop seed, for epoch 2
    ranks = [DistributedEpochSampler(10, seed=5, num_replicas=3, rank=r) for r in range(3)]
    for s in ranks:
        assert isinstance(s, torch.utils.data.DistributedSampler)  # Lightning keeps it, calls set_epoch
        s.set_epoch(2)
    parts = [list(s) for s in ranks]
    assert [len(p) for p in parts] == [len(s) for s in ranks] == [4, 4, 4]  # 10 padded to 12, as torch's
    seen = [i for p in parts for i, _ in p]
    assert set(seen) == set(range(10)) and len(seen) == 12
    assert all(whole[i] == seed for p in parts for i, seed in p)  # the 1-process crops, split
    ranks[1].set_epoch(3)
    assert list(ranks[1]) != parts[1]  # a new order every epoch
    ranks[1].set_epoch(2)
    ranks[1].resume_at = (2, 3)  # 3 samples of epoch 2 trained before the kill: the rest only
    assert list(ranks[1]) == parts[1][3:]
