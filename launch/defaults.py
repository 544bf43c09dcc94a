"""What `zoo fit|validate|test|predict` uses when no --config is given.

- No ``--data.root``: the embedded synthetic demo, ``launch/recipes/demo.yaml`` (64 px, a small
  ConvNet, tuned for a CPU).
- A ``--data.root`` of the user's: the documented class defaults of ImageClassifier and
  ImageNetDataModule, sized for ImageNet-like photos (the model's own input size and crop,
  batch 256, SGD lr 0.1 at 256 with a cosine schedule, .beton images up to 500 px), plus
  ``trainer.max_epochs`` 90 (He et al. 2016; torchvision references' ``--epochs 90``) instead of
  Lightning's 1000. The architecture's recipe in launch/recipes, where one exists, reproduces a
  published multi-GPU ImageNet run (batch 1024, its source's init): the first line names it,
  it is not applied unasked.

The first line printed says which was chosen and how to change it.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

RECIPES = Path(__file__).resolve().parent / "recipes"
DEMO_RECIPE = RECIPES / "demo.yaml"
USER_DATA_MAX_EPOCHS = 90  # He et al. 2016; torchvision references/classification --epochs 90


def _value(argv: list[str], key: str) -> Optional[str]:
    """The last value given for ``key`` (``--key V`` or ``--key=V``), else None."""
    found = None
    for i, a in enumerate(argv):
        if a == key and i + 1 < len(argv):
            found = argv[i + 1]
        elif a.startswith(key + "="):
            found = a.split("=", 1)[1]
    return found


def _defaults(cls) -> dict:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _class_defaults_summary(argv: list[str]) -> str:
    """The numbers the class defaults give for this command line (its own overrides included)."""
    from datamodules.imagenet import DEFAULT_CROP_RATIO, DEFAULT_VAL_RES, ImageNetDataModule
    from zoo.base import ImageClassifier
    from zoo.registry import get_data_config

    model, data = _defaults(ImageClassifier), _defaults(ImageNetDataModule)
    arch = _value(argv, "--model.arch") or model["arch"]
    try:
        dc = get_data_config(arch)
        size, crop = dc.input_size, dc.crop_pct
    except Exception:  # an unknown arch: the CLI says so in one line next
        size, crop = DEFAULT_VAL_RES, DEFAULT_CROP_RATIO
    train = _value(argv, "--data.train_res") or size
    val = _value(argv, "--data.val_res") or size
    crop = _value(argv, "--data.val_crop_ratio") or f"{crop:.3f}"
    batch = _value(argv, "--data.batch_size") or data["batch_size"]
    lr = _value(argv, "--model.lr") or model["lr"]
    epochs = _value(argv, "--trainer.max_epochs") or USER_DATA_MAX_EPOCHS
    stored = _value(argv, "--data.max_resolution") or data["max_resolution"]
    return (f"{arch}, {train} px train, {val} px val (crop {crop}), batch {batch}, {model['optimizer']} lr {lr} "
            f"at batch {model['lr_reference_batch']}, {model['schedule']}, {epochs} epochs, stored images <= {stored} px")


def with_default_recipe(argv: list[str]) -> tuple[list[str], Optional[str]]:
    """``argv`` with the defaults a command without ``--config`` gets, and the line that says so
    (None when ``--config`` is given or the command trains nothing)."""
    if not argv or argv[0] not in ("fit", "validate", "test", "predict"):
        return argv, None
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in argv[1:]):
        return argv, None
    sub, rest = argv[0], argv[1:]
    root = _value(rest, "--data.root")
    if root is None or root.lower() in ("null", "none", ""):
        line = (f"no --config: {DEMO_RECIPE.relative_to(RECIPES.parent.parent)}, the embedded synthetic demo "
                "(64 px ConvNet, CPU); pass --data.root DIR for your own images, --config NAME for a recipe")
        return [sub, "--config", str(DEMO_RECIPE), *rest], line
    arch = _value(rest, "--model.arch")
    recipe = RECIPES / f"{arch}.yaml" if arch else None
    hint = (f"--config {arch} for its published ImageNet recipe, " if recipe is not None and recipe.is_file()
            else "--config NAME (launch/recipes), ")
    line = (f"no --config: the class defaults for ImageNet-like photos ({_class_defaults_summary(rest)}); "
            f"pass {hint}or e.g. --data.train_res N --data.val_res N --data.batch_size N to change")
    extra = ["--trainer.max_epochs", str(USER_DATA_MAX_EPOCHS)] if sub == "fit" else []
    return [sub, *extra, *rest], line  # the user's own arguments come last: they win
