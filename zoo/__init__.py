"""The model zoo: every architecture as an ImageClassifier LightningModule, by name.

Layers point one way, as in timm: ``registry`` (imports nothing of the zoo) <- the families
(register into it) <- this module (imports the families, offers ``create`` and ``load``).
``create``/``load``/``ImageClassifier`` import Lightning on first use, so a registry lookup
(``zoo.list_models()``) stays light.
"""

from . import families  # noqa: F401  (runs every family's @register_model)
from .registry import (
    DataConfig,
    UnknownModelError,
    create_network,
    get_data_config,
    list_models,
    register_model,
)

__all__ = [
    "DataConfig",
    "UnknownModelError",
    "create",
    "create_network",
    "get_data_config",
    "list_models",
    "register_model",
    "ImageClassifier",
    "load",
]


def create(name: str, *, num_classes: int | None = None, weights=None, **kwargs):
    """Build an :class:`~zoo.base.ImageClassifier` (a LightningModule) for ``name``.

    ``kwargs`` are ImageClassifier arguments (optimizer, lr, use_ema, ...); architecture
    arguments go in ``arch_args={...}``. With ``weights``, the network and its preprocessing
    come from them, exactly as :func:`load` with the same ``num_classes`` gives.
    ``num_classes``: ``None`` means as many as the weights have (as :func:`load`), else 1000.
    """
    from .base import ImageClassifier

    if num_classes is None:
        num_classes = 1000
        if weights is not None:
            from .weights.api import _infer_num_classes, _read
            from .weights.sources import reuse_read

            use_ema = kwargs.get("use_ema", True)
            w = _read(weights, use_ema)
            num_classes = w.num_classes or _infer_num_classes(name, kwargs.get("arch_args") or {}, w) or 1000
            with reuse_read(weights, use_ema, w):  # the model loads what was just read
                return ImageClassifier(arch=name, num_classes=num_classes, weights=weights, **kwargs)

    return ImageClassifier(arch=name, num_classes=num_classes, weights=weights, **kwargs)


def load(name=None, weights=None, **kwargs):
    """Build a model and load ``weights``, see :func:`zoo.weights.load`."""
    from .weights import load as _load

    return _load(name, weights, **kwargs)


def __getattr__(name):  # lazy: importing zoo must not pull in Lightning for a registry lookup
    if name == "ImageClassifier":
        from .base import ImageClassifier

        return ImageClassifier
    raise AttributeError(name)
