"""`zoo fit`'s default callbacks are config sections (run.callbacks.<name>, callbacks/defaults.py):
listed in the run's config.yaml, removed with null, configured by argument, rebuilt from the file."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from launch.cli import main
from tests.helpers import REPO

DEMO = str(REPO / "launch" / "recipes" / "demo.yaml")
TINY = ["--trainer.accelerator", "cpu", "--data.backend", "torchvision", "--data.num_workers", "0",
        "--data.batch_size", "4", "--data.train_res", "32", "--data.val_res", "32"]


def build(args: list[str], data: Path, tmp_path: Path, subcommand: str = "fit"):
    """ZooCLI as `zoo SUBCOMMAND` builds it (model, data, trainer), without running it."""
    from datamodules.imagenet import ImageNetDataModule
    from launch.zoo_cli import RedactedSaveConfig, ZooCLI
    from zoo.base import ImageClassifier

    class Built(ZooCLI):
        def _run_subcommand(self, subcommand: str) -> None:
            pass

    config = [] if "--config" in args else ["--config", DEMO]
    argv = [*config, *TINY, "--data.root", str(data), "--run.root", str(tmp_path / "runs"), "--run.logger", "csv", *args]
    return Built(ImageClassifier, ImageNetDataModule, args=[subcommand, *argv], save_config_callback=RedactedSaveConfig,
                 parser_kwargs={"parser_mode": "yaml", "exit_on_error": False})


def described(cli) -> list[tuple]:
    """Each callback of the trainer as (class, its settings), checkpoint paths relative to the run."""
    out = []
    for cb in cli.trainer.callbacks:
        if type(cb).__name__ == "RedactedSaveConfig":
            continue
        settings = {k: v for k, v in vars(cb).items() if isinstance(v, (int, float, str, bool, type(None)))}
        if getattr(cb, "kwargs", None):  # ThroughputMonitor keeps its Throughput arguments here
            settings.update(cb.kwargs)
        if settings.get("dirpath"):
            settings["dirpath"] = str(Path(settings["dirpath"]).relative_to(cli.run_dir))
        out.append((type(cb).__name__, sorted(settings.items())))
    return out


def test_demo_config_lists_every_default_and_rerunning_it_builds_the_same_callbacks(tiny_imagenet, tmp_path):
    """A real (1 batch) demo fit with two defaults configured and one removed: RUN/config.yaml names
    every default with its settings, and `--config RUN/config.yaml` builds the same callbacks."""
    args = ["--run.callbacks.best_checkpoint.save_top_k", "2", "--run.callbacks.throughput.window_size", "7",
            "--run.callbacks.dashboard", "null", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    assert main(["fit", "--config", DEMO, *TINY, "--data.root", str(tiny_imagenet), "--run.root", str(tmp_path / "runs"),
                 "--run.logger", "csv", *args]) == 0
    config = next((tmp_path / "runs").glob("convnet/*/config.yaml"))
    sections = (yaml.safe_load(config.read_text())["run"] or {}).get("callbacks") or {}
    from callbacks import defaults

    assert list(sections) == [d.key for d in defaults.DEFAULTS]
    configured = {"best_checkpoint": {"save_top_k": 2}, "throughput": {"window_size": 7}}
    for d in defaults.DEFAULTS:
        if d.key != "dashboard":
            assert sections[d.key]["class_path"] == d.class_path, d.key
            assert {**d.init_args, **configured.get(d.key, {})}.items() <= sections[d.key]["init_args"].items(), d.key
    assert sections["dashboard"] is None
    assert sections["best_checkpoint"]["init_args"]["save_top_k"] == 2
    assert sections["best_checkpoint"]["init_args"]["monitor"] == "val/acc1"
    assert sections["throughput"]["init_args"]["window_size"] == 7
    assert sections["last_checkpoint"]["init_args"]["filename"] == "last"

    original = build(args, tiny_imagenet, tmp_path / "a")
    rerun = build(["--config", str(config)], tiny_imagenet, tmp_path / "b")
    assert described(rerun) == described(original)
    names = [n for n, _ in described(rerun)]
    assert "Dashboard" not in names and {"BestCheckpoint", "ModelCheckpoint", "ImageThroughputMonitor"} <= set(names)


def test_null_removes_a_default_and_arguments_configure_one(tiny_imagenet, tmp_path):
    cli = build(["--run.callbacks.dashboard", "null", "--run.callbacks.best_checkpoint.save_top_k", "3",
                 "--run.callbacks.best_checkpoint.monitor", "val/acc5", "--run.callbacks.throughput.window_size", "9",
                 "--run.callbacks.slurm_requeue", "null"], tiny_imagenet, tmp_path)
    cbs = cli.trainer.callbacks
    names = {type(c).__name__ for c in cbs}
    assert "Dashboard" not in names and "SlurmRequeue" not in names
    assert {"FitDiagnosis", "LearningRateMonitor", "BNBufferSync", "ThrottledProgressBar"} <= names
    best = next(c for c in cbs if type(c).__name__ == "BestCheckpoint")
    assert best.save_top_k == 3 and best.monitor == "val/acc5" and best.filename == "epoch={epoch:03d}-val_acc5={val/acc5:.4f}"
    assert Path(best.dirpath) == cli.run_dir / "checkpoints"
    last = next(c for c in cbs if type(c).__name__ == "ModelCheckpoint")
    assert last.filename == "last" and Path(last.dirpath) == cli.run_dir / "checkpoints"
    assert next(c for c in cbs if type(c).__name__ == "ImageThroughputMonitor").kwargs["window_size"] == 9


def test_without_a_logger_the_config_keeps_the_sections(tiny_imagenet, tmp_path):
    cli = build(["--run.logger", "none"], tiny_imagenet, tmp_path)
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert not names & {"LearningRateMonitor", "ImageThroughputMonitor"}  # they log through the logger
    assert {"BestCheckpoint", "FitDiagnosis", "SlurmRequeue", "RunReport", "Dashboard"} <= names
    assert cli.config["fit"]["run.callbacks.lr_monitor"].class_path == "lightning.pytorch.callbacks.LearningRateMonitor"


def test_validate_test_predict_use_only_the_summary_and_the_bar():
    from callbacks import defaults

    for stage in ("validate", "test", "predict"):
        assert [d.key for d in defaults.DEFAULTS if stage in d.stages] == ["model_summary", "progress_bar"]
        names = [type(c).__name__ for c in defaults.default_callbacks(stage)]
        assert names == ["ModelSummary", "ThrottledProgressBar"], stage


def test_a_recipe_with_trainer_callbacks_keeps_them_and_the_defaults(tiny_imagenet, tmp_path):
    """A recipe's trainer.callbacks (WeightEMA) and a default configured by the recipe (the best
    checkpoint by the EMA's accuracy) both reach the trainer and the config."""
    recipe = yaml.safe_load(Path(DEMO).read_text())
    recipe["trainer"]["callbacks"] = [{"class_path": "callbacks.ema.WeightEMA", "init_args": {"decay": 0.9}}]
    recipe["run"] = {"callbacks": {"best_checkpoint": {"init_args": {"monitor": "val_ema/acc1"}}}}
    path = tmp_path / "ema.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cli = build(["--config", str(path)], tiny_imagenet, tmp_path)
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert "WeightEMA" in names
    fit_defaults = {"BestCheckpoint", "ModelCheckpoint", "FitDiagnosis", "SlurmRequeue", "RunReport", "LearningRateMonitor", "Dashboard",
                    "ImageThroughputMonitor", "BNBufferSync", "ModelSummary", "ThrottledProgressBar"}
    assert fit_defaults <= set(names)
    assert next(c for c in cli.trainer.callbacks if type(c).__name__ == "BestCheckpoint").monitor == "val_ema/acc1"
    assert cli.config["fit"]["run.callbacks.best_checkpoint"].init_args.monitor == "val_ema/acc1"  # what config.yaml says


