"""The model zoo: every architecture as an ImageClassifier LightningModule, by name.

Layers point one way, as in timm: ``registry`` (imports nothing of the zoo) <- the families
(register into it) <- ``weights`` (state-dict I/O on bare networks) <- ``base`` (the
ImageClassifier) <- ``factory`` (``create`` and ``load``, a model from a name and/or weights)
<- this module. ``create``/``load``/``ImageClassifier`` import Lightning on first use, so a
registry lookup (``zoo.list_models()``) stays light.
"""

import logging

from . import families  # noqa: F401  (runs every family's @register_model)
from .factory import create, load, weights_num_classes
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
    "weights_num_classes",
]

# The package's log lines (``logging.getLogger(__name__)`` in each module) show at INFO, on stderr
# when the application configured no logging, as Lightning's own do (lightning/pytorch/__init__.py);
# else they propagate to its handlers. Silence or redirect them with the standard configuration:
# ``logging.getLogger("zoo").setLevel(logging.WARNING)``.
_log = logging.getLogger(__name__)
if _log.level == logging.NOTSET:
    _log.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers() and not _log.handlers:
    _log.addHandler(logging.StreamHandler())
    _log.propagate = False


def __getattr__(name):  # lazy: importing zoo must not pull in Lightning for a registry lookup
    if name == "ImageClassifier":
        from .base import ImageClassifier

        return ImageClassifier
    raise AttributeError(name)
