"""A checkpoint carries what its weights were trained and evaluated with, and every loading path uses it.

Eval size, crop ratio, interpolation, mean/std and class names (``zoo_data_config``), recorded at
the start of ``fit`` from the DataModule; ``zoo predict|validate|landscape``, ``zoo.load``,
``torch.hub.load`` evaluate with them unless a value is given explicitly. Input standardisation
(``data.normalize=dataset``) measures the train split's mean/std once and records them too.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.imagenet import ImageNetDataModule
from tests.conftest import make_image_folder
from tests.helpers import REPO

DEMO = REPO / "launch/recipes/demo.yaml"
CLASSES = ("ant", "bee", "cat")


def _fit_checkpoint(root: Path, out: Path, **dm_kw) -> tuple[Path, "L.LightningModule", ImageNetDataModule]:
    """One short fit (two batches) through Lightning's Trainer; the checkpoint it writes."""
    from zoo.base import ImageClassifier

    L.seed_everything(0)
    dm = ImageNetDataModule(root=str(root), backend="torchvision", batch_size=6, num_workers=0, drop_last=False,
                            progress=False, **dm_kw)
    model = ImageClassifier(arch="convnet", num_classes=len(CLASSES), lr=0.05, lr_reference_batch=None)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out))
    trainer.fit(model, datamodule=dm)
    path = out / "fit.ckpt"
    trainer.save_checkpoint(path)
    return path, model, dm


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("ck-data"), classes=CLASSES, per_class=(6, 3))


@pytest.fixture(scope="module")
def fitted(folder, tmp_path_factory):
    """convnet (registered eval size 64 px, crop 0.875) trained at 32 px, val crop 1.0, bicubic."""
    return _fit_checkpoint(folder, tmp_path_factory.mktemp("ck-run"), train_res=32, val_res=32, val_crop_ratio=1.0,
                           data_config={"interpolation": "bicubic"})


def test_fit_checkpoint_records_eval_preprocessing_and_class_names(fitted):
    path, _, _ = fitted
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    dc = ckpt["zoo_data_config"]
    assert (dc["input_size"], dc["crop_pct"], dc["interpolation"]) == (32, 1.0, "bicubic")
    assert dc["label_names"] == list(CLASSES) and ckpt["zoo_classes"] == list(CLASSES)
    import zoo

    model = zoo.load(weights=str(path))
    assert model.data_config["input_size"] == 32 and model.data_config["crop_pct"] == 1.0
    assert model.class_names == list(CLASSES)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)


def test_eval_transform_is_timms_and_takes_pil_or_uint8(fitted, folder, caplog):
    """The transform equals timm's eval transform for the recorded config on a PIL image, and a
    uint8 tensor of the same image gives the same result (up to PIL's vs torch's resampling)."""
    from timm.data import create_transform, resolve_data_config

    import zoo

    model = zoo.load(weights=str(fitted[0]))
    tf = model.eval_transform()
    img = Image.open(next((folder / "val" / "bee").iterdir())).convert("RGB")
    ref = create_transform(**resolve_data_config(pretrained_cfg=model.pretrained_cfg), is_training=False)(img)
    x = tf(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x, ref)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    assert t.dtype == torch.uint8
    y = tf(t)
    assert y.shape == (3, 32, 32) and (y - x).abs().mean() < 0.05
    # an explicit override: used, and said in one line
    import logging

    caplog.set_level(logging.INFO)
    assert model.eval_transform(input_size=64)(img).shape == (3, 64, 64)
    said = [r.getMessage() for r in caplog.records if "instead of the recorded" in r.getMessage()]
    assert len(said) == 1 and "input_size=64" in said[0] and "input_size=32" in said[0], said


def test_predict_classes_names_classes(fitted, folder):
    import zoo

    model = zoo.load(weights=str(fitted[0])).eval()
    imgs = [Image.open(p).convert("RGB") for p in sorted((folder / "val").glob("*/*.JPEG"))]
    out = model.predict_classes(imgs, k=2)
    assert len(out) == len(imgs) and all(len(r) == 2 for r in out)
    assert {name for r in out for name, _ in r} <= set(CLASSES)
    tf = model.eval_transform()
    with torch.no_grad():
        probs = model(torch.stack([tf(i) for i in imgs])).softmax(-1)
    assert [r[0][0] for r in out] == [CLASSES[i] for i in probs.argmax(1).tolist()]
    assert out[0][0][1] == pytest.approx(float(probs[0].max()), abs=1e-6)


def test_unlabelled_predict_takes_the_weights_class_count(fitted, tmp_path):
    """A folder without classes links model.num_classes to the weights' classes (no placeholder head
    that is built, reset and rebuilt)."""
    from launch.zoo_cli import num_classes_or_placeholder as _num_classes_or_placeholder

    flat = tmp_path / "photos"
    flat.mkdir()
    Image.new("RGB", (40, 40)).save(flat / "a.jpg")
    assert _num_classes_or_placeholder(str(flat), str(fitted[0]), "convnet") == len(CLASSES)
    from zoo import create_network

    pth = tmp_path / "w.pth"
    torch.save(create_network("convnet", num_classes=7).state_dict(), pth)
    assert _num_classes_or_placeholder(str(flat), str(pth), "convnet") == 7
    assert _num_classes_or_placeholder(str(flat), None, "convnet") == 2


