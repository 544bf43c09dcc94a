"""The `zoo` command end to end: fit through LightningCLI, bad input, every recipe, DDP, Slurm."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from launch.cli import main
from tests.helpers import CPU_TINY, REPO, ZOO, run_zoo, tiny_data  # noqa: F401  (re-exported)

RECIPES = sorted((REPO / "launch" / "recipes").glob("*.yaml"))


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
        cwd=tmp_path, fresh=True,  # a fresh interpreter: what a user's shell starts
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


def test_evaluating_weights_of_another_class_count_is_an_error(tiny_imagenet, tmp_path, capsys):
    """Not a silently reset head (the accuracy of a random classifier): one line, both counts.
    One check (ZooCLI, every subcommand but fit) serves validate, test and predict; a checkpoint's
    head: tests/test_loading_paths.py; ensemble members: tests/test_ensemble.py."""
    subcommand = "validate"
    import torch

    from zoo import create_network

    torch.save(create_network("convnet", num_classes=10).state_dict(), tmp_path / "w10.pth")
    rc = main([subcommand, "--config", str(REPO / "launch/recipes/demo.yaml"), *tiny_data(tiny_imagenet),
               "--model.weights", str(tmp_path / "w10.pth"), "--run.root", str(tmp_path), "--run.logger", "none"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(err) == 1, err
    assert "have 10 classes but the data has 3" in err[0] and "zoo fit --model.weights" in err[0]


def test_fine_tuning_resets_the_head_and_says_so_once(tiny_imagenet, tmp_path, caplog):
    import logging

    import torch

    from zoo import create_network

    torch.save(create_network("convnet", num_classes=10).state_dict(), tmp_path / "w10.pth")
    caplog.set_level(logging.INFO)
    rc = main(["fit", "--config", str(REPO / "launch/recipes/demo.yaml"), *tiny_data(tiny_imagenet),
               "--model.weights", str(tmp_path / "w10.pth"), "--trainer.fast_dev_run", "1",
               "--run.root", str(tmp_path), "--run.logger", "none"])
    assert rc == 0
    said = [r.getMessage() for r in caplog.records if "head not loaded" in r.getMessage()]
    assert len(said) == 1 and "weights have 10 classes, model 3 (kept its new head)" in said[0], said


def test_last_checkpoint_is_the_newest_epoch_not_the_best(tiny_imagenet, tmp_path, capsys):
    import csv

    import torch

    # lr ~ 0: val/acc1 hardly moves, so the best epoch is usually an early one
    rc = main(["fit", "--config", str(REPO / "launch/recipes/demo.yaml"), *tiny_data(tiny_imagenet),
               "--trainer.max_epochs", "3", "--model.lr", "1e-12", "--model.weight_decay", "0",
               "--run.root", str(tmp_path), "--run.logger", "csv"])
    assert rc == 0
    out = capsys.readouterr().out
    best = Path(out.split("best checkpoint: ")[1].splitlines()[0])
    last = Path(out.split("last checkpoint: ")[1].splitlines()[0])
    assert last.name == "last.ckpt" and best.parent == last.parent
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 2
    # the best file is the epoch with the highest val/acc1 as logged (the first one on ties)
    run_dir = Path(out.split("run directory: ")[1].splitlines()[0])
    rows = [r for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if r.get("val/acc1")]
    accs = {int(r["epoch"]): float(r["val/acc1"]) for r in rows}
    assert sorted(accs) == [0, 1, 2]
    best_epoch = max(accs, key=lambda e: (accs[e], -e))
    assert torch.load(best, map_location="cpu", weights_only=True)["epoch"] == best_epoch
    assert best.name == f"epoch={best_epoch:03d}-val_acc1={accs[best_epoch]:.4f}.ckpt"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model.weights", "/nonexistent/w.pth"], "/nonexistent/w.pth"),
        (["--model.arch_args", '{"init": "he"}'], "unknown init 'he'; choose one of fan_in, xavier, normal, small"),
        (["--model.arch", "mlp", "--data.train_res", "null", "--data.val_res", "null"],
         """mlp flattens images of one fixed size: give it with --model.arch_args '{"input_size": N}'"""),
        (["--model.arch", "mlp", "--model.arch_args", '{"input_size": 16}'],
         "mlp is built for 16 px images (arch_args input_size) but data.train_res is 32 and data.val_res is 32"),
        (["--model.arch", "logreg", "--data.val_res", "24"], "data.train_res 32 and data.val_res 24 differ"),
    ],
)
def test_user_mistakes_end_in_one_line(args, expected, tmp_path, capsys, tiny_imagenet):
    """(An unknown architecture or timm name, a missing data root: tests/test_bad_input.py.)"""
    base = ["fit", "--config", str(REPO / "launch/recipes/demo.yaml"), *tiny_data(tiny_imagenet),
            "--trainer.fast_dev_run", "1", "--run.root", str(tmp_path), "--run.logger", "none"]
    rc = main(base + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    # one line that names the problem (Lightning's own warnings may come before it)
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and expected in errors[0], err
    assert not any("Traceback" in line for line in err)


def _recipe(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def _combination(cfg: dict) -> tuple:
    """What a recipe builds that one real step exercises: architecture, callbacks, augmentation."""
    m = cfg["model"]
    callbacks = tuple(sorted(c["class_path"] for c in (cfg.get("trainer") or {}).get("callbacks") or []))
    augment = tuple((k, m.get(k)) for k in ("mixup_alpha", "cutmix_alpha", "random_erasing", "auto_augment"))
    return (m["arch"], repr(sorted((m.get("arch_args") or {}).items())), callbacks, augment)


def _distinct_recipes() -> list[Path]:
    seen: dict[tuple, Path] = {}
    for r in RECIPES:
        seen.setdefault(_combination(_recipe(r)), r)
    return sorted(seen.values())


def _instantiate(recipe: Path, data: Path, tmp_path: Path):
    """Parse a recipe and build its model, callbacks, DataModule and trainer without running."""
    from datamodules.imagenet import ImageNetDataModule
    from launch.zoo_cli import ZooCLI
    from zoo.base import ImageClassifier

    return ZooCLI(ImageClassifier, ImageNetDataModule, run=False, parser_kwargs={"parser_mode": "yaml"},
                  args=["--config", str(recipe), *CPU_TINY, "--data.root", str(data), "--data.backend", "torchvision",
                        "--data.num_workers", "0", "--run.root", str(tmp_path), "--run.logger", "none"])


def test_every_recipe_parses_and_instantiates(tiny_imagenet, tmp_path, monkeypatch):
    """All recipe files, networks on the meta device (shapes, no init cost); nothing runs."""
    import dataclasses

    import torch

    from zoo import base, registry

    real = registry.get_entry

    def meta_entry(name):
        entry = real(name)

        def build(**kw):
            with torch.device("meta"):
                return entry.builder(**kw)

        return dataclasses.replace(entry, builder=build)

    monkeypatch.setattr(base.registry, "get_entry", meta_entry)
    for recipe in RECIPES:
        cfg = _recipe(recipe)
        cli = _instantiate(recipe, tiny_imagenet, tmp_path)
        m = cli.model
        assert m.hparams.arch == cfg["model"]["arch"] and next(m.net.parameters()).is_meta, recipe.name
        for key, value in cfg["model"].items():  # every model key of the file reached the model
            got = m.hparams[key]
            assert (list(got) if isinstance(got, (tuple, list)) else got) == value, (recipe.name, key)
        wanted = [c["class_path"].rsplit(".", 1)[-1] for c in (cfg.get("trainer") or {}).get("callbacks") or []]
        built = [type(c).__name__ for c in cli.trainer.callbacks]
        assert all(w in built for w in wanted), (recipe.name, wanted, built)
        assert type(cli.trainer.progress_bar_callback).__name__ == "ThrottledProgressBar", recipe.name


def test_recipes_are_grouped_for_the_real_step():
    # ffcv-imagenet's 16..88-epoch files differ only in epochs and ramps: one real step covers each group
    assert len(_distinct_recipes()) < len(RECIPES)
    assert {p.stem for p in _distinct_recipes()} >= {"demo", "convnext_tiny", "resnet50_tv2"}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", _distinct_recipes(), ids=[p.stem for p in _distinct_recipes()])
def test_one_real_step_per_distinct_recipe(recipe, tiny_imagenet, tmp_path):
    """One training step per distinct (architecture, callbacks, augmentation) combination."""
    rc = main(["fit", "--config", str(recipe), *CPU_TINY, *tiny_data(tiny_imagenet, batch=2),
               "--trainer.fast_dev_run", "1", "--run.root", str(tmp_path), "--run.logger", "none"])
    assert rc == 0


# The per-step LR each recipe's source trains with, at the source's own global batch. The
# recipe's lr x (its global batch = data.batch_size x accumulate_grad_batches) / lr_reference_batch
# must give it: a wrong reference batch or accumulation would silently change the LR.
PUBLISHED_PER_STEP_LR = {
    # libffcv/ffcv-imagenet rn18_configs/rn18_*_epochs.yaml: lr 0.5, training.batch_size 1024,
    # dist.world_size 1; train_imagenet.py get_cyclic_lr uses lr.lr as is (no batch scaling)
    "resnet18*": 0.5,
    # rn50_configs/rn50_*_epochs.yaml: lr 1.7, batch_size 512 x world_size 8 = 4096 per step
    "resnet50": 1.7,
    "resnet50_ffcv_*": 1.7,
    # torchvision references/classification (ResNet50_Weights.IMAGENET1K_V2): --lr 0.5,
    # --batch-size 128 on 8 GPUs = 1024 per step; train.py does not rescale args.lr
    "resnet50_tv2": 0.5,
    # facebookresearch/ConvNeXt TRAINING.md + main.py: --lr 4e-3 at 4096 per step
    # (cosine_scheduler(args.lr, ...), no rescaling); the resnext50 recipe reuses it
    "convnext_tiny": 4e-3,
    "resnext50_32x4d": 4e-3,
    # this project's own choice, measured on the 2-core machine (docs/benchmarks.md, "Demo"): 0.1 at 64
    "demo": 0.1,
    # this project's own choice for the new head, at batch 16 (docs/fine-tuning.md, worked example)
    "finetune_*": 0.05,
}


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_lr_gives_the_published_per_step_lr(recipe):
    import fnmatch

    cfg = _recipe(recipe)
    matches = [v for pat, v in PUBLISHED_PER_STEP_LR.items() if fnmatch.fnmatch(recipe.stem, pat)]
    assert len(matches) == 1, f"{recipe.name}: add its source's per-step LR to PUBLISHED_PER_STEP_LR"
    m, trainer = cfg["model"], cfg.get("trainer") or {}
    global_batch = cfg["data"]["batch_size"] * trainer.get("accumulate_grad_batches", 1)
    ref = m.get("lr_reference_batch", 256)  # ImageClassifier's default
    effective = m["lr"] * global_batch / ref if ref else m["lr"]
    assert effective == pytest.approx(matches[0], rel=1e-9), (recipe.name, global_batch, ref)


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


@pytest.mark.parametrize("value, expected", [("1", 1), ("3", 3), ("1.0", 1.0), ("0.25", 0.25)])
def test_limit_batches_one_means_one_batch(value, expected, tmp_path, tiny_imagenet):
    """``--trainer.limit_train_batches 1`` is one batch (an int), as Trainer(limit_train_batches=1);
    ``1.0`` stays 100 %. On the command line and in a YAML file alike."""
    from launch.zoo_cli import ZooCLI
    from datamodules.imagenet import ImageNetDataModule
    from zoo.base import ImageClassifier

    recipe = tmp_path / "limits.yaml"
    recipe.write_text(f"trainer:\n  limit_val_batches: {value}\n")
    cli = ZooCLI(ImageClassifier, ImageNetDataModule, run=False, parser_kwargs={"exit_on_error": False},
                 args=["--config", str(REPO / "launch/recipes/demo.yaml"), "--config", str(recipe),
                       *tiny_data(tiny_imagenet), "--trainer.limit_train_batches", value,
                       "--run.root", str(tmp_path), "--run.logger", "none"])
    for got in (cli.trainer.limit_train_batches, cli.trainer.limit_val_batches):
        assert got == expected and type(got) is type(expected)


def test_fixed_input_model_takes_the_data_resolution(tmp_path, tiny_imagenet):
    """``--model.arch mlp`` without input_size on 32 px data: built for 32 px (~1.6 M parameters
    at width 512), not the registry's 224 (77 M), and its data config says 32."""
    from launch.zoo_cli import ZooCLI
    from datamodules.imagenet import ImageNetDataModule
    from zoo.base import ImageClassifier

    cli = ZooCLI(ImageClassifier, ImageNetDataModule, run=False, parser_kwargs={"exit_on_error": False},
                 args=["--config", str(REPO / "launch/recipes/demo.yaml"), *tiny_data(tiny_imagenet),
                       "--model.arch", "mlp", "--run.root", str(tmp_path), "--run.logger", "none"])
    assert cli.model.net.input_shape == (3, 32, 32) and cli.model.hparams.arch_args["input_size"] == 32
    assert sum(p.numel() for p in cli.model.parameters()) < 2_000_000
    assert cli.model.data_config["input_size"] == 32 and cli.datamodule.val_resolution == 32
