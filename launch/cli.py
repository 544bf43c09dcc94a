"""`zoo` command line: LightningCLI over ImageClassifier + ImageNetDataModule.

    zoo fit                                   # embedded synthetic dataset, demo recipe
    zoo fit --config launch/recipes/resnet50.yaml --data.root /data/imagenet
    zoo validate --config ... --model.weights runs/.../checkpoints/last.ckpt
    zoo models [PATTERN]                      # list registered architectures
    zoo report RUN_DIR                        # the run report: RUN_DIR/report/report.html

Every run writes under one run directory (``--run.root/<name>/<id>``): the resolved
config, checkpoints and logs (W&B offline by default; ``wandb sync <dir>`` uploads later).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

from launch.errors import disk_error, fail, one_line_parse_error, requeue, user_errors
from launch.run_dir import run_id


def rank_zero_info(message: str) -> None:
    """Lightning's rank_zero_info, imported on use (`zoo --help` and `zoo models` import no Lightning)."""
    from lightning.pytorch.utilities import rank_zero_info as info

    info(message)


RECIPES = Path(__file__).resolve().parent / "recipes"


def list_models_main(argv: list[str]) -> int:
    """List the registered architectures and their preprocessing (`zoo models [PATTERN]`)."""
    import argparse

    ap = argparse.ArgumentParser(prog="zoo models", description=COMMANDS["models"][1])
    ap.add_argument("pattern", nargs="?", default=None, help="shell-style filter, e.g. 'resnet*'")
    args = ap.parse_args(argv)
    from zoo import get_data_config, list_models

    for name in list_models(args.pattern):
        dc = get_data_config(name)
        print(f"{name:24s} input {dc.input_size}  crop_pct {dc.crop_pct:.3f}  {dc.interpolation}")
    print("any timm architecture: timm/<name> (e.g. timm/efficientnet_b0)")
    return 0


def _with_default_recipe(argv: list[str]) -> list[str]:
    """No --config: the demo recipe on the embedded dataset, the class defaults on a user's
    --data.root (launch/defaults.py); the first line says which."""
    from launch.defaults import with_default_recipe

    argv, line = with_default_recipe(argv)
    if line:
        rank_zero_info(line)
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


# Every command `zoo --help` lists, in its order: name -> (target, one line). Target "lightning"
# is a LightningCLI subcommand (ZooCLI); any other target is "module:function", imported on use
# (so `zoo models` and `zoo --help` stay fast), taking the words after the command and returning
# an exit code. Add a command by adding one line here; a bare "module:function" (no one line)
# shows the first line of that function's docstring.
LIGHTNING = "lightning"
COMMANDS: dict[str, tuple[str, str] | str] = {
    "fit": (LIGHTNING, "train a model (no --config: the demo on the embedded dataset; with --data.root, the class defaults)"),
    "validate": (LIGHTNING, "one pass over the val split with --model.weights or --ckpt_path"),
    "test": (LIGHTNING, "the same pass as validate, logged as test/ metrics (ImageNet's labelled test split is val)"),
    "predict": (LIGHTNING, "class probabilities for a folder of images (predictions.csv in the run directory)"),
    "models": ("launch.cli:list_models_main", "list the registered architectures and their preprocessing"),
    "ensemble": ("launch.ensemble:main", "evaluate several checkpoints and their ensemble on the val split"),
    "sweep": ("launch.sweep:main", "hyperparameter sweep of a recipe (Optuna), here or as a Slurm array"),
    "bench": ("launch.bench:main", "run the benchmark scripts of benchmarks/ and print their tables"),
    "gradcheck": ("launch.model_checks_cmd:gradcheck_main", "check an architecture's backprop against finite differences"),
    "init-stats": ("launch.model_checks_cmd:init_stats_main", "per-layer activation statistics of an architecture at initialisation"),
    "landscape": ("launch.landscape:main", "plot a checkpoint's loss surface along random filter-normalised directions"),
    "export": ("launch.export:main", "write a checkpoint's weights as .safetensors with its data config and class names"),
    "report": ("launch.report:main", "write a run directory's report: curves, confusion matrix, images (one HTML file)"),
}


def command_target(name: str) -> str:
    entry = COMMANDS[name]
    return entry[0] if isinstance(entry, tuple) else entry


