"""Imports every architecture family so that their registry entries exist.

The one module above the families (``zoo/__init__.py`` imports it): adding a family is one
more name here.
"""

from . import convnet, convnext, linear, mlp, resnet, timm_model  # noqa: F401
