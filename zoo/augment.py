"""Train-time augmentation on the device, after the host->device transfer.

FFCV's pipeline does crops and flips on the CPU; the heavier recipe augmentations
(RandAugment/TrivialAugment, random erasing, mixup/cutmix) run here on whatever device the
model is on, so they work the same with either data backend.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchvision.transforms import v2


class DeviceAugment(nn.Module):
    """Batch augmentation in two stages around normalisation.

    ``pre_normalise``: per-sample RandAugment / TrivialAugment on uint8 NCHW images.
    ``post_normalise``: per-sample random erasing (normal noise, timm's ``mode='pixel'``)
    on the normalised batch, then mixup or cutmix (one of them per batch, each with
    probability 1/2 when both are on, as timm's Mixup with ``switch_prob=0.5``), which turn the
    labels into soft targets.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        random_erasing: float = 0.0,
        auto_augment: Optional[str] = None,
        magnitude: int = 9,
    ) -> None:
        super().__init__()
        for name, v in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if not 0.0 <= random_erasing <= 1.0:
            raise ValueError(f"random_erasing is a probability in [0, 1], got {random_erasing}")
        if not 0 <= magnitude <= 10:
            raise ValueError(f"auto_augment_magnitude is on timm's 0..10 scale, got {magnitude}")
        if auto_augment == "randaugment":
            # RandAugment(N=2, M=9): Cubuk et al. 2020; timm's rand-m9-mstd0.5 recipe uses M=9
            # on a 0..10 scale (timm _LEVEL_DENOM = 10), hence 11 bins rather than
            # torchvision's default 31.
            self.auto = v2.RandAugment(num_ops=2, magnitude=magnitude, num_magnitude_bins=11)
        elif auto_augment == "trivialaugment":
            self.auto = v2.TrivialAugmentWide()
        elif auto_augment is None:
            self.auto = None
        else:
            raise ValueError(f"unknown auto_augment {auto_augment!r}; choose randaugment, trivialaugment or null")
        mixers = []
        if mixup_alpha > 0:
            mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(mixers) if len(mixers) > 1 else (mixers[0] if mixers else None)
        self.random_erasing = random_erasing

    def pre_normalise(self, images: torch.Tensor) -> torch.Tensor:
        if self.auto is None:
            return images
        # One policy draw per image: a batch-level call would apply the same ops to all.
        return torch.stack([self.auto(img) for img in images])

    def post_normalise(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.random_erasing > 0:
            x = random_erase(x, self.random_erasing)
        if self.mix is not None:
            x, y = self.mix(x, y)
        return x, y


def random_erase(
    x: torch.Tensor,
    p: float,
    area: tuple[float, float] = (0.02, 1 / 3),
    log_ratio: tuple[float, float] = (-1.2040, 1.2040),  # log(0.3), log(1/0.3): Zhong et al. 2017
) -> torch.Tensor:
    """Erase one random rectangle per sample with probability ``p``, filled with N(0, 1) noise.

    Vectorised over the batch (no per-sample Python loop). Area fraction and aspect-ratio
    ranges are Zhong et al. 2017's, also timm's RandomErasing defaults.
    """
    n, _, h, w = x.shape
    dev = x.device
    frac = torch.empty(n, device=dev).uniform_(*area)
    ratio = torch.exp(torch.empty(n, device=dev).uniform_(*log_ratio))
    eh = (torch.sqrt(frac * h * w * ratio)).clamp(1, h).long()
    ew = (torch.sqrt(frac * h * w / ratio)).clamp(1, w).long()
    top = (torch.rand(n, device=dev) * (h - eh + 1)).long()
    left = (torch.rand(n, device=dev) * (w - ew + 1)).long()
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    mask = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + eh).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + ew).view(n, 1, 1))
        & (torch.rand(n, 1, 1, device=dev) < p)
    ).unsqueeze(1)
    return torch.where(mask, torch.randn_like(x), x)
