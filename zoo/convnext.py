"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s"), built by timm.

Why timm's module rather than torchvision's: timm's key layout (``stem.*``,
``stages.N.blocks.M.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}``, ``head.{norm,fc}``) is the one
of the Hugging Face hub checkpoints (``hf-hub:timm/convnext_*``) and of the ``timm/<name>``
entries, and timm's ``checkpoint_filter_fn`` already maps the official facebookresearch/ConvNeXt
layout onto it. This family registers its key layouts with the registry (``zoo.weights`` tries
them when keys do not fit as they are): official -> timm (timm's own filter), torchvision
(``features.*``, ``classifier.*``) -> timm and back. Parameter counts equal torchvision's
tables (tests check); the modules compute the same function.
Order as in timm: builder, key layouts, data configs, registered entry points.
"""

from __future__ import annotations

import re

from timm.models.convnext import ConvNeXt
from timm.models.convnext import checkpoint_filter_fn as _timm_filter
from torch import nn

from .registry import DataConfig, register_key_layout, register_model


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
    """A ConvNeXt with random weights: timm's init, which is the paper's code's
    (facebookresearch/ConvNeXt models/convnext.py ``_init_weights``: conv and linear weights
    trunc-normal std 0.02, biases 0; LayerNorm 1/0; layer scale 1e-6; head x head_init_scale).

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


# ----------------------------------------------------------------------------- key layouts
# torchvision's ConvNeXt block is a Sequential: 0 depthwise conv, 1 permute, 2 LayerNorm,
# 3 Linear, 4 GELU, 5 Linear, 6 permute (torchvision/models/convnext.py CNBlock).
_TV_BLOCK = {"0": "conv_dw", "2": "norm", "3": "mlp.fc1", "5": "mlp.fc2"}
_TIMM_BLOCK = {v: k for k, v in _TV_BLOCK.items()}


def _tv_to_timm_key(k: str) -> str:
    """torchvision ConvNeXt (features.*, classifier.*) -> timm (stem, stages, head)."""
    m = re.match(r"features\.(\d+)\.(.*)$", k)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if i == 0:
            return f"stem.{rest}"
        if i % 2 == 0:  # features[2s]: LayerNorm2d + 2x2 conv downsampling into stage s
            return f"stages.{i // 2}.downsample.{rest}"
        s = (i - 1) // 2
        b = re.match(r"(\d+)\.layer_scale$", rest)
        if b:
            return f"stages.{s}.blocks.{b.group(1)}.gamma"
        b = re.match(r"(\d+)\.block\.(\d+)\.(.*)$", rest)
        if b and b.group(2) in _TV_BLOCK:
            return f"stages.{s}.blocks.{b.group(1)}.{_TV_BLOCK[b.group(2)]}.{b.group(3)}"
        return k
    k = re.sub(r"^classifier\.0\.", "head.norm.", k)
    return re.sub(r"^classifier\.2\.", "head.fc.", k)


def _timm_to_tv_key(k: str) -> str:
    """timm ConvNeXt -> torchvision (inverse of :func:`_tv_to_timm_key`)."""
    m = re.match(r"stem\.(.*)$", k)
    if m:
        return f"features.0.{m.group(1)}"
    m = re.match(r"stages\.(\d+)\.downsample\.(.*)$", k)
    if m:
        return f"features.{2 * int(m.group(1))}.{m.group(2)}"
    m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)$", k)
    if m:
        s, j, rest = int(m.group(1)), m.group(2), m.group(3)
        if rest == "gamma":
            return f"features.{2 * s + 1}.{j}.layer_scale"
        for timm_name, tv_idx in _TIMM_BLOCK.items():
            if rest.startswith(timm_name + "."):
                return f"features.{2 * s + 1}.{j}.block.{tv_idx}.{rest[len(timm_name) + 1:]}"
        return k
    k = re.sub(r"^head\.norm\.", "classifier.0.", k)
    return re.sub(r"^head\.fc\.", "classifier.2.", k)


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Any known ConvNeXt layout -> timm's (this family's modules), as timm's filter functions.

    The official facebookresearch/ConvNeXt layout (``downsample_layers.*``, ``dwconv``,
    ``pwconv1``, ...) goes through timm's own ``checkpoint_filter_fn``; torchvision's layout
    through :func:`_tv_to_timm_key`.
    """
    keys = list(state_dict)
    if any(k.startswith("downsample_layers.") for k in keys):
        return _timm_filter(state_dict, model)
    if any(re.match(r"features\.\d+\.\d+\.block\.", k) for k in keys):
        return {_tv_to_timm_key(k): v for k, v in state_dict.items()}
    return dict(state_dict)


register_key_layout(
    "official ConvNeXt -> timm",
    lambda keys: any(k.startswith("downsample_layers.") for k in keys),
    checkpoint_filter_fn,
)
register_key_layout(
    "torchvision ConvNeXt -> timm",
    lambda keys: any(re.match(r"features\.\d+\.\d+\.block\.", k) for k in keys),
    checkpoint_filter_fn,
)
# timm's layout into a plain torchvision ConvNeXt (zoo.weights.load_weights on a torchvision net)
register_key_layout(
    "timm ConvNeXt -> torchvision",
    lambda keys: any(re.match(r"stages\.\d+\.blocks\.\d+\.conv_dw\.", k) for k in keys),
    lambda sd, model: {_timm_to_tv_key(k): v for k, v in sd.items()},
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
