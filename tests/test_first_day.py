"""What a new user runs into on the first day: resuming a CSV-logged run, extending a schedule,
seeing the parameter groups, the model summary, the ensemble's row labels, an export."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from launch.cli import main
from tests.test_cli import REPO, tiny_data

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
    from zoo.base import ImageClassifier, describe_param_groups

    m = ImageClassifier(arch="convnet", num_classes=3, freeze_backbone=True)
    frozen = sum(p.numel() for p in m.net.parameters() if not p.requires_grad)
    text = describe_param_groups(m.param_groups(0.1), frozen)
    assert "backbone" not in text and f"{frozen:,} parameters" in text.splitlines()[-1]
    assert text.splitlines()[-1].split()[0] == "frozen"
