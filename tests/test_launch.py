"""Cluster-grade launch: run ids, resume into the same run directory and W&B run, Slurm checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from launch import cli
from launch.cli import main, run_id
from tests.test_cli import REPO, tiny_data
from tests.wandb_records import history, wait_complete
from tests.wandb_records import run_id as wandb_file_run_id

DEMO = str(REPO / "launch/recipes/demo.yaml")


def _run_dir(out: str) -> Path:
    return Path(out.split("run directory: ")[-1].splitlines()[0])


def test_two_in_process_runs_get_two_run_dirs(tiny_imagenet, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ZOO_RUN_ID", raising=False)
    args = ["fit", "--config", DEMO, *tiny_data(tiny_imagenet), "--trainer.fast_dev_run", "1",
            "--run.root", str(tmp_path), "--run.logger", "none"]
    assert main(args) == 0
    first = _run_dir(capsys.readouterr().out)
    assert main(args) == 0
    second = _run_dir(capsys.readouterr().out)
    assert first != second and first.parent == second.parent
    assert "ZOO_RUN_ID" not in os.environ  # main() leaves no run id behind


def test_explicit_default_root_dir_wins(tiny_imagenet, tmp_path, capsys):
    target = tmp_path / "mine"
    assert main(["fit", "--config", DEMO, *tiny_data(tiny_imagenet), "--trainer.fast_dev_run", "1",
                 "--trainer.default_root_dir", str(target), "--run.logger", "none"]) == 0
    assert _run_dir(capsys.readouterr().out) == target


def test_run_id_rules():
    # parallel runs started in the same second differ
    assert len({run_id({}) for _ in range(50)}) == 50
    # every task of one srun step, on every node, agrees; another step of the allocation is another run
    task = {"SLURM_NTASKS": "8", "SLURM_JOB_NAME": "zoo", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"}
    assert run_id({**task, "SLURM_PROCID": "0"}) == run_id({**task, "SLURM_PROCID": "7", "SLURM_NODEID": "1"})
    assert run_id(task) == "slurm-77.0" != run_id({**task, "SLURM_STEP_ID": "1"})
    # an interactive allocation (`srun --pty bash`, then zoo fit twice): two runs
    shell = {**task, "SLURM_JOB_NAME": "bash"}
    assert run_id(shell) != run_id(shell)
    # a launcher's (or main()'s, for Lightning's DDP children) id wins
    assert run_id({**task, "ZOO_RUN_ID": "given"}) == "given"


def test_torchrun_workers_agree_through_the_agent_store():
    from datetime import timedelta

    from torch.distributed import TCPStore

    server = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10))
    env = {"TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "True",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port)}
    ids = {run_id({**env, "RANK": str(r), "GROUP_RANK": str(r // 2)}) for r in range(4)}
    assert len(ids) == 1  # "none" on every node, yet one id
    assert run_id({**env, "TORCHELASTIC_RUN_ID": "job2"}) not in ids


@pytest.mark.parametrize(
    "env, args, expected",
    [
        ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_STEP_ID": "0"},
         ["--trainer.devices", "1"], "--ntasks-per-node=2 but --trainer.devices=1"),
        ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1"}, ["--trainer.devices", "2"], "not started by srun"),
    ],
)
def test_slurm_launch_mistakes_end_in_one_line(env, args, expected, tiny_imagenet, tmp_path, capsys, monkeypatch):
    for k, v in {"SLURM_NTASKS": "2", "SLURM_JOB_ID": "5", "SLURM_JOB_NAME": "zoo", "SLURM_PROCID": "0",
                 "SLURM_LOCALID": "0", "SLURM_NODEID": "0", **env}.items():
        monkeypatch.setenv(k, v)
    rc = main(["fit", "--config", DEMO, *tiny_data(tiny_imagenet), "--trainer.accelerator", "cpu",
               "--trainer.max_epochs", "1", "--run.root", str(tmp_path), "--run.logger", "none", *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(err) == 1 and expected in err[0], err


def test_missing_recipe_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(tmp_path / "nope.yaml")])
    assert e.value.code == 2
    assert "nope.yaml" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_continues_run_dir_last_ckpt_and_wandb_run(tiny_imagenet, tmp_path, capsys, monkeypatch):
    """fit 2 epochs, move the run directory (scratch -> home, as clusters purge scratch), then
    `--ckpt_path <moved>/checkpoints/last.ckpt` to 4 epochs: training continues in the moved run
    directory, last.ckpt is epoch 3 (no last-v1.ckpt: the checkpoint's callback state names the
    old directory, so Lightning's version counter would step in), and both W&B offline parts carry
    one id with the steps continuing."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    base = ["fit", "--config", DEMO, *tiny_data(tiny_imagenet), "--trainer.log_every_n_steps", "1",
            "--run.root", str(tmp_path), "--run.logger", "wandb"]
    assert main([*base, "--trainer.max_epochs", "2"]) == 0
    scratch = _run_dir(capsys.readouterr().out)
    assert torch.load(scratch / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1
    run_dir = tmp_path / "home" / scratch.name
    run_dir.parent.mkdir()
    scratch.rename(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert main([*base, "--trainer.max_epochs", "4", "--ckpt_path", str(last)]) == 0
    assert _run_dir(capsys.readouterr().out) == run_dir
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("last*")) == ["last.ckpt"]
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 3

    wid = (run_dir / cli.WANDB_ID_FILE).read_text().strip()
    parts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(parts) == 2 and all(p.name.endswith(f"-{wid}") for p in parts), parts
    steps = []
    for part in parts:
        (run_file,) = part.glob("run-*.wandb")
        wait_complete(run_file)
        assert wandb_file_run_id(run_file) == wid
        steps.append(sorted({row["trainer/global_step"] for row in history(run_file) if "train/loss_step" in row}))
    first, second = steps
    # 9 train images / batch 4 = 3 steps per epoch (drop_last keeps 2): steps go on where they stopped
    assert first and second and second[0] == first[-1] + 1, steps
    assert first == list(range(first[0], first[-1] + 1)) and second == list(range(second[0], second[-1] + 1))
