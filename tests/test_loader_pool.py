"""ffcv_io.LoaderPool: a later DataModule with the same settings reuses a built ffcv Loader
(numba never frees a Loader's compiled code), never one another DataModule still holds, and a
reused Loader decodes exactly what a new one would."""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil

import pytest
import torch

from datamodules.imagenet import ImageNetDataModule

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None, reason="no ffcv")
RES = 32


@pytest.fixture
def make_dm(tiny_imagenet, tmp_path):
    betons = tmp_path / "betons"

    def make(**kw):
        args = dict(root=str(tiny_imagenet), backend="ffcv", batch_size=6, num_workers=1, train_res=RES, val_res=RES,
                    max_resolution=100, beton_dir=str(betons), progress=False, seed=3)
        dm = ImageNetDataModule(**{**args, **kw})
        dm.prepare_data()
        dm.setup("fit")
        return dm

    return make


def _epoch(loader):
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


def _pool():
    from datamodules.ffcv_io import LOADER_POOL

    return LOADER_POOL


def test_a_released_loader_is_reused_and_decodes_what_a_new_one_would(make_dm):
    pool = _pool()
    dm = make_dm()
    first = dm.train_dataloader()
    inner, built = first.loader, pool.built
    epoch0 = _epoch(first)
    _epoch(first)  # the Loader is now at epoch 2, its decoder was told a new size: a reuse resets both
    dm.set_train_resolution(24)
    del dm, first
    gc.collect()

    again = make_dm().train_dataloader()
    assert again.loader is inner and pool.built == built  # reused: nothing compiled
    x, y = _epoch(again)
    assert x.shape[-2:] == (RES, RES)  # the size this DataModule asked for, not the last holder's 24
    assert torch.equal(x, epoch0[0]) and torch.equal(y, epoch0[1])  # epoch 0's order, crops and flips


def test_a_held_loader_is_never_shared(make_dm):
    pool = _pool()
    a = make_dm().train_dataloader()
    built = pool.built
    b = make_dm().train_dataloader()
    assert b.loader is not a.loader and pool.built == built + 1
    assert torch.equal(_epoch(a)[0], _epoch(b)[0])  # two Loaders, same settings, same first epoch


def test_other_settings_or_a_rewritten_file_build_a_new_loader(make_dm, tmp_path):
    pool = _pool()
    dm = make_dm()
    path = dm.beton_path("val")
    inner = dm.val_dataloader().loader
    del dm
    gc.collect()
    other = make_dm(batch_size=4).val_dataloader()  # another batch size
    assert other.loader is not inner
    del other
    gc.collect()

    copy = tmp_path / "copy.beton"
    shutil.copy(path, copy)
    os.replace(copy, path)  # same bytes, new file (a rewrite renames a finished temp file)
    built = pool.built
    fresh = make_dm().val_dataloader()
    assert fresh.loader is not inner and pool.built == built + 1
