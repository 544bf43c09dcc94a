"""The course's workflow tools: fit diagnosis, gradient check, init statistics, sweeps, landscapes."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks.fit_diagnosis import FitDiagnosis
from zoo.base import ImageClassifier


# ----------------------------------------------------------------------------- FitDiagnosis
class NoiseData(L.LightningDataModule):
    """Gaussian-noise images with random labels: val is unpredictable from train, so a model
    that memorises the train set overfits by construction."""

    def __init__(self, n_train=32, n_val=32, res=12, classes=4, batch_size=8, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.xt = torch.randn(n_train, 3, res, res, generator=g)
        self.yt = torch.randint(0, classes, (n_train,), generator=g)
        self.xv = torch.randn(n_val, 3, res, res, generator=g)
        self.yv = torch.randint(0, classes, (n_val,), generator=g)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.xt, self.yt), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.xv, self.yv), batch_size=self.batch_size)


def _fit_with_diagnosis(model, epochs):
    diag = FitDiagnosis()
    t = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[diag])
    t.fit(model, datamodule=NoiseData())
    return diag


def test_fit_diagnosis_calls_an_over_regularised_model_underfitting():
    torch.manual_seed(0)
    # logreg with a tiny LR and a huge weight decay: the train loss stays at ln(4)
    m = ImageClassifier(arch="logreg", num_classes=4, arch_args={"input_size": 12}, lr=1e-5,
                        lr_reference_batch=None, weight_decay=10.0, schedule="constant")
    diag = _fit_with_diagnosis(m, epochs=2)
    assert len(diag.history) == 2
    d = diag.last
    assert d.verdict == "underfitting", d.line()
    assert d.train_loss_ratio > 0.5


def test_fit_diagnosis_calls_a_large_model_on_few_images_overfitting():
    torch.manual_seed(0)
    # 1.2 M parameters for 32 noise images with random labels: memorised, val loss climbs
    m = ImageClassifier(arch="mlp", num_classes=4, arch_args={"input_size": 12, "width": 1024, "depth": 2},
                        optimizer="adamw", lr=1e-3, lr_reference_batch=None, weight_decay=0.0,
                        schedule="constant")
    diag = _fit_with_diagnosis(m, epochs=4)
    d = diag.last
    assert d.verdict == "overfitting", d.line()
    assert d.train_acc1 - d.val_acc1 >= 0.1 and d.val_loss_rise >= 0.05
    verdicts = [h["verdict"] for h in diag.history]
    assert "overfitting" not in verdicts[:1]  # not before val has had a chance to get worse


def test_fit_diagnosis_rule_and_state():
    diag = FitDiagnosis()
    m = {"train/loss_epoch": 0.1, "train/acc1": 0.99, "val/loss": 0.2, "val/acc1": 0.95}
    assert diag.diagnose(m, 0, 10).verdict == "fine"
    diag.history.append({"val_loss": 0.2, "train_loss": 0.1})
    m = {"train/loss_epoch": 0.05, "val/loss": 0.9}  # no train acc (mixup): the loss gap decides
    assert diag.diagnose(m, 1, 10).verdict == "overfitting"
    assert FitDiagnosis().diagnose({"val/loss": 1.0}, 0, 10) is None  # nothing to compare
    with pytest.raises(ValueError, match="underfit_loss_ratio"):
        FitDiagnosis(underfit_loss_ratio=2)
    other = FitDiagnosis()
    other.load_state_dict(diag.state_dict())
    assert other.history == diag.history
