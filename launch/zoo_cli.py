"""ZooCLI: LightningCLI over ImageClassifier + ImageNetDataModule, with the run directory,
logger, default callbacks and the checks made before anything is written.

``launch/cli.py`` (``main``) builds it for fit/validate/test/predict; ``launch/sweep/train.py``
subclasses it for one trial.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from datamodules.imagenet import DataError, count_classes
from launch.config_fixes import arch_from_weights, fixed_input_size, limit_batches_int_first
from launch.run_dir import check_slurm_launch, git_revision, resumed_run_dir, run_id, save_wandb_run_id, wandb_run_id


def num_classes_or_placeholder(root: Optional[str], weights: Optional[str] = None, arch: Optional[str] = None) -> int:
    # jsonargparse wraps a link's exception in a usage dump: a bad root gets its one-line
    # DataError from the DataModule instead, which validates the folder again.
    try:
        return count_classes(root)
    except DataError:
        pass
    # a folder without classes (predict on photos): the classes of the weights, so that their
    # head loads as it is instead of a placeholder head being built, reset and rebuilt
    from launch.ckpt_config import weights_num_classes

    return weights_num_classes(weights, arch) or 2  # 2: the smallest a classifier takes; never trained


# run.* options of earlier versions: now arguments of the default callbacks' sections
# (callbacks/defaults.py). Still accepted; before anything is built they are moved into the
# sections, so that the run's config.yaml says it in one place.
DEPRECATED_RUN_KEYS = {
    "checkpoint_every_n_epochs": (int, "run.callbacks.best_checkpoint.every_n_epochs and "
                                       "run.callbacks.last_checkpoint.every_n_epochs"),
    "dashboard": (bool, "run.callbacks.dashboard null and run.callbacks.throughput null (false)"),
    "throughput_window": (int, "run.callbacks.throughput.window_size"),
    "monitor": (str, "run.callbacks.best_checkpoint.monitor"),
}


def move_deprecated_run_keys(cfg) -> Optional[str]:
    """Move the run.* values of DEPRECATED_RUN_KEYS into the callback sections of ``cfg`` (a
    subcommand's parsed config, changed in place); returns the one deprecation line, or None."""
    given = [k for k in DEPRECATED_RUN_KEYS if cfg.get(f"run.{k}") is not None]

    def set_arg(section: str, **values) -> None:
        spec = cfg.get(f"run.callbacks.{section}")
        if spec is not None:  # a section set to null stays null
            for k, v in values.items():
                spec.init_args[k] = v

    for key in given:
        value = cfg[f"run.{key}"]
        if key == "checkpoint_every_n_epochs":
            set_arg("best_checkpoint", every_n_epochs=value)
            set_arg("last_checkpoint", every_n_epochs=value)
        elif key == "monitor":
            set_arg("best_checkpoint", monitor=value)
        elif key == "throughput_window":
            set_arg("throughput", window_size=value)
        elif key == "dashboard" and not value:
            cfg["run.callbacks.dashboard"] = None
            cfg["run.callbacks.throughput"] = None
        cfg[f"run.{key}"] = None
    if not given:
        return None
    return "deprecated: " + "; ".join(f"run.{k} is now {DEPRECATED_RUN_KEYS[k][1]}" for k in given) + \
        " (the run's config.yaml says it there)"


def strategy_start_method(strategy) -> str | None:
    """The process start method a ``--trainer.strategy`` value asks for: a registered name (ddp_spawn,
    ddp_fork, ...) through Lightning's public ``StrategyRegistry``, or a class_path's
    ``init_args.start_method``; None when it names none (an instance, or the class default)."""
    from lightning.pytorch.strategies import StrategyRegistry

    if isinstance(strategy, str):
        return StrategyRegistry[strategy].get("init_params", {}).get("start_method") if strategy in StrategyRegistry else None
    init_args = strategy.get("init_args") if isinstance(strategy, dict) else getattr(strategy, "init_args", None)
    if init_args is None:
        return None
    return (init_args if isinstance(init_args, dict) else vars(init_args)).get("start_method")


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
        # The default callbacks, one section each (callbacks/defaults.py): run.callbacks.<name>
        from callbacks import defaults

        defaults.add_arguments(parser)
        for key, (typ, target) in DEPRECATED_RUN_KEYS.items():
            parser.add_argument(f"--run.{key}", type=Optional[typ], default=None, help=f"deprecated: use {target}")
        # Classes come from the data; preprocessing comes from the model (DESIGN.md).
        limit_batches_int_first(parser)
        parser.link_arguments(("data.root", "model.weights", "model.arch"), "model.num_classes",
                              compute_fn=num_classes_or_placeholder)
        parser.link_arguments("model.data_config", "data.data_config", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        line = move_deprecated_run_keys(self.config[self.subcommand] if self.subcommand else self.config)
        if line:
            rank_zero_info(f"zoo: {line}")

    def instantiate_classes(self) -> None:
        """A constructor's own argument check (a ValueError or TypeError while the model, data,
        trainer or a callback is built, e.g. ``WeightEMA(decay=2)``) is a user's mistake: one
        line naming it, instead of jsonargparse's traceback and union-type dump."""
        from launch.defaults import DEMO_RECIPE

        cfg = self.config[self.subcommand] if self.subcommand else self.config
        arch_from_weights(cfg, getattr(self, "_zoo_args", []), [DEMO_RECIPE])
        fixed_input_size(cfg)
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

    def parse_arguments(self, parser, args) -> None:
        # the words as given: which data.* values the user chose (launch/ckpt_config.py)
        self._zoo_args = list(sys.argv[1:] if args is None else args) if not isinstance(args, Mapping) else []
        super().parse_arguments(parser, args)

    def _adopt_checkpoint_data_config(self) -> None:
        """The DataModule gets the preprocessing the checkpoint records, as the model does.

        --ckpt_path: the model takes the checkpoint's data config in on_load_checkpoint, after
        the DataModule was built from the architecture's default; rebuild the DataModule with it
        (crop ratio, interpolation, eval size), so --ckpt_path agrees with --model.weights.
        validate/test/predict (--ckpt_path or --model.weights): evaluate at the recorded size and
        crop ratio unless data.val_res / data.val_crop_ratio are given explicitly (not by the
        default recipe); one line says when an explicit value differs (launch/ckpt_config.py).
        """
        from launch.ckpt_config import eval_settings, explicit_data_keys
        from launch.defaults import DEMO_RECIPE

        sub = self.subcommand
        ckpt_path = self.config[sub].get("ckpt_path")
        dc, source = None, None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc") and Path(ckpt_path).is_file():
            from zoo.weights import WeightsError

            from launch.safety import safe_load

            try:  # mmap: only the small entries are read, not the tensors
                ckpt = safe_load(ckpt_path, mmap=True)
            except WeightsError:
                return  # _preflight() reports it in one line
            dc = ckpt.get("zoo_data_config") if isinstance(ckpt, dict) else None
            dc, source = (dict(dc) if dc else None), ckpt_path
            if dc and dc != dict(self.model.data_config):
                self.model._set_data_config(dc)
        elif sub != "fit":
            report = getattr(self.model, "weights_report", None)
            if report is not None and report.data_config is not None:
                dc, source = dict(self.model.data_config), str(report.source)
        dm = self.datamodule
        accepted = inspect.signature(type(dm).__init__).parameters if dm is not None else {}
        if not dc or "data_config" not in accepted:
            return
        kwargs = {k: v for k, v in dict(dm.hparams).items() if k in accepted}  # not _instantiator
        update, line = {}, None
        if sub != "fit":  # a resumed fit keeps its recipe's resolutions
            explicit = explicit_data_keys(getattr(self, "_zoo_args", []), implicit_configs=[DEMO_RECIPE])
            update, line = eval_settings(dc, kwargs, explicit, source)
        if line and self.trainer.is_global_zero:
            print(line, flush=True)
        if dc != dict(dm.hparams.get("data_config") or {}) or any(kwargs.get(k) != v for k, v in update.items()):
            self.datamodule = type(dm)(**{**kwargs, **update, "data_config": dc})

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
            run_dir = resumed_run_dir(raw.get("ckpt_path")) or Path(run["root"]).expanduser().resolve() / name / run_id()
        self.run_dir = run_dir
        own = list(trainer_cfg.get("callbacks") or [])  # the recipe's and the command line's trainer.callbacks
        callbacks = list(own)
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in callbacks):
            from callbacks.prediction_writer import PredictionWriter

            callbacks.append(PredictionWriter(str(run_dir)))  # run_dir/predictions.csv, probabilities.npy
        logger = trainer_cfg.get("logger")
        if logger in (None, True):
            logger = self._make_logger(run["logger"], run_dir, name, run["project"])
        from callbacks import defaults

        sections = cfg.get(defaults.PREFIX)
        callbacks += defaults.select(
            {d.key: sections.get(d.key) for d in defaults.DEFAULTS} if sections is not None else {},
            self.subcommand or "fit",
            has_logger=logger not in (None, False),
            trainer_callbacks=own,
            sync_batchnorm=bool(trainer_cfg.get("sync_batchnorm")),
            enable_progress_bar=trainer_cfg.get("enable_progress_bar") is not False,
            enable_model_summary=trainer_cfg.get("enable_model_summary") is not False,
            run_dir=run_dir,
        )
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
                if sub == "fit" and hasattr(dm, "check_train_batches"):
                    dm.check_train_batches(trainer.world_size)  # fewer images than one batch: one line, nothing written
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
        method = strategy_start_method(self.config[sub]["trainer"].get("strategy"))
        if method in ("spawn", "forkserver") and trainer.world_size > 1:
            raise ConfigError(
                f"--trainer.strategy with start method {method!r} cannot start zoo's processes "
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
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        if kind == "csv":
            from lightning.pytorch.loggers import CSVLogger

            # Lightning's CSV writer deletes an existing metrics.csv: a resumed run keeps the
            # earlier part as metrics.1.csv (then .2, ...) beside the new one
            metrics = run_dir / "csv" / "metrics.csv"
            if metrics.is_file() and rank_zero_only.rank == 0:
                n = 1
                while metrics.with_name(f"metrics.{n}.csv").exists():
                    n += 1
                metrics.rename(metrics.with_name(f"metrics.{n}.csv"))
            return CSVLogger(save_dir=str(run_dir), name="csv", version="")
        if kind == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            return TensorBoardLogger(save_dir=str(run_dir), name="tb", version="")
        offline = os.environ.get("WANDB_MODE", "offline") != "online"
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
        if not path.is_file():
            return
        text = path.read_text()
        if redact(text) != text:
            path.write_text(redact(text))
        # RUN/config.yaml for every logger (CSV and TensorBoard keep theirs in RUN/csv, RUN/tb):
        # `zoo fit --config RUN/config.yaml --ckpt_path ...` resumes, and a checkpoint finds its run
        run_copy = Path(trainer.default_root_dir) / self.config_filename
        if run_copy.resolve() != path.resolve():
            tmp = run_copy.with_name(f".{run_copy.name}.tmp")
            tmp.write_text(redact(text))
            tmp.replace(run_copy)
