"""``timm/<arch>``: any architecture timm knows, with timm's own data config.

This module registers the ``timm/`` prefix resolver into the registry; nothing else is
registered ahead of time, so the whole of ``timm.list_models()`` is available without import cost.
"""

from __future__ import annotations

import difflib
import functools

import timm
from torch import nn

from .registry import TIMM_PREFIX, DataConfig, ModelEntry, UnknownModelError, register_prefix


def _create(arch: str, *, num_classes: int = 1000, **arch_args) -> nn.Module:
    # pretrained=False: weights go through zoo.weights (hf-hub:timm/<arch>.<tag>), never a
    # silent download at build time.
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **arch_args)


def data_config_from_timm(cfg) -> DataConfig:
    """DataConfig from a timm ``PretrainedCfg`` or the ``pretrained_cfg`` dict of a config.json."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    default = DataConfig()
    input_size = get("input_size") or (3, default.input_size, default.input_size)
    mean, std = tuple(get("mean") or default.mean), tuple(get("std") or default.std)
    if len(mean) == 1:  # single-channel stats: the zoo normalises 3-channel images
        mean, std = mean * 3, std * 3
    return DataConfig(
        input_size=int(input_size[-1]),  # timm: (C, H, W); the zoo's eval size is square
        crop_pct=float(get("crop_pct") or default.crop_pct),
        mean=mean,
        std=std,
        interpolation=str(get("interpolation") or default.interpolation),
        label_names=tuple(str(n) for n in get("label_names")) if get("label_names") else None,
    )


@functools.lru_cache(maxsize=None)
def timm_entry(arch: str) -> ModelEntry:
    """Registry entry for timm's ``arch`` (no tag): builder and its default weights' data config.

    The data config is that of timm's default pretrained tag for ``arch`` (e.g.
    ``convnext_tiny`` -> ``convnext_tiny.in12k_ft_in1k``: crop_pct 0.95, bicubic), as
    ``timm.data.resolve_data_config`` would give for ``timm.create_model(arch, pretrained=True)``.
    """
    cfg = timm.models.get_pretrained_cfg(arch)
    data_config = data_config_from_timm(cfg) if cfg is not None else DataConfig()
    return ModelEntry(TIMM_PREFIX + arch, functools.partial(_create, arch), data_config, "timm")


def _resolve(name: str) -> ModelEntry:
    arch = name[len(TIMM_PREFIX):]
    known = timm.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f" Did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise UnknownModelError(f"unknown timm architecture {arch!r}.{hint} See timm.list_models().")
    return timm_entry(arch)


register_prefix(TIMM_PREFIX, _resolve)
