"""`zoo` command line: LightningCLI over ImageClassifier + ImageNetDataModule.

    zoo fit                                   # embedded synthetic dataset, demo recipe
    zoo fit --config launch/recipes/resnet50.yaml --data.root /data/imagenet
    zoo validate --config ... --model.weights runs/.../checkpoints/last.ckpt
    zoo models [PATTERN]                      # list registered architectures
    zoo report RUN_DIR                        # the run's report: RUN_DIR/report/report.html

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

from jsonargparse import ArgumentError

from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from callbacks.fit_diagnosis import FitDiagnosis
from datamodules.imagenet import DataError, ImageNetDataModule, count_classes
from zoo.base import ImageClassifier
from zoo.registry import UnknownModelError

RECIPES = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = RECIPES / "demo.yaml"


def _user_errors() -> tuple[type[BaseException], ...]:
    from zoo.weights import WeightsError

    from launch.safety import ConfigError

    # FloatingPointError: the model's non-finite loss check (step, LR, first bad layer)
    return (DataError, UnknownModelError, WeightsError, FileNotFoundError, LaunchError, ConfigError, FloatingPointError)


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
    _PENDING_WANDB_IDS[run_dir] = wid  # written by save_wandb_run_id() once the inputs were checked
    return wid


_PENDING_WANDB_IDS: dict[Path, str] = {}


def save_wandb_run_id(run_dir: Path) -> None:
    """Write the id wandb_run_id() made up for ``run_dir`` (the run directory exists by now)."""
    wid = _PENDING_WANDB_IDS.pop(run_dir, None)
    if wid is None:
        return
    path = run_dir / WANDB_ID_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(wid + "\n")
    os.replace(tmp, path)


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

    def instantiate_classes(self) -> None:
        """A constructor's own argument check (a ValueError or TypeError while the model, data,
        trainer or a callback is built, e.g. ``WeightEMA(decay=2)``) is a user's mistake: one
        line naming it, instead of jsonargparse's traceback and union-type dump."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as e:
            if os.environ.get("ZOO_DEBUG"):
                raise
            from launch.safety import ConfigError

            root = e
            while root.__cause__ is not None:  # jsonargparse wraps the constructor's error
                root = root.__cause__
            raise ConfigError(str(root).strip().splitlines()[0] if str(root).strip() else repr(root)) from e

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
        from zoo.weights import WeightsError

        from launch.safety import safe_load

        try:  # mmap: only the small entries are read, not the tensors
            ckpt = safe_load(ckpt_path, mmap=True)
        except WeightsError:
            return  # _preflight() reports it in one line
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
        from launch.safety import check_run_name

        name = check_run_name(run["name"]) if run["name"] else arch.replace("/", "_")
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
            from callbacks.preemption import SlurmRequeue

            if not any(isinstance(c, SlurmRequeue) for c in callbacks):
                # Slurm's SIGUSR1: all ranks save at one agreed step, then main() requeues (no
                # save inside Lightning's signal handler, which can deadlock DDP); no-op elsewhere
                callbacks.append(SlurmRequeue())
            from callbacks.metric_log import MetricLog
            from callbacks.run_report import RunReport

            if not any(isinstance(c, MetricLog) for c in callbacks):
                callbacks.append(RunReport())  # RUN/metrics.jsonl whatever the logger; RUN/report/ at the end
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in callbacks):
            from callbacks.prediction_writer import PredictionWriter

            callbacks.append(PredictionWriter(str(run_dir)))  # run_dir/predictions.csv, probabilities.npy
        logger = trainer_cfg.get("logger")
        if logger in (None, True):
            logger = self._make_logger(run["logger"], run_dir, name, run["project"])
            if logger is not False and self.subcommand == "fit":
                callbacks.append(LearningRateMonitor(logging_interval="step"))
        if self.subcommand == "fit" and run["dashboard"]:
            from lightning.pytorch.callbacks import ThroughputMonitor

            from callbacks._batches import batch_size_of
            from callbacks.dashboard import Dashboard

            callbacks.append(Dashboard())  # its plots/ feed the run report, with or without a logger
            if logger is not False:  # ThroughputMonitor logs through the logger only
                callbacks.append(ThroughputMonitor(batch_size_fn=batch_size_of, window_size=run["throughput_window"]))
        if self.subcommand == "fit" and not trainer_cfg.get("sync_batchnorm"):
            from callbacks.bn_stats import BNBufferSync

            if not any(isinstance(c, BNBufferSync) for c in callbacks):
                # DDP without SyncBN: average BN buffers across ranks before validation and saving
                # (timm's --dist-bn reduce default); a no-op on one process
                callbacks.append(BNBufferSync())
        if trainer_cfg.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            from callbacks.progress import ThrottledProgressBar

            callbacks.append(ThrottledProgressBar())  # Lightning's bar, redrawn at most every 0.1 s
        trainer_cfg["callbacks"] = callbacks
        trainer_cfg["default_root_dir"] = str(run_dir)  # Lightning's hpc checkpoints go here
        kwargs.setdefault("logger", logger)
        self._add_checkpoint_io(trainer_cfg)
        trainer = super().instantiate_trainer(**kwargs)
        # Nothing is written yet: the run directory, the logger's files and config.yaml come in
        # _start_run(), after _preflight() found the inputs usable (before_fit/validate/...).
        if trainer.world_size > 1 and hasattr(os, "sched_getaffinity"):  # is each rank bound to its cores?
            import socket

            cpus = sorted(os.sched_getaffinity(0))
            print(f"zoo: rank {trainer.global_rank} of {trainer.world_size} on {socket.gethostname()} cpus {cpus}", flush=True)
        return trainer

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads --ckpt_path's hyper-parameters (torch.load weights_only=True) before
        anything else: a missing, truncated or code-running file is one line here."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            from launch.safety import safe_load

            safe_load(ckpt_path, mmap=True)
        # LightningCLI parses the checkpoint's hyper-parameters over the command line's, and a
        # checkpoint saves weights=None (ImageClassifier.on_save_checkpoint): --model.weights given
        # with --ckpt_path is dropped here; _start_run says so
        model_cfg = self.config[sub].get("model") if ckpt_path else None
        self._overridden_weights = model_cfg.get("weights") if model_cfg is not None else None
        super()._parse_ckpt_path()

    @staticmethod
    def _add_checkpoint_io(trainer_cfg: dict) -> None:
        """Checkpoints through launch.safety.SafeCheckpointIO (atomic saves, weights_only loads)
        unless the config names a CheckpointIO plugin of its own."""
        from lightning.fabric.plugins import CheckpointIO

        from launch.safety import SafeCheckpointIO

        plugins = trainer_cfg.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(SafeCheckpointIO())
        trainer_cfg["plugins"] = plugins

    def _preflight(self) -> None:
        """Check what can be checked before anything is written (launch/safety.py has the why)."""
        from launch.safety import ConfigError, safe_load

        sub, trainer, dm, model = self.subcommand, self.trainer, self.datamodule, self.model
        if dm is not None and getattr(dm, "hparams", {}).get("root") is not None:
            if not (sub == "predict" and dm.is_flat):
                dm.classes  # noqa: B018 - the folder layout, train/ vs val/ classes: one DataError line
        env = getattr(trainer.strategy, "cluster_environment", None)
        if env is not None:  # Lightning checks Slurm's task layout only when it launches: here, before any file
            try:
                env.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
            except ValueError as e:
                raise ConfigError(f"{str(e).splitlines()[0]} (sbatch --ntasks-per-node must equal trainer.devices)") from None
        ws = trainer.world_size
        bs = getattr(dm, "hparams", {}).get("batch_size") if dm is not None else None
        if isinstance(bs, int) and bs % ws:
            raise ConfigError(
                f"data.batch_size={bs} does not divide by {ws} processes (devices x num_nodes): use a multiple "
                f"of {ws}, e.g. {max(ws, bs // ws * ws)}; batch_size is the global batch"
            )
        if getattr(trainer.strategy, "_start_method", None) in ("spawn", "forkserver") and trainer.world_size > 1:
            raise ConfigError(
                f"--trainer.strategy with start method {trainer.strategy._start_method!r} cannot start zoo's processes "
                "(the parsed config holds objects that do not pickle): use --trainer.strategy ddp, which starts the "
                "same processes by running this command again"
            )
        hp = getattr(model, "hparams", {})
        warmup, epochs = hp.get("warmup_epochs") or 0, trainer.max_epochs
        if sub == "fit" and not trainer.fast_dev_run and epochs and epochs > 0 and warmup > epochs:
            raise ConfigError(
                f"model.warmup_epochs={warmup} > trainer.max_epochs={epochs}: the learning rate never reaches "
                "its peak; lower model.warmup_epochs or raise trainer.max_epochs"
            )
        ckpt_path = self.config[sub].get("ckpt_path")
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            safe_load(ckpt_path, mmap=True)  # missing, truncated, or a pickle that would run code: one line, nothing written

    def _start_run(self) -> None:
        from launch.safety import make_run_dir

        self._preflight()
        trainer = self.trainer
        weights = getattr(self, "_overridden_weights", None)
        if weights and trainer.is_global_zero:
            print(f"zoo: the weights come from --ckpt_path {self.config[self.subcommand].get('ckpt_path')}; "
                  f"model.weights {weights} (initial weights) is overridden by it", flush=True)
        if trainer.is_global_zero:
            make_run_dir(self.run_dir)
            save_wandb_run_id(self.run_dir)
            print(f"run directory: {self.run_dir}", flush=True)
        if trainer.logger is not None:
            trainer.logger.log_hyperparams({"git_rev": git_revision(), "run_dir": str(self.run_dir)})

    def before_fit(self) -> None:
        self._start_run()

    def before_validate(self) -> None:
        self._start_run()

    def before_test(self) -> None:
        self._start_run()

    def before_predict(self) -> None:
        self._start_run()

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
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(
            save_dir=str(run_dir), project=project, name=f"{name}-{run_dir.name}", offline=offline,
            id=wid, resume="allow",
        )
        # Lightning 2.6 always passes anonymous=None, which wandb 0.31 answers with a deprecation
        # warning on every run that the user can do nothing about
        if getattr(logger, "_wandb_init", {}).get("anonymous", "") is None:
            logger._wandb_init.pop("anonymous")
        return logger

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
    "report": "launch.report:main",
}


