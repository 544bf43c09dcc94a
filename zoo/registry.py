"""Model registry: architecture name -> builder of an ``nn.Module`` plus its data config.

A builder is a keyword-only function ``fn(*, num_classes: int, **arch_args) -> nn.Module``.
Each entry carries the preprocessing its weights expect (``DataConfig``), as timm's
pretrained cfg does, so training and evaluation never guess.

The lowest layer of the zoo: this module imports nothing of the zoo. Families register into
it (``@register_model``), a family with its own checkpoint key layouts registers those too
(:func:`register_key_layout`), and ``timm_model`` registers the ``timm/`` prefix resolver
(:func:`register_prefix`). ``zoo/__init__.py`` imports the families and offers ``create`` and
``load``, as timm's ``timm/__init__.py`` does.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import asdict, dataclass
from typing import Callable, Optional

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
    # class names in label order (timm's pretrained_cfg ``label_names``): a checkpoint written by
    # ``zoo fit`` records its data's class folders; None where the weights do not say
    label_names: Optional[tuple[str, ...]] = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["label_names"] = list(self.label_names) if self.label_names is not None else None
        return d


@dataclass(frozen=True)
class KeyLayout:
    """A foreign checkpoint key layout a family converts from (timm's ``checkpoint_filter_fn``).

    ``applies(keys)`` says whether a state_dict looks like this layout; ``convert(sd, net)``
    returns the state_dict in ``net``'s layout (``net``'s own state_dict gives target shapes).
    Tried by ``zoo.weights`` only when the keys do not fit as they are.
    """

    name: str  # e.g. "official ConvNeXt -> timm"
    applies: Callable[[list], bool]
    convert: Callable[[dict, nn.Module], dict]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    data_config: DataConfig
    family: str
    fixed_input: bool = False  # flattens images of one size (arch_args input_size): logreg, mlp


class UnknownModelError(ValueError):
    """Raised for a model name the registry does not know (one line, with close names)."""


_REGISTRY: dict[str, ModelEntry] = {}
_PREFIXES: dict[str, Callable[[str], ModelEntry]] = {}  # "timm/" -> resolver(full name)
_KEY_LAYOUTS: list[KeyLayout] = []


def register_model(
    name: str | None = None, *, data_config: DataConfig | None = None, family: str | None = None,
    fixed_input: bool = False,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn`` under ``name`` (default: the function's name).

    Registering a name twice raises: a silent overwrite would make ``create`` depend on
    import order. ``fixed_input``: the network takes one image size, its ``input_size``
    architecture argument (the CLI sets it from the data's resolution).
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered (by {_REGISTRY[key].builder.__module__})")
        for prefix in (TIMM_PREFIX, *_PREFIXES):
            if key.startswith(prefix):
                raise ValueError(f"names starting with {prefix!r} are reserved (resolved by a prefix)")
        fam = family or fn.__module__.rsplit(".", 1)[-1]
        _REGISTRY[key] = ModelEntry(key, fn, data_config or DataConfig(), fam, fixed_input)
        return fn

    return deco


def register_prefix(prefix: str, resolver: Callable[[str], ModelEntry]) -> None:
    """Names starting with ``prefix`` (e.g. ``timm/``) resolve through ``resolver(name)``."""
    if prefix in _PREFIXES:
        raise ValueError(f"prefix {prefix!r} is already registered")
    _PREFIXES[prefix] = resolver


def register_key_layout(name: str, applies: Callable[[list], bool], convert: Callable[[dict, nn.Module], dict]) -> None:
    """Register a family's conversion from a foreign checkpoint key layout (see :class:`KeyLayout`)."""
    if any(k.name == name for k in _KEY_LAYOUTS):
        raise ValueError(f"key layout {name!r} is already registered")
    _KEY_LAYOUTS.append(KeyLayout(name, applies, convert))


def key_layouts() -> list[KeyLayout]:
    return list(_KEY_LAYOUTS)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; ``pattern`` is an fnmatch filter such as ``"resnet*"``."""
    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def get_entry(name: str) -> ModelEntry:
    for prefix, resolve in _PREFIXES.items():
        if name.startswith(prefix):
            return resolve(name)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} `zoo models` lists the registered names; "
            f"any timm architecture works as '{TIMM_PREFIX}<name>'."
        )
    return _REGISTRY[name]


def get_data_config(name: str) -> DataConfig:
    return get_entry(name).data_config


def create_network(name: str, *, num_classes: int = 1000, **arch_args) -> nn.Module:
    """Build the bare ``nn.Module`` for ``name`` (random init)."""
    return get_entry(name).builder(num_classes=num_classes, **arch_args)
