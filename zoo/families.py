"""Imports every architecture family so that their @register_model entries exist."""

from . import linear, mlp, convnet, resnet, convnext  # noqa: F401
