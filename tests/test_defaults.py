"""Defaults a user can trust: a train split smaller than one batch, the defaults on a user's own
data, loader threads/workers that fit the CPUs the process may use."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamodules.imagenet import DataError, ImageNetDataModule
from launch.cli import main

from tests.helpers import REPO


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


# ----------------------------------------------------------------------------- loader threads/workers follow the CPUs


@pytest.fixture
def cpus(monkeypatch):
    """``cpus(affinity, machine)``: this process may use ``affinity`` of the machine's ``machine`` CPUs."""
    import os

    def set_(affinity: int, machine: int) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: machine)

    return set_


def test_default_workers_follow_the_affinity(cpus):
    from datamodules.cpus import loader_workers

    cpus(1, 16)  # a Slurm task with --cpus-per-task=1
    assert loader_workers(None) == 1 and loader_workers(None, local_processes=4) == 1
    cpus(6, 16)  # bound to 6 CPUs (each rank its own): all of them, whatever the local processes
    assert loader_workers(None, local_processes=2) == 6
    cpus(16, 16)  # nothing bound, two processes of this node share the machine: half each
    assert loader_workers(None) == 16 and loader_workers(None, local_processes=2) == 8


def test_a_larger_explicit_count_is_lowered_with_one_line(cpus, caplog):
    import logging

    from datamodules.cpus import loader_workers

    cpus(1, 16)
    caplog.set_level(logging.INFO)
    assert loader_workers(2) == 1
    said = [r.getMessage() for r in caplog.records if "lowered" in r.getMessage()]
    assert said == ["data.num_workers=2 lowered to 1: this process may use 1 CPU(s) (its affinity, e.g. Slurm's "
                    "--cpus-per-task); ask for more CPUs or set data.num_workers <= 1"], said
    caplog.clear()
    assert loader_workers(1) == 1 and loader_workers(0) == 0  # at or below: as given (0: torchvision in-process)
    assert not [r for r in caplog.records if "lowered" in r.getMessage()]


@pytest.mark.parametrize("backend", ["torchvision", "ffcv"])
def test_both_backends_build_their_loader_with_the_fitted_count(backend, tiny_imagenet, tmp_path, cpus, monkeypatch):
    if backend == "ffcv":
        pytest.importorskip("ffcv")
        import ffcv.loader

        seen = {}

        class Loader:  # what make_loader passes to ffcv's Loader (ffcv compiles and starts threads on iteration)
            def __init__(self, path, **kw):
                seen.update(kw)
                raise RuntimeError("stop")

        monkeypatch.setattr(ffcv.loader, "Loader", Loader)
    dm = ImageNetDataModule(root=str(tiny_imagenet), backend=backend, num_workers=4, batch_size=6, train_res=16,
                            val_res=16, max_resolution=32, beton_dir=str(tmp_path / "betons"), progress=False)
    dm.setup("fit")
    cpus(1, 16)
    if backend == "torchvision":
        assert dm.backend.loader("train", train=True, rank=0, world_size=1).num_workers == 1
    else:
        with pytest.raises(RuntimeError, match="stop"):
            dm.backend.loader("train", train=True, rank=0, world_size=1)
        assert seen["num_workers"] == 1
    assert dm.num_workers == 1


@pytest.mark.slow
@pytest.mark.slurm
def test_sbatch_one_cpu_per_task_with_ffcv_trains(tiny_imagenet, tmp_path):
    """train.sbatch, 2 tasks x --cpus-per-task=1 on the local Slurm (task/affinity binds each rank
    to its core), FFCV backend, data.num_workers 2: numba allows one thread per rank; the loader
    uses 1 and says so, instead of ffcv's Compiler.set_num_threads raising in numba."""
    import os
    import subprocess

    from tests.helpers import tiny_data
    from tests.test_cli import _slurm_ready

    if not _slurm_ready():
        pytest.fail("local Slurm is not up: run launch/slurm/local_cluster.sh start (make test does)")
    out = tmp_path / "job.out"
    r = subprocess.run(
        ["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0",
         "--time=10", f"--output={out}", "--chdir", str(REPO), str(REPO / "launch/slurm/train.sbatch"), "demo",
         *tiny_data(tiny_imagenet, "ffcv", batch=6), "--data.num_workers", "2", "--data.max_resolution", "64",
         "--data.beton_dir", str(tmp_path / "betons"), "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
         "--trainer.max_epochs", "1", "--run.root", str(tmp_path / "runs"), "--run.logger", "csv"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "ZOO_HOME": str(REPO)},
    )
    log = out.read_text(errors="replace") if out.exists() else ""
    print(log[-4000:])
    assert r.returncode == 0, (r.stderr, log[-3000:])
    assert "The number of threads must be between" not in log
    assert "data.num_workers=2 lowered to 1: this process may use 1 CPU(s)" in log, log[-3000:]
    assert "val/acc1: " in log
    job_id = r.stdout.strip().split()[-1]
    assert (tmp_path / "runs" / "convnet" / f"slurm-{job_id}.0" / "checkpoints" / "last.ckpt").is_file()


