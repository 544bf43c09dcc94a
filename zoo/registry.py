"""Model registry: architecture name -> builder of an ``nn.Module`` plus its data config.

A builder is a keyword-only function ``fn(*, num_classes: int, **arch_args) -> nn.Module``.
Each entry carries the preprocessing its weights expect (``DataConfig``), as timm's
pretrained cfg does, so training and evaluation never guess.

``timm/<name>`` resolves to any architecture timm knows, with timm's own data config.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Callable

from torch import nn

# ImageNet channel statistics over the train set, as published with torchvision's and
# timm's weights (timm.data.constants.IMAGENET_DEFAULT_MEAN/STD).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TIMM_PREFIX = "timm/"


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing that travels with a model's weights."""

    input_size: int = 224  # square eval resolution
    crop_pct: float = 0.875  # 224/256: resize to input/crop_pct, center-crop input (He et al. 2016)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # in [0, 1] units
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    data_config: DataConfig
    family: str


class UnknownModelError(ValueError):
    """Raised for a model name the registry does not know (one line, with close names)."""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str | None = None, *, data_config: DataConfig | None = None, family: str | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn`` under ``name`` (default: the function's name).

    Registering a name twice raises: a silent overwrite would make ``create`` depend on
    import order.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered (by {_REGISTRY[key].builder.__module__})")
        if key.startswith(TIMM_PREFIX):
            raise ValueError(f"names starting with {TIMM_PREFIX!r} are reserved for timm models")
        fam = family or fn.__module__.rsplit(".", 1)[-1]
        _REGISTRY[key] = ModelEntry(key, fn, data_config or DataConfig(), fam)
        return fn

    return deco


def _ensure_loaded() -> None:
    # Importing the family modules runs their @register_model decorators.
    from . import families  # noqa: F401


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` is an fnmatch filter such as ``"resnet*"``."""
    import fnmatch

    _ensure_loaded()
    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def _timm_name(name: str) -> str:
    import timm

    arch = name[len(TIMM_PREFIX):]
    if arch not in timm.list_models():
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise UnknownModelError(f"unknown timm architecture {arch!r}.{hint} See timm.list_models().")
    return arch


def get_entry(name: str) -> ModelEntry:
    _ensure_loaded()
    if name.startswith(TIMM_PREFIX):
        from .timm_model import timm_entry

        return timm_entry(_timm_name(name))
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} `zoo models` lists the registered names; "
            f"any timm architecture works as 'timm/<name>'."
        )
    return _REGISTRY[name]


def get_data_config(name: str) -> DataConfig:
    return get_entry(name).data_config


def create_network(name: str, *, num_classes: int = 1000, **arch_args) -> nn.Module:
    """Build the bare ``nn.Module`` for ``name`` (random init)."""
    return get_entry(name).builder(num_classes=num_classes, **arch_args)


def create(name: str, *, num_classes: int = 1000, weights: str | None = None, **kwargs):
    """Build an :class:`~zoo.base.ImageClassifier` (a LightningModule) for ``name``.

    ``kwargs`` are ImageClassifier arguments (optimizer, lr, ...); architecture arguments
    go in ``arch_args={...}``.
    """
    from .base import ImageClassifier

    return ImageClassifier(arch=name, num_classes=num_classes, weights=weights, **kwargs)
