"""The model zoo: every architecture as an ImageClassifier LightningModule, by name."""

from .registry import (
    DataConfig,
    UnknownModelError,
    create,
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


def __getattr__(name):  # lazy: importing zoo must not pull in Lightning for a registry lookup
    if name == "ImageClassifier":
        from .base import ImageClassifier

        return ImageClassifier
    if name == "load":
        from .weights import load

        return load
    raise AttributeError(name)