def test_explicit_overrides_and_the_one_line(tmp_path):
    from launch.ckpt_config import eval_settings, explicit_data_keys

    recorded = {"input_size": 32, "crop_pct": 1.0}
    # the default recipe zoo adds by itself is not an explicit choice
    implicit = explicit_data_keys(["predict", "--config", str(DEMO), "--data.root", "x"], implicit_configs=[DEMO])
    assert "val_res" not in implicit and "root" in implicit
    update, line = eval_settings(recorded, {"val_res": 64, "val_crop_ratio": 0.875}, implicit, "last.ckpt")
    assert update == {"val_res": 32, "val_crop_ratio": 1.0} and line is None
    # a command-line flag or a user's config file is
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("data:\n  val_crop_ratio: 0.875\n")
    explicit = explicit_data_keys(["predict", "--config", str(cfg), "--data.val_res=64"], implicit_configs=[DEMO])
    assert {"val_res", "val_crop_ratio"} <= explicit
    update, line = eval_settings(recorded, {"val_res": 64, "val_crop_ratio": 0.875}, explicit, "last.ckpt")
    assert update == {}
    assert line.count("\n") == 0 and "data.val_res=64" in line and "32 px" in line and "crop ratio 1" in line
    # an explicit value equal to the record: nothing to say
    assert eval_settings(recorded, {"val_res": 32, "val_crop_ratio": 1.0}, explicit, "x") == ({}, None)


