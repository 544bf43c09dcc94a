"""2-process CPU DDP (gloo, ddp_spawn) over the DataModule: ffcv splits the data across ranks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.imagenet import ImageNetDataModule

RES = 32


class RecordLabels(L.LightningModule):
    """Writes, per rank, the batch shapes and labels it trained on to ``out/rank<r>.json``."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out
        self.net = torch.nn.Linear(3, 3)
        self.seen: list = []

    def training_step(self, batch, _):
        x, y = batch
        self.seen.append({"dtype": str(x.dtype), "shape": list(x.shape), "labels": y.tolist()})
        return self.net(x.float().mean((2, 3))).logsumexp(1).mean()

    def on_train_end(self):
        from datamodules.processes import exit_hooks as process_exit

        self.seen.append({"gloo_exit_settled": process_exit._registered})
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize(
    "backend",
    [pytest.param("ffcv", marks=pytest.mark.skipif(importlib.util.find_spec("ffcv") is None, reason="no ffcv")), "torchvision"],
)
def test_ddp_splits_the_global_batch_and_the_data(tiny_imagenet, tmp_path, backend):
    dm = ImageNetDataModule(root=str(tiny_imagenet), backend=backend, batch_size=6, num_workers=1, train_res=RES,
                            val_res=RES, beton_dir=str(tmp_path / "betons"), drop_last=False, progress=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(RecordLabels(str(tmp_path)), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [seen.pop() for seen in ranks] == [{"gloo_exit_settled": True}] * 2  # datamodules/processes/exit_hooks.py
    for seen in ranks:
        assert [s["shape"] for s in seen] == [[3, 3, RES, RES]] * 3  # 18 images / 2 ranks / 3 per device
        assert all(s["dtype"] == "torch.uint8" for s in seen)
    labels = sorted(label for seen in ranks for s in seen for label in s["labels"])
    assert labels == [0] * 6 + [1] * 6 + [2] * 6  # each image once across the ranks


def _val_metrics(dm: ImageNetDataModule, devices: int) -> dict[str, float]:
    from zoo.base import ImageClassifier

    torch.manual_seed(0)  # the same random network in every run: its accuracy is neither 0 nor 1
    model = ImageClassifier(arch="convnet", num_classes=3)
    kw = dict(strategy="ddp_spawn") if devices > 1 else {}
    trainer = L.Trainer(accelerator="cpu", devices=devices, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **kw)
    (metrics,) = trainer.validate(model, datamodule=dm)
    return {k: float(v) for k, v in metrics.items() if "acc" in k}


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize(
    "backend",
    [pytest.param("ffcv", marks=pytest.mark.skipif(importlib.util.find_spec("ffcv") is None, reason="no ffcv")),
     "torchvision"],
)
def test_ddp_validation_counts_every_image_once(image_folder, tmp_path, backend):
    # 3 classes x 3 = 9 val images: 2 ranks get 5 and 4; a padded sampler would count one image twice (k/10, not k/9)
    root = image_folder(per_class=(1, 3))
    kw = dict(root=str(root), backend=backend, batch_size=4, num_workers=1 if backend == "ffcv" else 0,
              train_res=RES, val_res=RES, beton_dir=str(tmp_path / "betons"), progress=False)
    one = _val_metrics(ImageNetDataModule(**kw), devices=1)
    two = _val_metrics(ImageNetDataModule(**kw), devices=2)
    assert 0 < one["val/acc1"] < 1, f"pick another seed: accuracy {one['val/acc1']} cannot tell 9 from 10 images"
    assert two == one  # to the last digit
