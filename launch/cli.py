"""`zoo` command line: LightningCLI over ImageClassifier + ImageNetDataModule.

    zoo fit                                   # embedded synthetic dataset, demo recipe
    zoo fit --config launch/recipes/resnet50.yaml --data.root /data/imagenet
    zoo validate --config ... --model.weights runs/.../checkpoints/last.ckpt
    zoo models [PATTERN]                      # list registered architectures

Every run writes under one run directory (``--run.root/<name>/<id>``): the resolved
config, checkpoints and logs (W&B offline by default; ``wandb sync <dir>`` uploads later).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from datamodules.imagenet import DataError, ImageNetDataModule, count_classes
from zoo.base import ImageClassifier
from zoo.registry import UnknownModelError

RECIPES = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = RECIPES / "demo.yaml"


def _user_errors() -> tuple[type[BaseException], ...]:
    from zoo.weights import WeightsError

    return (DataError, UnknownModelError, WeightsError, FileNotFoundError)


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_id() -> str:
    """One id shared by all ranks of a run.

    Slurm and torchrun start every rank independently, so their job ids name the run; a
    Lightning-spawned DDP child inherits ZOO_RUN_ID from rank 0's environment.
    """
    if os.environ.get("ZOO_RUN_ID"):
        return os.environ["ZOO_RUN_ID"]
    if os.environ.get("SLURM_JOB_ID"):
        rid = f"slurm-{os.environ['SLURM_JOB_ID']}"
    elif os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        rid = f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    else:
        rid = time.strftime("%Y%m%d-%H%M%S")
    os.environ["ZOO_RUN_ID"] = rid
    return rid


def _num_classes_or_placeholder(root: Optional[str]) -> int:
    # jsonargparse wraps a link's exception in a usage dump: a bad root gets its one-line
    # DataError from the DataModule instead, which validates the folder again.
    try:
        return count_classes(root)
    except DataError:
        return 2  # the smallest a classifier takes; never trained: the DataModule raises


class ZooCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run.root", type=str, default="runs", help="parent of all run directories")
        parser.add_argument("--run.name", type=Optional[str], default=None, help="default: the model's arch")
        parser.add_argument(
            "--run.logger",
            type=str,
            default="wandb",
            choices=["wandb", "csv", "tensorboard", "none"],
            help="wandb runs offline unless WANDB_MODE=online",
        )
        parser.add_argument("--run.project", type=str, default="lightning-zoo", help="W&B project")
        parser.add_argument("--run.checkpoint_every_n_epochs", type=int, default=1)
        # Classes come from the data; preprocessing comes from the model (DESIGN.md).
        parser.link_arguments("data.root", "model.num_classes", compute_fn=_num_classes_or_placeholder)
        parser.link_arguments("model.data_config", "data.data_config", apply_on="instantiate")

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self.subcommand is None:
            return
        self._adopt_checkpoint_data_config()
        self._check_class_count()

    def _adopt_checkpoint_data_config(self) -> None:
        """--ckpt_path: the DataModule gets the checkpoint's preprocessing, as the model does.

        The model takes the checkpoint's data config in on_load_checkpoint, after the
        DataModule was built from the architecture's default; rebuild the DataModule with it
        (crop ratio, interpolation, eval size), so --ckpt_path agrees with --model.weights.
        """
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc") or not Path(ckpt_path).is_file():
            return
        import torch

        try:  # mmap: only the small entries are read, not the tensors
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # legacy (non-zip) files cannot be mmapped; pickled paths need allow-listing
            from zoo.weights.sources import _torch_load

            ckpt = _torch_load(Path(ckpt_path))
        dc = ckpt.get("zoo_data_config") if isinstance(ckpt, dict) else None
        if not dc or dict(dc) == dict(self.model.data_config):
            return
        self.model._set_data_config(dict(dc))
        dm = self.datamodule
        accepted = inspect.signature(type(dm).__init__).parameters if dm is not None else {}
        if "data_config" in accepted:
            kwargs = {k: v for k, v in dict(dm.hparams).items() if k in accepted}  # not _instantiator
            self.datamodule = type(dm)(**{**kwargs, "data_config": dict(dc)})

    def _check_class_count(self) -> None:
        """validate/test/predict with weights of another class count: an error, not a new head."""
        report = getattr(self.model, "weights_report", None)
        if self.subcommand == "fit" or report is None or report.head_reset is None:
            return
        have, want = report.head_reset
        root = self.config[self.subcommand]["data"].get("root")
        try:
            count_classes(root)
        except DataError:  # unlabelled data (predict on a folder of images): no count to compare
            if self.subcommand == "predict" and have is not None:
                # the weights' own head, not a placeholder one: rebuild with their class count
                accepted = inspect.signature(type(self.model).__init__).parameters
                hp = {k: v for k, v in dict(self.model.hparams).items() if k in accepted}
                self.model = type(self.model)(**{**hp, "num_classes": have})
                rank_zero_info(f"predict: unlabelled data, the model keeps the {have} classes of its weights")
            return
        from zoo.weights import WeightsError

        had = f"{have} classes" if have is not None else "no classifier"
        raise WeightsError(
            f"{self.subcommand}: the weights {report.source} have {had} but the data has {want}: "
            f"{self.subcommand} them on data with the same classes, or fine-tune first (zoo fit --model.weights ...)"
        )

    def instantiate_trainer(self, **kwargs):
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        raw = self.config[self.subcommand] if self.subcommand else self.config
        run = raw["run"]
        arch = raw["model"]["arch"]
        name = run["name"] or arch.replace("/", "_")
        run_dir = Path(run["root"]).expanduser().resolve() / name / run_id()
        self.run_dir = run_dir
        trainer_cfg = cfg["trainer"]
        callbacks = list(trainer_cfg.get("callbacks") or [])
        if self.subcommand == "fit":
            if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
                every = run["checkpoint_every_n_epochs"]
                callbacks += [
                    ModelCheckpoint(  # the best epoch by val/acc1
                        dirpath=run_dir / "checkpoints",
                        # no "/" in file names: the metric is val/acc1
                        filename="epoch={epoch:03d}-val_acc1={val/acc1:.4f}",
                        auto_insert_metric_name=False,
                        monitor="val/acc1",
                        mode="max",
                        every_n_epochs=every,
                    ),
                    # The newest epoch, to resume from. Not save_last=True: Lightning 2.6 writes
                    # last.ckpt only when the monitored checkpoint is saved, i.e. on improvement.
                    ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", every_n_epochs=every),
                ]
        logger = trainer_cfg.get("logger")
        if logger in (None, True):
            logger = self._make_logger(run["logger"], run_dir, name, run["project"])
            if logger is not False and self.subcommand == "fit":
                callbacks.append(LearningRateMonitor(logging_interval="step"))
        trainer_cfg["callbacks"] = callbacks
        kwargs.setdefault("default_root_dir", str(run_dir))
        kwargs.setdefault("logger", logger)
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            print(f"run directory: {run_dir}", flush=True)
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"git_rev": git_revision(), "run_dir": str(run_dir)})
        return trainer

    @staticmethod
    def _make_logger(kind: str, run_dir: Path, name: str, project: str):
        if kind == "none":
            return False
        if kind == "csv":
            from lightning.pytorch.loggers import CSVLogger

            return CSVLogger(save_dir=str(run_dir), name="csv", version="")
        if kind == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            return TensorBoardLogger(save_dir=str(run_dir), name="tb", version="")
        from lightning.pytorch.loggers import WandbLogger

        offline = os.environ.get("WANDB_MODE", "offline") != "online"
        run_dir.mkdir(parents=True, exist_ok=True)
        return WandbLogger(
            save_dir=str(run_dir), project=project, name=f"{name}-{run_dir.name}", offline=offline
        )

    def after_fit(self) -> None:
        self._report()

    def after_validate(self) -> None:
        self._report()

    def after_test(self) -> None:
        self._report()

    def _report(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        for key in ("val/acc1", "val/acc5", "test/acc1", "test/acc5"):
            if key in metrics:
                print(f"{key}: {float(metrics[key]):.4f}", flush=True)
        if self.subcommand == "fit":
            for cb in trainer.checkpoint_callbacks:
                if cb.best_model_path:
                    kind = "best" if cb.monitor else "last"
                    print(f"{kind} checkpoint: {cb.best_model_path}", flush=True)
        print(f"logs: {self.run_dir}", flush=True)
        if type(trainer.logger).__name__ == "WandbLogger":  # no wandb import for other loggers
            print(f"W&B (offline): wandb sync {self.run_dir / 'wandb'} --sync-all", flush=True)


def list_models_main(argv: list[str]) -> int:
    from zoo import get_data_config, list_models

    pattern = argv[0] if argv else None
    for name in list_models(pattern):
        dc = get_data_config(name)
        print(f"{name:24s} input {dc.input_size}  crop_pct {dc.crop_pct:.3f}  {dc.interpolation}")
    print("any timm architecture: timm/<name> (e.g. timm/efficientnet_b0)")
    return 0


def _with_default_recipe(argv: list[str]) -> list[str]:
    """`zoo fit` with no --config trains the demo recipe on the embedded dataset."""
    if argv and argv[0] in ("fit", "validate", "test", "predict"):
        if not any(a in ("-c", "--config") or a.startswith("--config=") for a in argv[1:]):
            rank_zero_info(f"no --config given: using {DEFAULT_RECIPE.relative_to(RECIPES.parent.parent)}")
            return [argv[0], "--config", str(DEFAULT_RECIPE), *argv[1:]]
    return argv


# Commands that are not LightningCLI subcommands: name -> "module:function" taking argv
# (the words after the command) and returning an exit code. Imported on use, so `zoo models`
# stays fast. Add a command by adding one line here.
PLAIN_COMMANDS: dict[str, str] = {
    "models": "launch.cli:list_models_main",
    "bench": "launch.bench:main",
}


def _plain_command(name: str):
    import importlib

    module, _, func = PLAIN_COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Optional[list[str]] = None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PLAIN_COMMANDS:
        return _plain_command(argv[0])(argv[1:])
    argv = _with_default_recipe(argv)
    if from_shell:  # LightningCLI warns when given both args= and a different sys.argv
        sys.argv[1:] = argv
    errors = _user_errors()
    # in-process callers (tests, notebooks) pass args= while sys.argv is their own
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        ZooCLI(
            ImageClassifier,
            ImageNetDataModule,
            args=None if from_shell else argv,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "yaml"},
        )
    except errors as e:
        if os.environ.get("ZOO_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
