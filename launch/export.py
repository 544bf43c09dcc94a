"""`zoo export CKPT --to model.safetensors`: a checkpoint's weights as one safetensors file.

The file's metadata holds what rebuilds and feeds the model: ``arch``, ``num_classes``,
``arch_args``, ``data_config`` (input size, crop ratio, interpolation, mean, std) and
``class_names`` (the class ids in label order, when the checkpoint's data can tell them).
``zoo.load(weights="model.safetensors")`` reads it back; a path without ``.safetensors`` is a
Hugging Face folder (``model.safetensors`` + ``config.json``), ready for ``hf upload``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from launch.flags import parse_bool


def checkpoint_classes(ckpt: dict) -> Optional[list[str]]:
    """The class ids a checkpoint was trained with: from the data root its DataModule recorded
    (None there: the embedded dataset), when that data can still be read."""
    from datamodules.imagenet import DataError, class_ids

    dm = ckpt.get("datamodule_hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(dm, dict):
        return None
    try:
        return class_ids(dm.get("root"))
    except (DataError, OSError):
        return None


def main(argv: list[str]) -> int:
    """Write a checkpoint's weights as .safetensors with its data config and class names."""
    ap = argparse.ArgumentParser(prog="zoo export", description=main.__doc__)
    ap.add_argument("ckpt", help="a zoo checkpoint (RUN/checkpoints/last.ckpt) or any weights zoo.load reads")
    ap.add_argument("--to", required=True, help="output: FILE.safetensors, or a folder for a Hugging Face snapshot")
    ap.add_argument("--ema", type=parse_bool, default=True, metavar="true|false",
                    help="the checkpoint's EMA weights when it has them (default true)")
    args = ap.parse_args(argv)
    import zoo
    from zoo.weights import WeightsError, export_safetensors

    from launch.safety import safe_load

    try:
        if not Path(args.ckpt).exists():
            raise FileNotFoundError(f"checkpoint {args.ckpt} does not exist")
        model = zoo.load(weights=args.ckpt, use_ema=args.ema)
        classes = checkpoint_classes(safe_load(args.ckpt, mmap=True)) if args.ckpt.endswith(".ckpt") else None
        if classes is not None and len(classes) != model.hparams.num_classes:
            classes = None  # the data changed since: no names rather than wrong ones
        out = export_safetensors(model, args.to, class_names=classes)
    except (WeightsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = f"{model.hparams.arch}, {model.hparams.num_classes} classes" + (", class names" if classes else "")
    print(f"exported {args.ckpt} -> {out} ({what}, data config)", flush=True)
    return 0
