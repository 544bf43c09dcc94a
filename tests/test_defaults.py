"""Defaults a user can trust: a train split smaller than one batch, the defaults on a user's own
data, loader threads/workers that fit the CPUs the process may use."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamodules.imagenet import DataError, ImageNetDataModule
from launch.cli import main

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- a split smaller than a batch


def _dm(root: Path, **kw) -> ImageNetDataModule:
    return ImageNetDataModule(root=str(root), backend="torchvision", num_workers=0, train_res=16, val_res=16, **kw)


def test_train_split_smaller_than_one_batch_is_one_line(tiny_imagenet):
    # tiny_imagenet: 3 classes x 6 train images = 18
    with pytest.raises(DataError, match=r"train split has 18 image\(s\), fewer than one batch of data.batch_size=64 "
                                        r"with data.drop_last true.*--data.batch_size 18 or smaller, or --data.drop_last false"):
        _dm(tiny_imagenet, batch_size=64).check_train_batches(1)
    _dm(tiny_imagenet, batch_size=64, drop_last=False).check_train_batches(1)  # one short batch: trains
    _dm(tiny_imagenet, batch_size=18).check_train_batches(1)  # exactly one batch


def test_train_split_smaller_than_one_batch_per_process_under_ddp(tiny_imagenet):
    # 4 processes: 5 images each (18 padded to 20), 8 per process at a global batch of 32
    with pytest.raises(DataError, match=r"18 image\(s\) over 4 processes \(5 per process, batch 8 per process\).*"
                                        r"--data.batch_size 20 or smaller"):
        _dm(tiny_imagenet, batch_size=32).check_train_batches(4)
    _dm(tiny_imagenet, batch_size=20).check_train_batches(4)  # 5 per process: one batch each


def test_setup_for_fit_checks_the_batch(tiny_imagenet):
    with pytest.raises(DataError, match="fewer than one batch"):
        _dm(tiny_imagenet, batch_size=64).setup("fit")
    _dm(tiny_imagenet, batch_size=64).setup("validate")  # evaluation never drops a batch


def test_zoo_fit_on_too_few_images_exits_2_and_writes_nothing(tiny_imagenet, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    runs = tmp_path / "runs"
    rc = main(["fit", "--config", str(REPO / "launch/recipes/demo.yaml"), "--data.root", str(tiny_imagenet),
               "--data.backend", "torchvision", "--data.num_workers", "0", "--data.batch_size", "64",
               "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--run.root", str(runs)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: the train split has 18 image(s)") and "--data.drop_last false" in err[-1], err[-3:]
    assert not runs.exists() or not any(runs.iterdir()), sorted(runs.rglob("*"))
