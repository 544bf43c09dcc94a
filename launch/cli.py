"""`zoo` command line: LightningCLI over ImageClassifier + ImageNetDataModule.

    zoo fit                                   # embedded synthetic dataset, demo recipe
    zoo fit --config launch/recipes/resnet50.yaml --data.root /data/imagenet
    zoo validate --config ... --model.weights runs/.../checkpoints/last.ckpt
    zoo models [PATTERN]                      # list registered architectures

Every run writes under one run directory (``--run.root/<name>/<id>``): the resolved
config, checkpoints and logs (W&B offline by default; ``wandb sync <dir>`` uploads later).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

from jsonargparse import ArgumentError

from lightning.pytorch.utilities import rank_zero_info

from launch.errors import disk_error, fail, one_line_parse_error, requeue, user_errors
from launch.run_dir import run_id

RECIPES = Path(__file__).resolve().parent / "recipes"
DEFAULT_RECIPE = RECIPES / "demo.yaml"


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
    errors = user_errors()
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


if __name__ == "__main__":
    sys.exit(main())
