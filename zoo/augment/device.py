"""DeviceAugment: the model's train-time augmentation, in two stages around normalisation."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .batched import BatchedAutoAugment, Compiles
from .erasing import erase, erase_params
from .mixing import mix, mix_params, torchvision_mixer


class DeviceAugment(Compiles):
    """Batch augmentation in two stages around normalisation.

    ``pre_normalise``: per-sample RandAugment / TrivialAugment on uint8 NCHW images
    (:class:`BatchedAutoAugment`).
    ``post_normalise``: per-sample random erasing (``erase_mode='pixel'``: N(0, 1) noise per
    pixel, timm's ``RandomErasing(mode='pixel')``; ``'zero'``: zeros, torchvision's
    ``RandomErasing(value=0)``, i.e. the mean colour after normalisation) on the normalised
    batch, then mixup or cutmix (one of them per batch, each with probability 1/2 when both are
    on, as timm's Mixup with ``switch_prob=0.5``), which turn the labels into soft targets.
    Mixup and cutmix draw their numbers as torchvision's ``v2.RandomChoice([v2.MixUp,
    v2.CutMix])`` does, from the same generator in the same order, and give the same batches
    (tests/test_augment.py): an eager step runs torchvision's transforms themselves, a compiled
    one :func:`~zoo.augment.mixing.mix` (fixed shapes).

    Every random number is drawn on the CPU and sent in one small copy per stage; the device
    work has fixed shapes, so ``compile=True`` fuses each stage into a few kernels on CUDA (on a
    CPU both stages stay eager: the grouped RandAugment path, and no compile wait).
    """

    _compiled_attrs = ("_compiled_post",)

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        random_erasing: float = 0.0,
        auto_augment: Optional[str] = None,
        magnitude: int = 9,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        interpolation: Optional[str] = None,
        erase_mode: str = "pixel",
        compile: bool = False,
    ) -> None:
        super().__init__()
        for name, v in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if not 0.0 <= random_erasing <= 1.0:
            raise ValueError(f"random_erasing is a probability in [0, 1], got {random_erasing}")
        if not 0 <= magnitude <= 10:
            raise ValueError(f"auto_augment_magnitude is on timm's 0..10 scale, got {magnitude}")
        if erase_mode not in ("pixel", "zero"):
            raise ValueError(f"random_erasing_mode {erase_mode!r}: use 'pixel' (timm) or 'zero' (torchvision)")
        self.num_classes = num_classes
        self.auto = (BatchedAutoAugment(auto_augment, mean, interpolation, magnitude, compile=compile)
                     if auto_augment else None)
        # (kind, Beta(alpha, alpha)) in v2.RandomChoice's order
        self.mixers = [(kind, torch.distributions.Beta(torch.tensor([a]), torch.tensor([a])))
                       for kind, a in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if a > 0]
        self.mixer = torchvision_mixer(mixup_alpha, cutmix_alpha, num_classes)
        self.random_erasing = random_erasing
        self.erase_mode = erase_mode
        self.compile = compile
        self._compiled_post = None

    def pre_normalise(self, images: torch.Tensor) -> torch.Tensor:
        if self.auto is None:
            return images
        return self.auto(images)

    def post_normalise(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.random_erasing <= 0 and not self.mixers:
            return x, y
        n, _, h, w = x.shape
        compiled = self.compile and x.device.type == "cuda"  # as the masked pre stage: compiled on CUDA only
        # Eager: torchvision's MixUp/CutMix, except where the order of the draws would change: the
        # noise of pixel erasing on a CPU batch comes from the generator that the mix draws from,
        # after the mix's numbers (what a compiled step and the seeds of earlier runs do).
        noise_after_mix = self.random_erasing > 0 and self.erase_mode == "pixel" and x.device.type == "cpu"
        if not compiled and self.mixer is not None and not noise_after_mix:
            if self.random_erasing > 0:
                x = erase(x, erase_params(n, h, w, self.random_erasing).to(x.device, non_blocking=True), self.erase_mode)
            return self.mixer(x, y.long())
        parts = []
        if self.random_erasing > 0:
            parts.append(erase_params(n, h, w, self.random_erasing).flatten())
        if self.mixers:
            parts.append(mix_params(self.mixers, h, w))
        packed = torch.cat(parts).to(x.device, non_blocking=True)  # one small copy, no wait
        if not compiled:
            return self._post(x, y, packed)
        if self._compiled_post is None:
            object.__setattr__(self, "_compiled_post", torch.compile(self._post, dynamic=False))
        return self._compiled_post(x, y, packed)

    def _post(self, x: torch.Tensor, y: torch.Tensor, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        if self.random_erasing > 0:
            x = erase(x, packed[: 4 * n].view(4, n), self.erase_mode)
            packed = packed[4 * n:]
        if not self.mixers:
            return x, y
        return mix(x, y, packed, self.num_classes)