# ----------------------------------------------------------------------------- no --config: demo or class defaults


def test_no_config_without_root_is_the_demo():
    from launch.defaults import DEMO_RECIPE, with_default_recipe

    argv, line = with_default_recipe(["fit", "--trainer.max_epochs", "3"])
    assert argv == ["fit", "--config", str(DEMO_RECIPE), "--trainer.max_epochs", "3"]
    assert line.startswith("no --config: launch/recipes/demo.yaml, the embedded synthetic demo")
    assert "--data.root DIR" in line


def test_no_config_with_a_users_root_is_the_class_defaults_and_says_so():
    from launch.defaults import with_default_recipe

    argv, line = with_default_recipe(["fit", "--data.root", "/data/mine", "--model.arch", "resnet18"])
    assert "--config" not in argv  # not the demo's 96 px storage, 64 px training, smoothing, warm-up
    assert argv == ["fit", "--trainer.max_epochs", "90", "--data.root", "/data/mine", "--model.arch", "resnet18"]
    assert line.startswith("no --config: the class defaults for ImageNet-like photos (resnet18, 224 px train, "
                           "224 px val (crop 0.875), batch 256, sgd lr 0.1 at batch 256, cosine, 90 epochs, "
                           "stored images <= 500 px)"), line
    assert "pass --config resnet18 for its published ImageNet recipe, or e.g. --data.train_res N" in line
    # the user's own values are the ones reported (and, coming last, the ones used)
    argv, line = with_default_recipe(["validate", "--data.root=/d", "--model.arch", "convnext_tiny",
                                      "--data.val_res", "160"])
    assert argv == ["validate", "--data.root=/d", "--model.arch", "convnext_tiny", "--data.val_res", "160"]
    assert "convnext_tiny, 224 px train, 160 px val (crop 0.949)" in line
    assert with_default_recipe(["fit", "--config", "demo", "--data.root", "/d"]) == (
        ["fit", "--config", "demo", "--data.root", "/d"], None)


def test_zoo_fit_on_a_users_folder_trains_with_the_class_defaults(tiny_imagenet, tmp_path, caplog, monkeypatch):
    import logging

    import yaml

    monkeypatch.setenv("WANDB_MODE", "offline")
    caplog.set_level(logging.INFO)
    rc = main(["fit", "--data.root", str(tiny_imagenet), "--model.arch", "convnet", "--data.backend", "torchvision",
               "--data.num_workers", "0", "--data.batch_size", "6", "--trainer.accelerator", "cpu",
               "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1", "--trainer.max_epochs", "1",
               "--run.root", str(tmp_path / "runs"), "--run.logger", "csv"])
    assert rc == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("no --config")]
    assert len(said) == 1 and said[0].startswith("no --config: the class defaults for ImageNet-like photos (convnet, 64 px")
    config = min((tmp_path / "runs").rglob("config.yaml"), key=lambda p: len(p.parts))  # RUN/config.yaml
    cfg = yaml.safe_load(config.read_text())
    data, model = cfg["data"], cfg["model"]
    assert data["max_resolution"] == 500 and data["compress_probability"] == 0.5 and data["train_res"] is None
    assert data["val_crop_ratio"] is None and model["label_smoothing"] == 0.0 and model["warmup_epochs"] == 0.0
    assert cfg["trainer"]["max_epochs"] == 1  # the user's value over the default 90


def test_one_cpu_puts_numbas_openmp_layer_before_tbb(cpus, monkeypatch):
    """numba's TBB layer hangs at exit with one CPU (numba/numba#10556): OpenMP first there."""
    numba = pytest.importorskip("numba")
    from numba.np.ufunc import parallel

    from datamodules.cpus import numba_layer_for_one_cpu

    monkeypatch.setattr(numba.config, "THREADING_LAYER_PRIORITY", ["tbb", "omp", "workqueue"])
    monkeypatch.setattr(parallel, "_is_initialized", False)
    monkeypatch.delenv("NUMBA_THREADING_LAYER", raising=False)
    monkeypatch.delenv("NUMBA_THREADING_LAYER_PRIORITY", raising=False)
    cpus(2, 16)
    assert not numba_layer_for_one_cpu() and numba.config.THREADING_LAYER_PRIORITY[0] == "tbb"
    cpus(1, 16)
    assert numba_layer_for_one_cpu() and numba.config.THREADING_LAYER_PRIORITY == ["omp", "workqueue", "tbb"]
