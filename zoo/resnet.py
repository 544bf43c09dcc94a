"""ResNet, Wide ResNet and ResNeXt, built by torchvision (``weights=None``).

torchvision's modules are used as they are, so torchvision's published state_dicts load
without any key mapping (timm's ResNets use the same key names: ``conv1``, ``bn1``,
``layerN.M.*``, ``fc``). Parameter counts match torchvision's tables exactly (tests check).
Order as in timm: builder, data config, registered entry points.
"""

from __future__ import annotations

import torchvision.models as tvm
from torch import nn

from .registry import DataConfig, register_model


def _create(variant: str, *, num_classes: int = 1000, zero_init_residual: bool = False) -> nn.Module:
    """torchvision ``variant`` with random weights.

    zero_init_residual: start each residual block's last BN with gamma = 0, so every block
        is the identity at init (Goyal et al. 2017, "Accurate, Large Minibatch SGD", 5.1).
    """
    return getattr(tvm, variant)(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)


# torchvision's IMAGENET1K_V1 eval transforms: ImageClassification(crop_size=224) = resize 256
# (bilinear) and center-crop 224, i.e. crop_pct 0.875 (torchvision/models/resnet.py).
# The IMAGENET1K_V2 weights evaluate at resize 232 (crop_pct 0.9655); loading them through
# ``zoo.load(..., weights="torchvision:ResNet50_Weights.IMAGENET1K_V2")`` reports that config.
_TV_CFG = DataConfig(input_size=224, crop_pct=0.875, interpolation="bilinear")


@register_model(data_config=_TV_CFG)
def resnet18(**kwargs) -> nn.Module:
    return _create("resnet18", **kwargs)


@register_model(data_config=_TV_CFG)
def resnet34(**kwargs) -> nn.Module:
    return _create("resnet34", **kwargs)


@register_model(data_config=_TV_CFG)
def resnet50(**kwargs) -> nn.Module:
    return _create("resnet50", **kwargs)


@register_model(data_config=_TV_CFG)
def resnet101(**kwargs) -> nn.Module:
    return _create("resnet101", **kwargs)


@register_model(data_config=_TV_CFG)
def resnet152(**kwargs) -> nn.Module:
    return _create("resnet152", **kwargs)


@register_model(data_config=_TV_CFG)
def wide_resnet50_2(**kwargs) -> nn.Module:
    return _create("wide_resnet50_2", **kwargs)


@register_model(data_config=_TV_CFG)
def resnext50_32x4d(**kwargs) -> nn.Module:
    return _create("resnext50_32x4d", **kwargs)


@register_model(data_config=_TV_CFG)
def resnext101_32x8d(**kwargs) -> nn.Module:
    return _create("resnext101_32x8d", **kwargs)
