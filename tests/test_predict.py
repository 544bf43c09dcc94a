"""`zoo predict` writes its predictions: CSV rows in dataset order, the probability matrix, DDP merge."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from callbacks.prediction_writer import PredictionWriter
from datamodules.imagenet import ImageNetDataModule
from launch.cli import main
from tests.conftest import ramp_image
from tests.helpers import REPO

DEMO = str(REPO / "launch/recipes/demo.yaml")
RES = 32


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from zoo import create_network

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("w") / "w.pth"
    torch.save(create_network("convnet", num_classes=3).state_dict(), path)
    return path


def _read(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _predict_cli(root: Path, weights: Path, out: Path, capsys, *extra: str) -> Path:
    rc = main(["predict", "--config", DEMO, "--data.root", str(root), "--data.batch_size", "4",
               "--data.num_workers", "0", "--data.val_res", str(RES), "--data.train_res", str(RES),
               "--model.weights", str(weights), "--run.root", str(out), "--run.logger", "none", *extra])
    assert rc == 0
    printed = capsys.readouterr().out
    path = Path(printed.split("predictions: ")[1].split()[0])
    assert path.is_file() and path.parent.parent.parent == out  # runs/<name>/<id>/predictions.csv
    return path


def _reference(root: Path, weights: Path) -> tuple[list[str], torch.Tensor]:
    """Paths and probabilities computed here, without the writer: the model on the val crops in order."""
    from zoo.base import ImageClassifier

    dm = ImageNetDataModule(root=str(root), backend="torchvision", batch_size=4, num_workers=0, train_res=RES, val_res=RES)
    dm.prepare_data()
    dm.setup("predict")
    model = ImageClassifier(arch="convnet", num_classes=3, weights=str(weights)).eval()
    with torch.no_grad():
        probs = torch.cat([model.predict_step(model.on_after_batch_transfer(b), i) for i, b in enumerate(dm.predict_dataloader())])
    return [p for p, _ in dm.samples(dm._predict_split())], probs


def test_predict_writes_one_row_per_image_in_dataset_order(tiny_imagenet, weights, tmp_path, capsys):
    path = _predict_cli(tiny_imagenet, weights, tmp_path, capsys, "--data.backend", "torchvision")
    rows = _read(path)
    paths, probs = _reference(tiny_imagenet, weights)
    assert len(rows) == len(paths) == 9
    assert [r["path"] for r in rows] == paths and [int(r["index"]) for r in rows] == list(range(9))
    assert [r["target"] for r in rows] == ["ant"] * 3 + ["bee"] * 3 + ["cat"] * 3
    names = ["ant", "bee", "cat"]
    assert [r["class_1"] for r in rows] == [names[i] for i in probs.argmax(1).tolist()]
    top = probs.topk(3, dim=1)
    for r, p, i in zip(rows, top.values, top.indices):
        assert [r[f"class_{j}"] for j in (1, 2, 3)] == [names[k] for k in i.tolist()]
        assert np.allclose([float(r[f"prob_{j}"]) for j in (1, 2, 3)], p.numpy(), atol=1e-5)
    matrix = np.load(path.parent / "probabilities.npy")
    assert matrix.shape == (9, 3) and np.allclose(matrix, probs.numpy(), atol=1e-5)


def test_predict_on_a_folder_of_photos(weights, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(5):
        Image.fromarray(ramp_image(50 + 7 * i, 64, i)).save(photos / f"img_{i}.jpg")
    (photos / "notes.txt").write_text("not an image")
    path = _predict_cli(photos, weights, tmp_path / "runs", capsys)  # the demo recipe's backend: ffcv
    rows = _read(path)
    paths, probs = _reference(photos, weights)
    assert [r["path"] for r in rows] == paths == [str(photos / f"img_{i}.jpg") for i in range(5)]
    assert all(r["target"] == "" for r in rows)
    assert [r["class_1"] for r in rows] == [str(i) for i in probs.argmax(1).tolist()]  # no names: class indices
    assert main(["validate", "--config", DEMO, "--data.root", str(photos), "--model.weights", str(weights),
                 "--run.root", str(tmp_path / "runs"), "--run.logger", "none"]) == 2
    assert "only `zoo predict` reads such a folder" in capsys.readouterr().err


def test_predict_loader_has_no_train_augmentation(tiny_imagenet):
    dm = ImageNetDataModule(root=str(tiny_imagenet), backend="torchvision", batch_size=9, num_workers=0,
                            train_res=RES, val_res=RES, flip=1.0, scale=(0.1, 0.2))
    dm.prepare_data()
    dm.setup("predict")
    (x, _), (v, _) = next(iter(dm.predict_dataloader())), next(iter(dm.val_dataloader()))
    assert torch.equal(x, v)  # the val center crops: flip=1.0 and small crops would show
    r = x[:, 0].float()
    assert (r[..., RES // 2:].mean((1, 2)) > r[..., : RES // 2].mean((1, 2))).all()


def _predict_trainer(dm: ImageNetDataModule, out: Path, devices: int) -> None:
    from zoo.base import ImageClassifier

    torch.manual_seed(0)
    model = ImageClassifier(arch="convnet", num_classes=3)
    kw = dict(strategy="ddp_spawn") if devices > 1 else {}
    trainer = L.Trainer(accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[PredictionWriter(str(out))], **kw)
    trainer.predict(model, datamodule=dm, return_predictions=False)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize(
    "backend",
    [pytest.param("ffcv", marks=pytest.mark.skipif(importlib.util.find_spec("ffcv") is None, reason="no ffcv")), "torchvision"],
)
def test_ddp_predict_equals_one_process(tiny_imagenet, tmp_path, backend):
    # batch 2, batches_ahead 1: more batches than ffcv's ring of batches_ahead + 2 buffers, so a
    # writer that kept views of ffcv's label buffers would see them overwritten
    kw = dict(root=str(tiny_imagenet), backend=backend, batch_size=2, num_workers=1 if backend == "ffcv" else 0,
              train_res=RES, val_res=RES, beton_dir=str(tmp_path / "betons"), progress=False, batches_ahead=1)
    _predict_trainer(ImageNetDataModule(**kw), tmp_path / "one", devices=1)
    _predict_trainer(ImageNetDataModule(**kw), tmp_path / "two", devices=2)  # 9 images: 5 + 4, no padding
    one, two = _read(tmp_path / "one/predictions.csv"), _read(tmp_path / "two/predictions.csv")
    assert len(one) == len(two) == 9
    # other batch shapes round differently in the last float digits: same rows, same classes, close probabilities
    keys = ["index", "path", "target", "class_1"]
    assert [[r[k] for k in keys] for r in two] == [[r[k] for k in keys] for r in one]
    assert [r["target"] for r in one] == ["ant"] * 3 + ["bee"] * 3 + ["cat"] * 3  # labels kept per row (ffcv reuses buffers)
    assert np.allclose(np.load(tmp_path / "one/probabilities.npy"), np.load(tmp_path / "two/probabilities.npy"), atol=1e-5)
    assert not (tmp_path / "two/.predict-parts").exists()
