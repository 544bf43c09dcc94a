"""BatchedAutoAugment: RandAugment (timm) / TrivialAugmentWide (torchvision) on a uint8 batch,
per sample: the draw (:mod:`~zoo.augment.policy`), then the grouped
(:mod:`~zoo.augment.grouped`) or the masked (:mod:`~zoo.augment.masked`) path."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .grouped import GroupedPath
from .kernels import warp
from .masked import MaskedPath
from .policy import Policy, sample_layers


class Compiles(nn.Module):
    """A module keeping ``torch.compile``-d bound methods: copies and pickles leave them out (they
    would call the original module), and compile again on first use."""

    _compiled_attrs: tuple[str, ...] = ()

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.update({k: None for k in self._compiled_attrs})
        return state


class BatchedAutoAugment(GroupedPath, MaskedPath, Compiles):
    """RandAugment (timm) / TrivialAugmentWide (torchvision) on a uint8 NCHW batch, per sample.

    Args:
        policy: see :meth:`Policy.parse`.
        mean: the model's mean (0..1): timm fills pixels moved in from outside with this colour
            (``img_mean = round(255 * mean)`` in timm's transforms_factory); torchvision with 0.
        interpolation: ``bilinear``, ``bicubic`` or ``nearest``; None: the policy's default.
        magnitude: M of the legacy name ``randaugment``.
        impl: ``grouped`` (samples sorted by op, each op on its slice: the least arithmetic, many
            small kernels), ``masked`` (:meth:`apply_masked`: fixed shapes, few kernels once
            compiled, more arithmetic) or ``auto``: masked when compiled on CUDA, grouped
            otherwise: compiled, the masked path launches a few fused kernels per layer where
            the grouped one launches hundreds of small ones, so a GPU step stops paying the
            host's launch time; eager, masked does more arithmetic than grouped and is slower
            (figures, machines and commands: docs/benchmarks.md, "GPU"). Both paths give the
            same images for the same draw (tests/test_augment.py).
        compile: run the masked path through ``torch.compile`` (fused kernels; one compile per
            batch shape).
    """

    _compiled_attrs = ("_compiled",)

    def __init__(
        self,
        policy: str | Policy,
        mean: Sequence[float] = (0.485, 0.456, 0.406),  # ImageNet mean (torchvision/timm IMAGENET_DEFAULT_MEAN)
        interpolation: Optional[str] = None,
        magnitude: int = 9,
        impl: str = "auto",
        compile: bool = False,
    ):
        super().__init__()
        if impl not in ("auto", "grouped", "masked"):
            raise ValueError(f"augment impl {impl!r}: use auto, grouped or masked")
        self.impl = impl
        self.compile = compile
        self._compiled = None
        self.policy = policy if isinstance(policy, Policy) else Policy.parse(policy, magnitude)
        fill = [min(255, round(255 * m)) for m in mean] if self.policy.kind == "timm_rand" else [0, 0, 0]
        self.interpolation = interpolation or self.policy.interpolation
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"augment interpolation {self.interpolation!r}: use bilinear, bicubic or nearest")
        self.register_buffer("fill", torch.tensor([float(v) for v in fill]).view(1, 3, 1, 1), persistent=False)
        self.fill_is_zero = not any(fill)  # a Python bool: testing the buffer would wait for the device
        self.last_params: dict | None = None  # the last draw, for tests and diagnostics

    # ------------------------------------------------------------------ sampling (CPU)
    def sample(self, n: int, height: int, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: (op id per sample, argument per sample), drawn on the CPU
        (:func:`~zoo.augment.policy.sample_layers`)."""
        return sample_layers(self.policy, n, height, width)

    # ------------------------------------------------------------------ apply (device)
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"BatchedAutoAugment takes uint8 (N, 3, H, W) batches, got {images.dtype} {tuple(images.shape)}")
        n, _, h, w = images.shape
        layers = self.sample(n, h, w)
        self.last_params = {"layers": layers}
        if self.impl == "masked" or (self.impl == "auto" and self.compile and images.device.type == "cuda"):
            return self.apply_masked(images, layers)
        return self.apply(images, layers)

    def _warp(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Resample with the fill colour outside: ``grid_sample(x - fill) + fill``.

        The interpolation weights sum to 1 and zero padding drops the outside taps, so this is
        ``inside + (1 - mask) * fill`` with one 3-channel resample (torchvision resamples a 4th
        "ones" channel for the mask; its blend also scales the inside part by the mask).
        """
        return warp(x, theta, None if self.fill_is_zero else self.fill, self.interpolation)