def test_dataset_normalisation_is_measured_once_cached_and_recorded(folder, tmp_path, monkeypatch):
    """data.normalize=dataset: the train split's per-channel mean/std of its eval crops (checked
    against numpy), cached beside the prepared data, adopted by the model and saved in its checkpoint."""
    from datamodules import stats
    from datamodules.torchvision_backend import val_transform

    path, model, dm = _fit_checkpoint(folder, tmp_path, train_res=32, val_res=32, val_crop_ratio=1.0,
                                      normalize="dataset")
    tf = val_transform(32, 1.0)
    px = np.stack([np.asarray(tf(Image.open(p).convert("RGB")), dtype=np.float64) for p, _ in dm.samples("train")])
    mean, std = px.mean(axis=(0, 2, 3)) / 255, px.std(axis=(0, 2, 3)) / 255
    np.testing.assert_allclose(dm.normalization()[0], mean, rtol=1e-6)
    np.testing.assert_allclose(dm.normalization()[1], std, rtol=1e-6)
    dc = torch.load(path, map_location="cpu", weights_only=True)["zoo_data_config"]
    np.testing.assert_allclose(dc["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(dc["std"], std, rtol=1e-6)
    np.testing.assert_allclose(model.pixel_mean.flatten().numpy(), mean * 255, rtol=1e-5)
    # standardised train inputs: mean ~0, std ~1 per channel
    x = model.preprocess(torch.from_numpy(px).to(torch.uint8))
    np.testing.assert_allclose(x.mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(x.std(dim=(0, 2, 3)).numpy(), 1, atol=1e-2)
    cached = list((stats_dir := dm.beton_dir.parent / "stats").glob("train_mean_std_32_1.000_bilinear.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["images"] == len(dm.samples("train")), stats_dir

    def no_second_pass(*a, **k):
        raise AssertionError("measured again instead of read from the cache")

    monkeypatch.setattr(stats, "measure", no_second_pass)
    again = ImageNetDataModule(root=str(folder), backend="torchvision", val_res=32, val_crop_ratio=1.0, normalize="dataset")
    np.testing.assert_allclose(again.normalization()[0], mean, rtol=1e-6)
    assert ImageNetDataModule(root=str(folder), backend="torchvision").normalization() is None  # imagenet: the model's


def test_normalize_option_is_checked():
    from datamodules.imagenet import DataError

    with pytest.raises(DataError, match="normalize='mean'.*imagenet.*dataset"):
        ImageNetDataModule(backend="torchvision", normalize="mean")


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_every_loading_path_evaluates_as_trained(tmp_path, capsys, caplog):
    """convnet trained at 32 px (its registered size is 64) on a tiny ImageFolder through `zoo fit`
    with the demo recipe: predict (a labelled folder and a folder of photos), validate, zoo.load +
    eval_transform, torch.hub.load, landscape and gradcheck/init-stats all use 32 px and reproduce
    the fit's own last validation (loss and top-1) or the reference computed at 32 px."""
    import zoo
    from launch import landscape as zland
    from launch.cli import main

    root = make_image_folder(tmp_path / "data", classes=CLASSES, per_class=(8, 4), size_range=(40, 70))
    flat = tmp_path / "photos"
    flat.mkdir()
    for p in sorted((root / "val").glob("*/*.JPEG")):
        (flat / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    base = ["--data.root", str(root), "--data.backend", "torchvision", "--data.num_workers", "0",
            "--data.batch_size", "8", "--run.logger", "csv", "--trainer.enable_progress_bar", "false"]
    rc = main(["fit", "--config", "demo", *base, "--data.train_res", "32", "--data.val_res", "32", "--data.val_crop_ratio", "1.0",
               "--trainer.max_epochs", "2", "--run.root", str(tmp_path / "runs"), "--run.dashboard", "false"])
    out = capsys.readouterr().out
    assert rc == 0, out
    ckpt = Path(out.split("last checkpoint: ")[1].split()[0])
    fit_acc = float(out.split("val/acc1: ")[1].split()[0])
    metrics = [r for r in _read_csv(ckpt.parent.parent / "csv" / "metrics.csv") if r.get("val/loss")]
    fit_loss = float(metrics[-1]["val/loss"])

    # validate, the README's way: no --config (the demo recipe's val_res 64 is not a choice of the user's)
    rc = main(["validate", *base[:2], "--data.backend", "torchvision", "--data.num_workers", "0",
               "--model.weights", str(ckpt), "--run.root", str(tmp_path / "val"), "--run.logger", "csv",
               "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    assert rc == 0
    assert float(out.split("val/acc1: ")[1].split()[0]) == pytest.approx(fit_acc, abs=1e-4)  # printed with 4 decimals
    vmetrics = [r for r in _read_csv(next((tmp_path / "val").rglob("metrics.csv"))) if r.get("val/loss")]
    assert float(vmetrics[-1]["val/loss"]) == pytest.approx(fit_loss, rel=1e-4)

    # the reference: the checkpoint's network on the val images through the recorded transform
    model = zoo.load(weights=str(ckpt)).eval()
    assert model.data_config["input_size"] == 32 and model.class_names == list(CLASSES)
    tf = model.eval_transform()
    paths = sorted(flat.iterdir())
    with torch.no_grad():
        ref = model(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])).softmax(-1)
    labels = torch.tensor([CLASSES.index(p.name.split("_")[0]) for p in paths])
    assert (ref.argmax(1) == labels).float().mean().item() == pytest.approx(fit_acc, abs=1e-4)  # printed with 4 decimals

    # predict on a folder of photos: one load line, class names, the reference's classes
    import logging

    caplog.set_level(logging.INFO)
    caplog.clear()
    rc = main(["predict", "--data.root", str(flat), "--data.backend", "torchvision", "--data.num_workers", "0",
               "--model.weights", str(ckpt), "--run.root", str(tmp_path / "pred"), "--run.logger", "none",
               "--trainer.enable_progress_bar", "false"])
    capsys.readouterr()
    said = "\n".join(r.getMessage() for r in caplog.records)
    assert rc == 0
    assert said.count("loaded weights from") == 1 and "head not loaded" not in said, said
    rows = _read_csv(next((tmp_path / "pred").rglob("predictions.csv")))
    by_path = {Path(r["path"]).name: r for r in rows}
    predicted = [by_path[p.name]["class_1"] for p in paths]
    assert predicted == [CLASSES[i] for i in ref.argmax(1).tolist()]
    np.testing.assert_allclose([float(by_path[p.name]["prob_1"]) for p in paths], ref.max(1).values.numpy(), atol=2e-3)

    # an explicit override differing from the record: used, and said in one line
    rc = main(["predict", "--data.root", str(flat), "--data.backend", "torchvision", "--data.num_workers", "0",
               "--data.val_res", "48", "--model.weights", str(ckpt), "--run.root", str(tmp_path / "pred2"),
               "--run.logger", "none", "--trainer.enable_progress_bar", "false"])
    printed = capsys.readouterr().out
    assert rc == 0 and sum("instead of the recorded eval size 32 px" in ln for ln in printed.splitlines()) == 1

    # torch.hub.load
    hub = torch.hub.load(str(REPO), "convnet", source="local", weights=str(ckpt), trust_repo=True).eval()
    assert hub.data_config == model.data_config
    with torch.no_grad():
        torch.testing.assert_close(hub(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])).softmax(-1), ref)

    # landscape: the centre of the surface is the checkpoint's own loss at 32 px
    assert zland.main([str(ckpt), "--data.root", str(root), "--images", "24", "--steps", "3", "--grid", "2",
                       "--wandb", "false", "--out_dir", str(tmp_path / "land")]) == 0
    printed = capsys.readouterr().out
    assert "at 32 px" in printed
    centre = float(printed.split("d1: loss ")[1].split()[0])
    x, y = zland.load_subset(str(root), 24, 32, 1.0, 0, "bilinear")
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(model.preprocess(x)), y).item()
    assert centre == pytest.approx(want, abs=1e-3)

    # gradcheck / init-stats on the checkpoint: its recorded size
    from launch.model_checks_cmd import gradcheck_main, init_stats_main

    assert gradcheck_main([str(ckpt), "--per_tensor", "1", "--out_dir", str(tmp_path / "gc")]) == 0
    assert "input (3, 32, 32)" in capsys.readouterr().out
    assert init_stats_main([str(ckpt), "--batch_size", "4", "--out_dir", str(tmp_path / "is")]) == 0
    assert "input (3, 32, 32)" in capsys.readouterr().out