def _plain_command(name: str):
    import importlib

    module, _, func = PLAIN_COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Optional[list[str]] = None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv  # third-party notices too (launch/output.py lists what is hidden)
    argv = [a for a in argv if a != "--verbose"]
    from launch.output import configure

    configure(verbose)
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
    from callbacks.preemption import Preempted

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
            parser_kwargs={"parser_mode": "yaml", "exit_on_error": False},
            save_config_callback=RedactedSaveConfig,
        )
    except Preempted as stop:
        return _requeue(stop)
    except errors as e:
        if os.environ.get("ZOO_DEBUG"):
            raise
        # a diverged run keeps its directory (logs up to the failure); a bad input leaves nothing
        return _fail(str(e), discard=not isinstance(e, FloatingPointError))
    except OSError as e:
        message = _disk_error(e)
        if message is None or os.environ.get("ZOO_DEBUG"):
            raise
        return _fail(message)
    except ArgumentError as e:  # jsonargparse: unknown key, wrong type, missing --config file
        return _fail(_one_line_parse_error(str(e), argv[0] if argv else "fit"))
    finally:
        if inherited is None:
            os.environ.pop("ZOO_RUN_ID", None)
        else:
            os.environ["ZOO_RUN_ID"] = inherited
    return 0


def _requeue(stop) -> int:
    """After a preemption stop (callbacks.preemption): the trainer is down; rank 0 requeues the job."""
    from callbacks.preemption import slurm_job_id

    error = stop.requeue()
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if stop.is_global_zero:
        print(f"zoo: requeued Slurm job {slurm_job_id(dict(os.environ))}: it resumes from {stop.ckpt_path} "
              f"(step {stop.global_step})", flush=True)
    return 0


