"""What a new user runs into on the first day: resuming a CSV-logged run, extending a schedule,
seeing the parameter groups, the model summary, the ensemble's row labels, an export."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from launch.cli import main
from tests.helpers import REPO, tiny_data

DEMO = str(REPO / "launch/recipes/demo.yaml")


def _run_dir(out: str) -> Path:
    return Path(out.split("run directory: ")[1].splitlines()[0])


@pytest.mark.slow
def test_csv_run_resumes_from_its_config_yaml_and_says_what_a_longer_schedule_does(tiny_imagenet, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    common = [*tiny_data(tiny_imagenet), "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
              "--run.root", str(tmp_path), "--run.logger", "csv", "--model.warmup_epochs", "0"]
    assert main(["fit", "--config", DEMO, *common, "--trainer.max_epochs", "1"]) == 0
    run = _run_dir(capsys.readouterr().out)
    assert (run / "config.yaml").is_file() and (run / "csv" / "config.yaml").is_file()
    # the README's resume command, with a longer schedule
    rc = main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
               "--trainer.max_epochs", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert _run_dir(out) == run  # the same run directory, not a new one
    assert (run / "csv" / "metrics.1.csv").is_file() and (run / "csv" / "metrics.csv").is_file()  # both parts kept
    said = [r.getMessage() for r in caplog.records if "recomputes the cosine LR schedule" in r.getMessage()]
    assert len(said) == 1 and "resume at step 2: trainer.max_epochs 1 -> 2" in said[0], said
    assert "the LR goes from 0 to 0.05 here" in said[0], said  # cosine over 2 epochs, at 1 epoch: 0.1 x 0.5


@pytest.mark.slow
def test_fit_prints_every_parameter_group_and_no_uncounted_flops_or_product_tips(tiny_imagenet, tmp_path, caplog, capfd):
    caplog.set_level(logging.INFO)
    rc = main(["fit", "--config", DEMO, *tiny_data(tiny_imagenet), "--trainer.max_epochs", "1",
               "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
               "--model.backbone_lr_scale", "0.1", "--run.root", str(tmp_path), "--run.logger", "none"])
    assert rc == 0
    out = capfd.readouterr().out
    rc = main(["validate", "--config", DEMO, *tiny_data(tiny_imagenet), "--trainer.limit_val_batches", "1",
               "--ckpt_path", out.split("last checkpoint: ")[1].splitlines()[0],
               "--run.root", str(tmp_path), "--run.logger", "none"])
    assert rc == 0
    cap = capfd.readouterr()
    everything = caplog.text + out + cap.out + cap.err
    assert "Total params" in everything  # the model summary is there
    assert "Total Flops" not in everything and "FLOPs" not in everything  # ... without a count it did not make
    assert "litmodels" not in everything
    text = "\n".join(r.getMessage() for r in caplog.records if "optimizer sgd" in r.getMessage())
    groups = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}, text
    assert "peak lr 0.01 " in groups["backbone"] and "peak lr 0.1 " in groups["head"], text
    assert groups["head"].rstrip().endswith("parameters")


def test_a_frozen_backbone_is_counted_apart():
    from zoo.base import ImageClassifier
    from zoo.optim import describe_param_groups

    m = ImageClassifier(arch="convnet", num_classes=3, freeze_backbone=True)
    frozen = sum(p.numel() for p in m.net.parameters() if not p.requires_grad)
    text = describe_param_groups(m.param_groups(0.1), frozen)
    assert "backbone" not in text and f"{frozen:,} parameters" in text.splitlines()[-1]
    assert text.splitlines()[-1].split()[0] == "frozen"


def test_ensemble_rows_are_labelled_by_run_name(tmp_path):
    from launch.ensemble import member_labels

    paths = []
    for rid in ("20261207-120000-aaaaaa", "20261207-130000-bbbbbb"):
        run = tmp_path / "very" / "long" / "scratch" / "runs" / "resnet50" / rid
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text("{}")
        paths.append(str(run / "checkpoints" / "last.ckpt"))
    best = run / "checkpoints" / "epoch=003-val_acc1=0.5000.ckpt"
    loose = tmp_path / "m0.ckpt"
    assert member_labels([*paths, str(best), str(loose)]) == [
        "resnet50/20261207-120000-aaaaaa", "resnet50/20261207-130000-bbbbbb",
        "resnet50/20261207-130000-bbbbbb/epoch=003-val_acc1=0.5000", "m0.ckpt"]
    assert member_labels([str(loose), str(tmp_path / "x" / "m0.ckpt")]) == [str(loose), str(tmp_path / "x" / "m0.ckpt")]


def test_export_writes_safetensors_with_data_config_and_class_names(tiny_imagenet, tmp_path, capsys):
    import json

    import torch
    from safetensors import safe_open

    from tests.test_base import trainer
    from zoo.base import ImageClassifier

    m = ImageClassifier(arch="convnet", num_classes=3, arch_args={"widths": [8, 16]})
    t = trainer(max_epochs=1)
    t.strategy.connect(m)
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    saved["datamodule_hyper_parameters"] = {"root": str(tiny_imagenet)}  # as `zoo fit` records it
    torch.save(saved, ckpt)
    out = tmp_path / "model.safetensors"
    assert main(["export", str(ckpt), "--to", str(out)]) == 0
    assert "class names" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == set(m.net.state_dict())
    assert meta["arch"] == "convnet" and meta["num_classes"] == "3"
    assert json.loads(meta["class_names"]) == sorted(p.name for p in (tiny_imagenet / "train").iterdir())
    assert json.loads(meta["data_config"])["input_size"] == m.data_config["input_size"]
    import zoo

    back = zoo.load(weights=str(out))
    assert torch.equal(back.net.state_dict()[next(iter(m.net.state_dict()))], next(iter(m.net.state_dict().values())))
    capsys.readouterr()
    assert main(["export", str(tmp_path / "missing.ckpt"), "--to", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
