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
import secrets
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from callbacks.fit_diagnosis import FitDiagnosis
from datamodules.imagenet import DataError, ImageNetDataModule, count_classes
from zoo.base import ImageClassifier
from zoo.registry import UnknownModelError

RECIPES = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = RECIPES / "demo.yaml"


def _user_errors() -> tuple[type[BaseException], ...]:
    from zoo.weights import WeightsError

    return (DataError, UnknownModelError, WeightsError, FileNotFoundError, LaunchError)


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


class LaunchError(RuntimeError):
    """A launch mistake (Slurm tasks vs devices, no srun) that the CLI answers in one line."""


def new_run_id() -> str:
    """Date for sorting plus 6 random hex digits: parallel runs started in the same second differ."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _slurm_step(env: Mapping[str, str]) -> Optional[str]:
    """``JOBID.STEPID`` when this process is a task that srun started (Lightning's SLURMEnvironment).

    Every task of one srun step shares it, on every node, and a requeued job gets it back
    (same job id, its first srun is step 0 again), so the requeued run finds its run directory
    and hpc checkpoint. Two sruns in one allocation are two steps, hence two runs.
    """
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None  # Lightning's _is_slurm_interactive_mode: the user starts processes himself
    job, step = env.get("SLURM_JOB_ID"), env.get("SLURM_STEP_ID")
    if not job or step is None or not step.isdigit() or int(step) >= 0xFFFFFFF0:
        return None  # the batch script itself (no srun): SLURM_STEP_ID unset or a special step
    return f"{job}.{step}"


def _torchrun_agreed_id(env: Mapping[str, str]) -> Optional[str]:
    """A fresh id that every torchrun worker, on every node, reads back from the agent's store.

    torchrun's rendezvous id is the user's (often reused, or "none" on every node); the
    elastic agent's TCPStore at MASTER_ADDR:MASTER_PORT is what all workers of one run share.
    """
    if "TORCHELASTIC_RUN_ID" not in env or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=120))
    key = f"zoo/run_id/{env['TORCHELASTIC_RUN_ID']}"
    return store.compare_set(key, "", new_run_id()).decode()


def run_id(env: Optional[Mapping[str, str]] = None) -> str:
    """The id of this run: different for every run, the same on every rank and node.

    - ``ZOO_RUN_ID`` if set: by the user, or by ``main()`` for the DDP processes Lightning
      starts (they inherit rank 0's environment while it runs);
    - ``slurm-JOBID.STEPID`` for a task started by srun (stable across a requeue), or
      ``slurm-JOBID.batch`` in a one-task batch script without srun;
    - a fresh id agreed through torchrun's agent store for torchrun workers;
    - else a fresh id.
    """
    env = os.environ if env is None else env
    if env.get("ZOO_RUN_ID"):
        return env["ZOO_RUN_ID"]
    step = _slurm_step(env)
    if step:
        return f"slurm-{step}"
    if env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS") == "1" and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        # a one-task batch script running `zoo fit` without srun: Lightning requeues it too, and
        # the requeued script must find the same directory (its hpc checkpoint) again
        return f"slurm-{env['SLURM_JOB_ID']}.batch"
    return _torchrun_agreed_id(env) or new_run_id()


def check_slurm_launch(devices, num_nodes: int, env: Optional[Mapping[str, str]] = None) -> None:
    """Fail in one line, before any process group waits, where a Slurm launch cannot work."""
    env = os.environ if env is None else env
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return
    ntasks = int(env["SLURM_NTASKS"])
    if _slurm_step(env) is None and ntasks > 1:
        raise LaunchError(
            f"Slurm job {env.get('SLURM_JOB_ID')} has {ntasks} tasks but this process was not started by srun "
            "(every task would wait for the others): run `srun zoo fit ...`, as launch/slurm/train.sbatch does"
        )
    per_node = env.get("SLURM_NTASKS_PER_NODE")
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if per_node and per_node.isdigit() and isinstance(devices, int) and int(per_node) != devices:
        raise LaunchError(
            f"--ntasks-per-node={per_node} but --trainer.devices={devices}: Slurm starts one task per device, "
            f"so set both to the same number (train.sbatch passes --trainer.devices {per_node} itself)"
        )
    nnodes = env.get("SLURM_NNODES")
    if nnodes and nnodes.isdigit() and int(nnodes) != num_nodes:
        raise LaunchError(f"Slurm gave {nnodes} nodes but --trainer.num_nodes={num_nodes}: set them equal")


WANDB_ID_FILE = "wandb_id"  # in the run directory: a resume or requeue continues the same W&B run


def wandb_run_id(run_dir: Path) -> str:
    """The run directory's W&B id, created on first use (rank 0 only calls this)."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    # W&B's own form (wandb.sdk.lib.runid): 8 characters of [a-z0-9]
    wid = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(wid + "\n")
    os.replace(tmp, path)
    return wid


def _requeue_aware_wandb_logger():
    """WandbLogger that logs nothing after Lightning's Slurm requeue handler finalized it.

    On SIGUSR1 Lightning calls ``logger.finalize("finished")``, saves the hpc checkpoint at step
    N and requeues; the ranks train on until Slurm's SIGTERM arrives. Steps logged then would be
    logged again by the resumed job, which starts from step N: they are dropped instead, so the
    W&B run's steps continue without a repeat. (Imported on use: no wandb import for other loggers.)
    """
    from lightning.pytorch.loggers import WandbLogger

    class ZooWandbLogger(WandbLogger):
        _requeued = False

        def finalize(self, status: str) -> None:
            if status == "finished":  # only SignalConnector._slurm_sigusr_handler_fn says "finished"
                self._requeued = True
            super().finalize(status)

        def log_metrics(self, metrics, step=None) -> None:
            if not self._requeued:
                super().log_metrics(metrics, step)

    return ZooWandbLogger


def _resumed_run_dir(ckpt_path: Optional[str]) -> Optional[Path]:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/x.ckpt`` or ``<run>/hpc_ckpt_N.ckpt``)."""
    if not ckpt_path or ckpt_path in ("last", "hpc", "best", "registry"):
        return None
    ckpt = Path(ckpt_path).expanduser().resolve()
    for d in (ckpt.parent.parent, ckpt.parent) if ckpt.parent.name == "checkpoints" else (ckpt.parent,):
        if (d / WANDB_ID_FILE).is_file() or (d / "config.yaml").is_file():
            return d
    return None


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
        parser.add_argument("--run.dashboard", type=bool, default=True,
                            help="throughput/MFU, augmented-image grid, confusion matrix, confident mistakes")
        # Lightning's ThroughputMonitor default is 100 batches; 50 gives a first figure sooner
        parser.add_argument("--run.throughput_window", type=int, default=50, help="batches per throughput figure")
        parser.add_argument(
            "--run.monitor", type=str, default="val/acc1",
            help="metric (max) that picks the best checkpoint; val_ema/acc1 with callbacks.ema.WeightEMA",
        )
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
        trainer_cfg = cfg["trainer"]
        check_slurm_launch(trainer_cfg.get("devices"), trainer_cfg.get("num_nodes") or 1)
        if trainer_cfg.get("default_root_dir"):  # the user's explicit choice wins
            run_dir = Path(trainer_cfg["default_root_dir"]).expanduser().resolve()
        else:
            run_dir = _resumed_run_dir(raw.get("ckpt_path")) or Path(run["root"]).expanduser().resolve() / name / run_id()
        self.run_dir = run_dir
        callbacks = list(trainer_cfg.get("callbacks") or [])
        if self.subcommand == "fit":
            if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
                every = run["checkpoint_every_n_epochs"]
                monitor = run.get("monitor") or "val/acc1"
                callbacks += [
                    ModelCheckpoint(  # the best epoch by the monitored metric (val/acc1)
                        dirpath=run_dir / "checkpoints",
                        # no "/" in file names: the metric is val/acc1
                        filename=f"epoch={{epoch:03d}}-{monitor.replace('/', '_')}={{{monitor}:.4f}}",
                        auto_insert_metric_name=False,
                        monitor=monitor,
                        mode="max",
                        every_n_epochs=every,
                    ),
                    # The newest epoch, to resume from. Not save_last=True: Lightning 2.6 writes
                    # last.ckpt only when the monitored checkpoint is saved, i.e. on improvement.
                    # No version counter: after a resume (requeue, --ckpt_path) last.ckpt is overwritten
                    # instead of a last-v1.ckpt appearing beside a stale last.ckpt.
                    ModelCheckpoint(
                        dirpath=run_dir / "checkpoints", filename="last", every_n_epochs=every,
                        enable_version_counter=False,
                    ),
                ]
            if not any(isinstance(c, FitDiagnosis) for c in callbacks):
                callbacks.append(FitDiagnosis())  # reads logged metrics only: on by default
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in callbacks):
            from callbacks.prediction_writer import PredictionWriter

            callbacks.append(PredictionWriter(str(run_dir)))  # run_dir/predictions.csv, probabilities.npy
        logger = trainer_cfg.get("logger")
        if logger in (None, True):
            logger = self._make_logger(run["logger"], run_dir, name, run["project"])
            if logger is not False and self.subcommand == "fit":
                callbacks.append(LearningRateMonitor(logging_interval="step"))
        if logger is not False and self.subcommand == "fit" and run["dashboard"]:
            from lightning.pytorch.callbacks import ThroughputMonitor

            from callbacks.dashboard import Dashboard, batch_size_of

            callbacks += [Dashboard(), ThroughputMonitor(batch_size_fn=batch_size_of, window_size=run["throughput_window"])]
        if self.subcommand == "fit" and not trainer_cfg.get("sync_batchnorm"):
            from callbacks.bn_stats import BNBufferSync

            if not any(isinstance(c, BNBufferSync) for c in callbacks):
                # DDP without SyncBN: average BN buffers across ranks before validation and saving
                # (timm's --dist-bn reduce default); a no-op on one process
                callbacks.append(BNBufferSync())
        trainer_cfg["callbacks"] = callbacks
        trainer_cfg["default_root_dir"] = str(run_dir)  # Lightning's hpc checkpoints go here
        kwargs.setdefault("logger", logger)
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
            print(f"run directory: {run_dir}", flush=True)
        if trainer.world_size > 1 and hasattr(os, "sched_getaffinity"):  # is each rank bound to its cores?
            import socket

            cpus = sorted(os.sched_getaffinity(0))
            print(f"zoo: rank {trainer.global_rank} of {trainer.world_size} on {socket.gethostname()} cpus {cpus}", flush=True)
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
        offline = os.environ.get("WANDB_MODE", "offline") != "online"
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        # rank 0 (from the launcher's environment) owns the id; other ranks never start a W&B run
        wid = wandb_run_id(run_dir) if rank_zero_only.rank == 0 else None
        return _requeue_aware_wandb_logger()(
            save_dir=str(run_dir), project=project, name=f"{name}-{run_dir.name}", offline=offline,
            id=wid, resume="allow",
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
        for key in ("val/acc1", "val/acc5", "val_ema/acc1", "test/acc1", "test/acc5", "test_ema/acc1"):
            if key in metrics:
                print(f"{key}: {float(metrics[key]):.4f}", flush=True)
        if self.subcommand == "fit":
            for cb in trainer.checkpoint_callbacks:
                if cb.best_model_path:
                    kind = "best" if cb.monitor else "last"
                    print(f"{kind} checkpoint: {cb.best_model_path}", flush=True)
        print(f"logs: {self.run_dir}", flush=True)
        if "WandbLogger" in type(trainer.logger).__name__:  # no wandb import for other loggers
            print(f"W&B (offline): wandb sync {self.run_dir / 'wandb'} --sync-all", flush=True)
            # close the W&B run: a later main() in this process (a resume) starts its own part
            trainer.logger.experiment.finish()


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


def _check_configs(argv: list[str]) -> list[str]:
    """A recipe name (``--config resnet50``) means launch/recipes/resnet50.yaml; a missing file
    is one error line naming the recipes there (jsonargparse would print its usage first)."""
    out = list(argv)
    for i, a in enumerate(argv):
        if a in ("-c", "--config") and i + 1 < len(argv):
            j, value = i + 1, argv[i + 1]
        elif a.startswith("--config="):
            j, value = i, a.split("=", 1)[1]
        else:
            continue
        if Path(value).expanduser().is_file():
            continue
        if "/" not in value and (RECIPES / f"{value}.yaml").is_file():
            out[j] = str(RECIPES / f"{value}.yaml") if j != i else f"--config={RECIPES / f'{value}.yaml'}"
            continue
        names = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
        raise FileNotFoundError(f"recipe {value} not found: give a YAML file or one of {names}")
    return out


# Commands that are not LightningCLI subcommands: name -> "module:function" taking argv
# (the words after the command) and returning an exit code. Imported on use, so `zoo models`
# stays fast. Add a command by adding one line here.
PLAIN_COMMANDS: dict[str, str] = {
    "models": "launch.cli:list_models_main",
    "bench": "launch.bench:main",
    "ensemble": "launch.ensemble:main",
    "gradcheck": "launch.diagnose:gradcheck_main",
    "init-stats": "launch.diagnose:init_stats_main",
    "sweep": "launch.sweep:main",
    "landscape": "launch.landscape:main",
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
    try:
        argv = _check_configs(argv)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if from_shell:  # LightningCLI warns when given both args= and a different sys.argv
        sys.argv[1:] = argv
    errors = _user_errors()
    # in-process callers (tests, notebooks) pass args= while sys.argv is their own
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    # The DDP processes Lightning starts re-run this command with a copy of os.environ: they
    # read the run id from it. Restored afterwards, so a second main() in this process is a new run.
    inherited = os.environ.get("ZOO_RUN_ID")
    try:
        os.environ["ZOO_RUN_ID"] = run_id()
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
    finally:
        if inherited is None:
            os.environ.pop("ZOO_RUN_ID", None)
        else:
            os.environ["ZOO_RUN_ID"] = inherited
    return 0


if __name__ == "__main__":
    sys.exit(main())
