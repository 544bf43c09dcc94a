"""The `zoo` command end to end: fit through LightningCLI, bad input, every recipe, DDP, Slurm."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "launch" / "recipes").glob("*.yaml"))
ZOO = str(Path(sys.executable).with_name("zoo"))

# Small, fast overrides that keep everything else the recipe says.
CPU_TINY = [
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
    "--trainer.strategy", "auto", "--trainer.num_nodes", "1",
]


def tiny_data(root: Path, backend: str = "torchvision", res: int = 32, batch: int = 4) -> list[str]:
    return [
        "--data.root", str(root), "--data.backend", backend, "--data.batch_size", str(batch),
        "--data.num_workers", "0" if backend == "torchvision" else "1",
        "--data.train_res", str(res), "--data.val_res", str(res),
    ]


def run_zoo(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([ZOO, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_models_lists_the_registry(capsys):
    assert main(["models", "res*"]) == 0
    out = capsys.readouterr().out
    assert "resnet50" in out and "resnext50_32x4d" in out and "convnext_tiny" not in out


@pytest.mark.slow
def test_fit_end_to_end_ffcv_wandb_offline(tiny_imagenet, tmp_path):
    """`zoo fit` through the console script: FFCV loaders, W&B offline run files, checkpoint."""
    r = run_zoo(
        ["fit", "--config", str(REPO / "launch/recipes/demo.yaml"), *tiny_data(tiny_imagenet, "ffcv"),
         "--trainer.max_epochs", "1", "--run.root", str(tmp_path / "runs"), "--run.name", "e2e"],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "run directory:" in out and "val/acc1: " in out and "last checkpoint:" in out
    run_dir = Path(out.split("run directory: ")[1].splitlines()[0])
    assert run_dir.parent == tmp_path / "runs" / "e2e"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()  # the resolved config travels with the run
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline, "no W&B offline run file"


def test_fast_dev_run_through_cli_in_process(tiny_imagenet, tmp_path, capsys):
    rc = main(["fit", "--config", str(REPO / "launch/recipes/demo.yaml"), *tiny_data(tiny_imagenet),
               "--trainer.fast_dev_run", "1", "--run.root", str(tmp_path), "--run.logger", "csv"])
    assert rc == 0
    assert "run directory:" in capsys.readouterr().out


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluate_subcommands_with_weights(subcommand, tiny_imagenet, tmp_path, capsys):
    import torch

    from zoo import create_network

    torch.save(create_network("convnet", num_classes=3).state_dict(), tmp_path / "w.pth")
    rc = main([subcommand, "--config", str(REPO / "launch/recipes/demo.yaml"), *tiny_data(tiny_imagenet),
               "--model.weights", str(tmp_path / "w.pth"), "--run.root", str(tmp_path), "--run.logger", "none"])
    assert rc == 0
    out = capsys.readouterr().out
    if subcommand != "predict":
        assert f"{'val' if subcommand == 'validate' else 'test'}/acc1: " in out


def test_last_checkpoint_is_the_newest_epoch_not_the_best(tiny_imagenet, tmp_path, capsys):
    import torch

    # lr ~ 0: val/acc1 hardly moves, so the best epoch is usually an early one
    rc = main(["fit", "--config", str(REPO / "launch/recipes/demo.yaml"), *tiny_data(tiny_imagenet),
               "--trainer.max_epochs", "3", "--model.lr", "1e-12", "--model.weight_decay", "0",
               "--run.root", str(tmp_path), "--run.logger", "none"])
    assert rc == 0
    out = capsys.readouterr().out
    best = Path(out.split("best checkpoint: ")[1].splitlines()[0])
    last = Path(out.split("last checkpoint: ")[1].splitlines()[0])
    assert last.name == "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 2
    # (BN statistics still move at lr ~ 0, so which epoch is best is not asserted)
    assert best.parent == last.parent and best != last


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model.arch", "resnet5"], "unknown model 'resnet5'. Did you mean"),
        (["--model.arch", "timm/resnet5x"], "unknown timm architecture"),
        (["--data.root", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
        (["--model.weights", "/nonexistent/w.pth"], "/nonexistent/w.pth"),
    ],
)
def test_user_mistakes_end_in_one_line(args, expected, tmp_path, capsys, tiny_imagenet):
    base = ["fit", "--config", str(REPO / "launch/recipes/demo.yaml"), *tiny_data(tiny_imagenet),
            "--trainer.fast_dev_run", "1", "--run.root", str(tmp_path), "--run.logger", "none"]
    rc = main(base + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    # one line that names the problem (Lightning's own warnings may come before it)
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and expected in errors[0], err
    assert not any("Traceback" in line for line in err)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_runs_one_tiny_step(recipe, tiny_imagenet, tmp_path):
    """Each recipe file parses, builds its model/callbacks/augmentations and trains one step."""
    rc = main(["fit", "--config", str(recipe), *CPU_TINY, *tiny_data(tiny_imagenet, batch=2),
               "--trainer.fast_dev_run", "1", "--run.root", str(tmp_path), "--run.logger", "none"])
    assert rc == 0


def test_recipes_state_their_lr_reference_batch():
    import yaml

    for recipe in RECIPES:
        cfg = yaml.safe_load(recipe.read_text())
        assert "lr_reference_batch" in cfg["model"], recipe.name


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_two_processes_through_the_cli(tiny_imagenet, tmp_path):
    """Two real DDP processes (gloo, CPU) started by Lightning from `zoo fit`: one run directory,
    one report. (FFCV's distributed loader under DDP: tests/test_data_ddp.py; a global batch that
    does not divide by the world size: tests/test_data.py.)"""
    r = run_zoo(
        ["fit", "--config", str(REPO / "launch/recipes/demo.yaml"), *tiny_data(tiny_imagenet, batch=6),
         "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
         "--trainer.max_epochs", "1", "--run.root", str(tmp_path), "--run.logger", "csv"],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("run directory:") == 1 and "val/acc1: " in r.stdout
    run_dirs = list((tmp_path / "convnet").iterdir())
    assert len(run_dirs) == 1  # both ranks agreed on one run directory


def _slurm_ready() -> bool:
    if not shutil.which("sbatch"):
        return False
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=10)
    return r.returncode == 0 and r.stdout.strip().split("\n")[0] in ("idle", "mix", "alloc")


@pytest.mark.slow
@pytest.mark.slurm
def test_sbatch_launches_two_ddp_tasks(tiny_imagenet, tmp_path):
    """launch/slurm/train.sbatch on the local Slurm: srun starts 2 tasks, Lightning forms DDP."""
    if not _slurm_ready():
        pytest.fail("local Slurm is not up: run launch/slurm/local_cluster.sh start (make test does)")
    out = tmp_path / "job.out"
    r = subprocess.run(
        ["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
         "--time=10", f"--output={out}", "--chdir", str(REPO),
         str(REPO / "launch/slurm/train.sbatch"), "demo",
         *tiny_data(tiny_imagenet, "torchvision", batch=6), "--trainer.accelerator", "cpu",
         "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
         "--run.root", str(tmp_path / "runs"), "--run.logger", "csv"],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "ZOO_HOME": str(REPO)},
    )
    log = out.read_text() if out.exists() else ""
    assert r.returncode == 0, (r.stderr, log[-3000:])
    job_id = r.stdout.strip().split()[-1]
    assert "val/acc1: " in log
    # the run directory names the job and its srun step (a requeue gets it back)
    assert (tmp_path / "runs" / "convnet" / f"slurm-{job_id}.0" / "checkpoints" / "last.ckpt").is_file()
    # Lightning saw the Slurm world: 2 processes (GLOBAL_RANK 0 and 1) in one job
    assert "GLOBAL_RANK: 1" in log or "MEMBER: 2/2" in log, log[-3000:]
    # task/affinity (local_cluster.sh) binds each rank to its --cpus-per-task=1 core, disjoint
    cpus = {int(line.split()[2]): line.split("cpus ")[1] for line in log.splitlines() if line.startswith("zoo: rank ")}
    print("per-rank CPU sets:", cpus)
    assert sorted(cpus) == [0, 1], log[-3000:]
    sets = [set(map(int, v.strip("[]").split(","))) for v in cpus.values()]
    assert all(len(s) == 1 for s in sets) and not sets[0] & sets[1], cpus
