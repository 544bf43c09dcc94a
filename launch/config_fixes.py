"""Corrections to the parsed config that the CLI applies before anything is built."""

from __future__ import annotations

from typing import Optional, Union

from lightning.pytorch.utilities import rank_zero_info

LIMIT_BATCHES = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")


def limit_batches_int_first(parser) -> None:
    """``--trainer.limit_train_batches 1`` means one batch, as ``Trainer(limit_train_batches=1)``.

    Lightning types the limits ``Union[float, int, None]``; jsonargparse tries the union's types
    in order, so ``1`` (command line or YAML) became the float 1.0, which Lightning reads as
    100 % of the batches. Trying int first keeps ``1`` an int and ``1.0``/``0.25`` floats.
    (The parser keeps the type of a signature argument on its action, ``_typehint``; a test
    fails if a jsonargparse release moves it.)
    """
    for action in parser._actions:
        if getattr(action, "dest", "").split(".")[-1] in LIMIT_BATCHES and hasattr(action, "_typehint"):
            action._typehint = Optional[Union[int, float]]


def fixed_input_size(cfg) -> None:
    """A network that flattens its input (logreg, mlp) is built for one image size: without
    ``arch_args.input_size`` it takes the data's resolution (``data.train_res``/``val_res``);
    with neither, or with sizes that disagree, one line says what to give. (Its registered
    default, 224 px, would build a 77 M-parameter MLP for 32 px images and fail at the first batch.)"""
    from zoo.registry import UnknownModelError, get_entry

    from launch.safety import ConfigError

    model, data = cfg["model"], cfg["data"]
    try:
        entry = get_entry(model["arch"])
    except UnknownModelError:
        return  # the model's own one-line error follows
    if not entry.fixed_input or not isinstance(model.get("arch_args") or {}, dict):
        return
    arch_args = dict(model.get("arch_args") or {})
    res = {k: int(data[k]) for k in ("train_res", "val_res") if data.get(k)}
    give = f"""--model.arch_args '{{"input_size": N}}'"""
    if "input_size" not in arch_args:
        if not res:
            raise ConfigError(f"{entry.name} flattens images of one fixed size: give it with {give} "
                              "(or --data.train_res N --data.val_res N) for N px images")
        if len(set(res.values())) > 1:
            raise ConfigError(f"{entry.name} flattens images of one fixed size, but data.train_res {res.get('train_res')} "
                              f"and data.val_res {res.get('val_res')} differ: make them equal, or give {give}")
        arch_args["input_size"] = next(iter(res.values()))
        model["arch_args"] = arch_args
        rank_zero_info(f"{entry.name}: input_size {arch_args['input_size']} px from the data's resolution")
        return
    size = int(arch_args["input_size"])
    wrong = {k: v for k, v in res.items() if v != size}
    if wrong:
        raise ConfigError(f"{entry.name} is built for {size} px images (arch_args input_size) but "
                          + " and ".join(f"data.{k} is {v}" for k, v in wrong.items())
                          + ": make them equal, or drop input_size to take the data's")


def arch_from_weights(cfg, args, implicit_configs) -> None:
    """``--model.weights`` without ``--model.arch``: the architecture the weights record (a zoo
    checkpoint or export says which), not the class default, as ``zoo.load(weights=...)`` does.
    An architecture the user gave (flag or own config file) is kept; the weights' load then names
    any mismatch in one line."""
    from launch.ckpt_config import explicit_keys, weights_arch

    model = cfg["model"]
    if not model.get("weights") or "arch" in explicit_keys(args, "model", implicit_configs):
        return
    arch, arch_args = weights_arch(model["weights"])
    if not arch or arch == model.get("arch"):
        return
    model["arch"] = arch
    if arch_args is not None and "arch_args" not in explicit_keys(args, "model", implicit_configs):
        model["arch_args"] = arch_args
    rank_zero_info(f"model.arch {arch}: the architecture {model['weights']} records (--model.arch to choose another)")