def _disk_error(e: OSError) -> Optional[str]:
    """One line for a full, read-only or forbidden disk (writing .beton files, checkpoints, logs)."""
    import errno

    where = f" writing {e.filename}" if e.filename else ""
    fixes = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
    }
    if e.errno not in fixes:
        return None
    return (f"{fixes[e.errno]}{where}: free space or point data.beton_dir (or $ZOO_DATA_DIR for .beton "
            "files) and --run.root to a writable disk with room")


def _fail(message: str, discard: bool = True) -> int:
    """A user's error: one line, and no run directory or W&B run left half-started."""
    from launch.safety import discard_failed_run, redact

    discard_failed_run(delete=discard)
    lines = message.strip().splitlines() or ["failed"]
    more = " (details: rerun with ZOO_DEBUG=1)" if len(lines) > 1 else ""
    print(f"error: {redact(lines[0])}{more}", file=sys.stderr)
    return 2


def _one_line_parse_error(message: str, subcommand: str) -> str:
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if lines and lines[0].startswith('Linked "model.num_classes"'):
        return ("model.num_classes comes from the data (the class folders of data.root) or from --model.weights: "
                "drop --model.num_classes")
    given = next((ln for ln in lines if ln.startswith("Given value:")), None)
    first = lines[0] if lines else "invalid arguments"
    if given and given not in first:
        first = f"{first.rstrip(':')} {given[0].lower()}{given[1:]}"
    return f"{first} (see `zoo {subcommand} --help`)"


class RedactedSaveConfig(SaveConfigCallback):
    """config.yaml without credentials (tokens in hub ids or URLs, secret environment values)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        from launch.safety import redact

        # Not trainer.log_dir: it broadcasts, and save_config runs on rank 0 only (a collective on
        # one rank hangs DDP). On rank 0 this is the directory trainer.log_dir would broadcast.
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        if trainer.loggers:
            first = trainer.loggers[0]
            log_dir = first.log_dir if isinstance(first, (TensorBoardLogger, CSVLogger)) else first.save_dir
        else:
            log_dir = trainer.default_root_dir
        path = Path(log_dir or ".") / self.config_filename
        if path.is_file():
            text = path.read_text()
            if redact(text) != text:
                path.write_text(redact(text))


if __name__ == "__main__":
    sys.exit(main())
