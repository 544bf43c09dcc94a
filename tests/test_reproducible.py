"""Same seed, same run: FFCV crops and flips are drawn from (seed, epoch, sample index)."""

from __future__ import annotations

import importlib.util

import lightning as L
import pytest
import torch

from datamodules.imagenet import ImageNetDataModule
from zoo.base import ImageClassifier

needs_ffcv = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None, reason="ffcv not installed")
RES = 32


def _fit(root, beton_dir, seed: int) -> tuple[dict, torch.Tensor]:
    L.seed_everything(seed, workers=True)
    dm = ImageNetDataModule(
        root=str(root), backend="ffcv", batch_size=6, num_workers=2, train_res=RES, val_res=RES,
        max_resolution=100, beton_dir=str(beton_dir), progress=False,
    )
    model = ImageClassifier(arch="convnet", num_classes=3, lr=0.05, lr_reference_batch=None, schedule="constant")
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True,
    )
    trainer.fit(model, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return metrics, weights


@needs_ffcv
@pytest.mark.slow
def test_same_seed_same_metrics_on_ffcv(tiny_imagenet, tmp_path):
    # (that another seed gives other crops is checked on the loader below: cheaper)
    a, wa = _fit(tiny_imagenet, tmp_path, seed=3)
    b, wb = _fit(tiny_imagenet, tmp_path, seed=3)
    assert a == b and torch.equal(wa, wb)  # to the last bit, with 2 decoding threads
    assert "val/acc1" in a and "train/loss" in a


@needs_ffcv
@pytest.mark.slow  # two numba compiles: ~25 s on a quiet 2-core machine
def test_seeded_crops_do_not_depend_on_threads_and_change_per_epoch(tiny_imagenet, tmp_path):
    from datamodules.ffcv_io import label_pipeline, make_loader, train_image_pipeline, write_beton

    path = tmp_path / "t.beton"
    write_beton(tiny_imagenet / "train", path, max_resolution=100, progress=False)

    def loader(workers: int):
        pipe = train_image_pipeline(RES, (0.08, 1.0), (3 / 4, 4 / 3), seed=1)
        # sequential order: the same samples in the same place, only crops and flips can differ
        ld = make_loader(path, {"image": pipe, "label": label_pipeline()}, batch_size=6, num_workers=workers,
                         order="sequential", drop_last=False)
        return ld, pipe[0].epoch_seed

    def epoch(ld, e: int) -> torch.Tensor:
        ld.next_epoch = e
        return torch.cat([x.clone() for x, _ in ld])

    two, seed_state = loader(2)
    one, _ = loader(1)
    a0, a1 = epoch(two, 0), epoch(two, 1)
    assert torch.equal(a0, epoch(one, 0)) and torch.equal(a1, epoch(one, 1))  # 2 threads vs 1 thread
    assert not torch.equal(a0, a1)  # new crops every epoch
    seed_state.state[0] = 2  # another seed (what EpochSeed(2) would hold)
    assert not torch.equal(a0, epoch(two, 0))
