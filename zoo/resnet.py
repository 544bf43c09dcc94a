"""ResNet, Wide ResNet and ResNeXt, built by torchvision (``weights=None``).

torchvision's modules are used as they are, so torchvision's published state_dicts load
without any key mapping (timm's ResNets use the same key names: ``conv1``, ``bn1``,
``layerN.M.*``, ``fc``). Parameter counts match torchvision's tables exactly (tests check).
Order as in timm: builder, data config, registered entry points.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from .registry import DataConfig, register_model


class BlurConv2d(nn.Conv2d):
    """A strided convolution preceded by a 3x3 binomial low-pass filter per channel.

    Anti-aliased downsampling (Zhang 2019, "Making Convolutional Networks Shift-Invariant
    Again"), as ffcv-imagenet's BlurPoolConv2d (filter [1 2 1]^T [1 2 1] / 16, stride-1 blur,
    then the conv). A subclass of Conv2d with a non-persistent filter, so state_dict keys and
    parameter counts are those of the plain network: torchvision weights load either way.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("blur", (k[:, None] * k[None, :] / 16).view(1, 1, 3, 3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.conv2d(x, self.blur.to(x.dtype).expand(c, 1, 3, 3), padding=1, groups=c)
        return super().forward(x)


def apply_blurpool(module: nn.Module) -> int:
    """Swap every strided conv with >= 16 input channels for a BlurConv2d sharing its weights
    (ffcv-imagenet's rule: np.max(stride) > 1 and in_channels >= 16). Returns how many."""
    n = 0
    for name, child in module.named_children():
        if type(child) is nn.Conv2d and max(child.stride) > 1 and child.in_channels >= 16:
            blur = BlurConv2d(
                child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                padding=child.padding, dilation=child.dilation, groups=child.groups,
                bias=child.bias is not None, device=child.weight.device, dtype=child.weight.dtype,
            )
            blur.weight = child.weight
            if child.bias is not None:
                blur.bias = child.bias
            setattr(module, name, blur)
            n += 1
        else:
            n += apply_blurpool(child)
    return n


def _create(
    variant: str, *, num_classes: int = 1000, zero_init_residual: bool = True, blurpool: bool = False
) -> nn.Module:
    """torchvision ``variant`` with random weights: convs He-normal (fan_out, ReLU), BN gamma 1
    and beta 0, fc PyTorch's Linear default (torchvision's ResNet.__init__, the same as timm's
    ResNet.init_weights), and by default each residual block's last BN at gamma 0.

    zero_init_residual: start each residual block's last BN (``bn2`` of a BasicBlock, ``bn3``
        of a Bottleneck) with gamma = 0, so every block is the identity at init (Goyal et al.
        2017, "Accurate, Large Minibatch SGD", 5.1; He et al. 2019, "Bag of Tricks", 3.1).
        True by default, as timm's ResNet/ResNeXt/Wide ResNet (``zero_init_last=True``);
        torchvision's builder defaults to False, which recipes reproducing ffcv-imagenet's or
        torchvision's published runs set explicitly.
    blurpool: anti-aliased strided convs (ffcv-imagenet's ``use_blurpool: 1``), see BlurConv2d.
    """
    net = getattr(tvm, variant)(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    if blurpool:
        apply_blurpool(net)
    return net


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
