"""``zoo::grid_sample_head``: the masked path's one opaque operator for ``torch.compile``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("zoo::grid_sample_head", mutates_args=())
def grid_sample_head(x: torch.Tensor, grid: torch.Tensor, count: torch.Tensor, interpolation: str) -> torch.Tensor:
    """``F.grid_sample(x, grid)`` (zero padding, ``align_corners=False``) of the first ``count``
    images only; the rest of the result is left unset.

    ``count`` is a CPU tensor: reading it does not wait for the device, and a compiled graph sees
    one shape whatever the draw. An opaque operator for ``torch.compile``, the only one in the
    masked path: inductor fuses the slot's gather, the grid and the rounding around it, and calls
    ATen's grid_sampler kernel on the slot's real members, not its padding: ATen's bicubic
    kernel is faster than inductor's decomposition of ``grid_sample``, and the padding is not
    computed at all. Only the resample is opaque: making the whole slot op opaque (gather and
    Equalize/Contrast/AutoContrast included) launched each op's small kernels from Python, and
    the training step paid that host time (docs/benchmarks.md, "GPU", for both designs).
    """
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    k = int(count)
    if k:
        out[:k] = F.grid_sample(x[:k], grid[:k], mode=interpolation, padding_mode="zeros", align_corners=False)
    return out


@grid_sample_head.register_fake
def _(x, grid, count, interpolation):
    return torch.empty_like(x, memory_format=torch.contiguous_format)