def test_the_old_run_options_still_work_with_one_deprecation_line(tiny_imagenet, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cli = build(["--run.monitor", "val/acc5", "--run.dashboard", "false", "--run.checkpoint_every_n_epochs", "2"],
                tiny_imagenet, tmp_path)
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert not names & {"Dashboard", "ImageThroughputMonitor"}
    ckpts = [c for c in cli.trainer.callbacks if type(c).__name__ in ("BestCheckpoint", "ModelCheckpoint")]
    assert len(ckpts) == 2 and all(c._every_n_epochs == 2 for c in ckpts)
    assert ckpts[0].monitor == "val/acc5"
    run = cli.config["fit"]["run"]  # config.yaml says it in the sections, not in the old keys
    assert run.callbacks.dashboard is None and run.callbacks.best_checkpoint.init_args.monitor == "val/acc5"
    assert run.monitor is None and run.dashboard is None
    said = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(said) == 1 and "run.callbacks.best_checkpoint.monitor" in said[0], said


def test_the_overhead_benchmark_builds_what_fit_adds(tiny_imagenet, tmp_path):
    """benchmarks/overhead.py times the CLI's defaults: both come from callbacks.defaults."""
    import benchmarks.overhead as overhead

    cli = build([], tiny_imagenet, tmp_path)
    fit = [type(c).__name__ for c in cli.trainer.callbacks if type(c).__name__ != "RedactedSaveConfig"]
    bench = [type(c).__name__ for c in overhead.zoo_fit_callbacks(str(tmp_path))]
    assert bench == [n for n in fit if n not in ("BestCheckpoint", "ModelCheckpoint", "ModelSummary")]


def test_a_bad_default_callback_argument_is_one_line(tiny_imagenet, tmp_path, capsys):
    rc = main(["fit", "--config", DEMO, *TINY, "--data.root", str(tiny_imagenet), "--run.root", str(tmp_path),
               "--run.callbacks.throughput.window_size", "1"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "window_size=1 must be >= 2" in err[0], err
    assert not (tmp_path / "convnet").exists()  # nothing written


def test_every_default_builds_with_its_declared_arguments():
    from callbacks import defaults

    for d in defaults.DEFAULTS:
        cb = defaults.import_class(d.class_path)(**d.init_args)
        assert isinstance(cb, defaults.import_class(d.kind)), d.key
