"""The preprocessing a checkpoint records, applied to an evaluation run unless the user overrides it.

A checkpoint written by ``zoo fit`` records what its weights were trained and evaluated with
(``zoo_data_config``: eval input size, crop ratio, interpolation, mean/std, class names; see
``ImageClassifier.record_data_preprocessing``). ``zoo validate|test|predict`` with
``--ckpt_path`` or ``--model.weights`` evaluate with it: the DataModule's ``val_res`` and
``val_crop_ratio`` come from the record unless given explicitly, on the command line or in a
``--config`` file of the user's. The demo recipe that ``zoo`` applies when no ``--config`` is
given is not an explicit choice: its ``val_res: 64`` does not override a checkpoint trained at
32 px. An explicit value that differs from the record is used, and said in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

# DataModule argument -> (data_config key, how the line names it)
EVAL_KEYS = {"val_res": ("input_size", "eval size {} px"), "val_crop_ratio": ("crop_pct", "crop ratio {:.4g}")}


def _read_or_none(weights: Optional[str]):
    """``zoo.weights.read_weights(weights)``, or None when there are none or they cannot be read
    (the model's own load then reports it in one line)."""
    if not weights:
        return None
    try:
        from zoo.weights import read_weights

        return read_weights(weights)
    except Exception:
        return None


def weights_num_classes(weights: Optional[str], arch: Optional[str] = None) -> Optional[int]:
    """Classes of ``weights`` (their head, or what the file says), None when they cannot tell."""
    w = _read_or_none(weights)
    if w is None:
        return None
    try:
        from zoo import weights_num_classes

        return weights_num_classes(w, w.arch or arch, w.arch_args)
    except Exception:  # an unknown architecture: the model's own build reports it in one line
        return None


def _config_files(args: list[str]) -> list[str]:
    files = []
    for i, a in enumerate(args):
        if a in ("-c", "--config") and i + 1 < len(args):
            files.append(args[i + 1])
        elif a.startswith("--config="):
            files.append(a.split("=", 1)[1])
    return files


def explicit_keys(args: Iterable[str], section: str, implicit_configs: Iterable[str | Path] = ()) -> set[str]:
    """``SECTION.*`` keys (``data``, ``model``) the user set: as ``--SECTION.KEY`` flags, or in a
    ``--config`` file other than ``implicit_configs`` (the recipe ``zoo`` adds by itself)."""
    args = [str(a) for a in args]
    prefix = f"--{section}."
    keys = set()
    for a in args:
        if a.startswith(prefix):
            keys.add(a[len(prefix):].split("=", 1)[0])
    implicit = {str(Path(p).expanduser().resolve()) for p in implicit_configs}
    for f in _config_files(args):
        path = Path(f).expanduser()
        if str(path.resolve()) in implicit or not path.is_file():
            continue
        try:
            import yaml

            cfg = yaml.safe_load(path.read_text()) or {}
        except Exception:
            continue
        part = cfg.get(section) if isinstance(cfg, dict) else None
        if isinstance(part, dict):
            keys.update(str(k) for k in part)
            if isinstance(part.get("init_args"), dict):
                keys.update(str(k) for k in part["init_args"])
    return keys


def explicit_data_keys(args: Iterable[str], implicit_configs: Iterable[str | Path] = ()) -> set[str]:
    """``data.*`` keys the user set (:func:`explicit_keys`)."""
    return explicit_keys(args, "data", implicit_configs)


def weights_arch(weights: Optional[str]) -> tuple[Optional[str], Optional[dict]]:
    """The architecture (and its arguments) ``weights`` record, (None, None) when they say none."""
    w = _read_or_none(weights)
    if w is None:
        return None, None
    return w.arch, (dict(w.arch_args) if w.arch_args else None)


def eval_settings(recorded: dict, current: dict, explicit: set[str], source: str) -> tuple[dict, Optional[str]]:
    """DataModule arguments that evaluate as ``recorded`` says, and the one line naming the
    explicit values that differ from it (None when none does).

    ``current``: the DataModule's parsed arguments (``val_res``, ``val_crop_ratio``).
    """
    update: dict = {}
    differ: list[str] = []
    for arg, (key, fmt) in EVAL_KEYS.items():
        want = recorded.get(key)
        if want is None:
            continue
        want = int(want) if key == "input_size" else float(want)
        have = current.get(arg)
        if arg in explicit and have is not None:
            if (int(have) if key == "input_size" else float(have)) != want:
                differ.append(f"data.{arg}={have} instead of the recorded {fmt.format(want)}")
            continue
        update[arg] = want
    line = None
    if differ:
        line = (f"zoo: evaluating {source} with {'; '.join(differ)} (explicitly given; leave it out to use "
                "what the checkpoint was trained and evaluated with)")
    return update, line