def command_summary(name: str) -> str:
    """The command's one line: from the table, else its function's docstring (read, not imported)."""
    entry = COMMANDS[name]
    if isinstance(entry, tuple):
        return entry[1]
    import ast
    import importlib.util

    module, _, func = entry.partition(":")
    spec = importlib.util.find_spec(module)
    try:
        tree = ast.parse(Path(spec.origin).read_text())
    except (AttributeError, OSError, SyntaxError, TypeError):
        return ""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == func:
            return (ast.get_docstring(node) or "").strip().split("\n")[0]
    return (ast.get_docstring(tree) or "").strip().split("\n")[0]


def usage() -> str:
    """`zoo --help`: every command with its one line, the global options and where to read on."""
    width = max(len(n) for n in COMMANDS) + 2
    lines = [
        "usage: zoo COMMAND [OPTIONS]   (zoo COMMAND --help for a command's options)",
        "",
        "commands:",
        *(f"  {name:{width}s}{command_summary(name)}" for name in COMMANDS),
        "",
        "options of every command:",
        "  --verbose     show third-party notices too (Lightning tips, W&B banner); or ZOO_VERBOSE=1",
        "  -h, --help    show this help, or a command's options",
        "",
        "examples:",
        "  zoo fit                                         # demo recipe on the embedded dataset",
        "  zoo fit --config resnet50 --data.root /data/imagenet",
        "  zoo validate --config resnet50 --data.root /data/imagenet --model.weights RUN/checkpoints/last.ckpt",
        "  zoo fit --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt   # resume",
    ]
    return "\n".join(lines)


def _plain_command(name: str):
    import importlib

    module, _, func = command_target(name).partition(":")
    return getattr(importlib.import_module(module), func)


def _wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def main(argv: Optional[list[str]] = None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv  # third-party notices too (launch/output.py lists what is hidden)
    argv = [a for a in argv if a != "--verbose"]
    from launch.output import configure

    configure(verbose)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):
        print(f"error: unknown command {argv[0]!r}: choose from {', '.join(COMMANDS)} (zoo --help)", file=sys.stderr)
        return 2
    if argv[0] in COMMANDS and command_target(argv[0]) != LIGHTNING:
        try:
            return _plain_command(argv[0])(argv[1:])
        except SystemExit as e:  # argparse: --help (0) or a usage error (2); in-process callers get the code
            if e.code is None or isinstance(e.code, int):
                return e.code or 0
            print(e.code, file=sys.stderr)  # SystemExit("error: ..."): what Python prints, and exit code 1
            return 1
    if not _wants_help(argv):  # --help: the classes' own defaults (or a given --config's), not the demo recipe's
        argv = _with_default_recipe(argv)
    try:
        argv = _check_configs(argv)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _wants_help(argv):
        return _lightning_help(argv)
    if from_shell:  # LightningCLI warns when given both args= and a different sys.argv
        sys.argv[1:] = argv
    errors = user_errors()
    from jsonargparse import ArgumentError

    from callbacks.preemption import Preempted
    from datamodules.imagenet import ImageNetDataModule
    from launch.zoo_cli import RedactedSaveConfig, ZooCLI
    from zoo.base import ImageClassifier

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
        return requeue(stop)
    except errors as e:
        if os.environ.get("ZOO_DEBUG"):
            raise
        # a diverged run keeps its directory (logs up to the failure); a bad input leaves nothing
        return fail(str(e), discard=not isinstance(e, FloatingPointError))
    except OSError as e:
        message = disk_error(e)
        if message is None or os.environ.get("ZOO_DEBUG"):
            raise
        return fail(message)
    except ArgumentError as e:  # jsonargparse: unknown key, wrong type, missing --config file
        return fail(one_line_parse_error(str(e), argv[0] if argv else "fit"))
    finally:
        if inherited is None:
            os.environ.pop("ZOO_RUN_ID", None)
        else:
            os.environ["ZOO_RUN_ID"] = inherited
    return 0


def _lightning_help(argv: list[str]) -> int:
    """`zoo fit --help` (and validate/test/predict): LightningCLI's help, which exits by itself."""
    from datamodules.imagenet import ImageNetDataModule
    from launch.zoo_cli import ZooCLI
    from zoo.base import ImageClassifier

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # in-process callers
    try:
        ZooCLI(ImageClassifier, ImageNetDataModule, args=argv,
               parser_kwargs={"parser_mode": "yaml", "exit_on_error": False})
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
