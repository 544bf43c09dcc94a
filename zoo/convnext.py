"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s"), built by timm.

Why timm's module rather than torchvision's: timm's key layout (``stem.*``,
``stages.N.blocks.M.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}``, ``head.{norm,fc}``) is the one
of the Hugging Face hub checkpoints (``hf-hub:timm/convnext_*``) and of the ``timm/<name>``
entries, and timm already maps the official facebookresearch/ConvNeXt layout onto it;
``zoo/weights.py`` adds torchvision's layout (``features.*``, ``classifier.*``). Parameter
counts equal torchvision's tables (tests check); the modules compute the same function.
Order as in timm: builder, data configs, registered entry points.
"""

from __future__ import annotations

from timm.models.convnext import ConvNeXt
from torch import nn

from .registry import DataConfig, register_model


def _create(
    *,
    depths: tuple[int, ...],
    dims: tuple[int, ...],
    num_classes: int = 1000,
    drop_path_rate: float = 0.0,
    layer_scale_init: float = 1e-6,
    drop_rate: float = 0.0,
    head_init_scale: float = 1.0,
    in_chans: int = 3,
) -> nn.Module:
    """A ConvNeXt with random weights (timm's default init: trunc-normal std 0.02).

    drop_path_rate: stochastic depth rate of the last block, linear from 0 over the blocks
        (Huang et al. 2016; ConvNeXt uses 0.1/0.4/0.5/0.5 for T/S/B/L on ImageNet-1k).
    layer_scale_init: initial value of the per-channel residual scale gamma (Touvron et al.
        2021, CaiT; ConvNeXt 1e-6). 0 or None disables layer scale.
    drop_rate: dropout before the classifier.
    head_init_scale: multiplies the classifier's initial weights (ConvNeXt fine-tuning: 0.001).
    """
    return ConvNeXt(
        in_chans=in_chans,
        num_classes=num_classes,
        depths=depths,
        dims=dims,
        ls_init_value=layer_scale_init or None,
        head_init_scale=head_init_scale,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )


def _tv_eval(resize: int) -> DataConfig:
    # torchvision ConvNeXt_*_Weights.IMAGENET1K_V1: ImageClassification(crop_size=224,
    # resize_size=resize), bilinear, ImageNet mean/std (torchvision/models/convnext.py).
    # timm's / the official FB weights evaluate at crop_pct 0.875, bicubic (timm convnext
    # _cfg); loading those through zoo.weights reports their config in LoadReport.data_config.
    return DataConfig(input_size=224, crop_pct=224 / resize, interpolation="bilinear")


@register_model(data_config=_tv_eval(236))  # 82.52 top-1 (torchvision)
def convnext_tiny(**kwargs) -> nn.Module:
    return _create(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), **kwargs)


@register_model(data_config=_tv_eval(230))  # 83.62
def convnext_small(**kwargs) -> nn.Module:
    return _create(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), **kwargs)


@register_model(data_config=_tv_eval(232))  # 84.06
def convnext_base(**kwargs) -> nn.Module:
    return _create(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), **kwargs)


@register_model(data_config=_tv_eval(232))  # 84.41
def convnext_large(**kwargs) -> nn.Module:
    return _create(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), **kwargs)
