"""Random erasing (Zhong et al. 2017): boxes drawn on the CPU, erased in one vectorised op."""

from __future__ import annotations

import torch


def erase_params(
    n: int,
    h: int,
    w: int,
    p: float,
    area: tuple[float, float] = (0.02, 1 / 3),
    log_ratio: tuple[float, float] = (-1.2040, 1.2040),  # log(0.3), log(1/0.3): Zhong et al. 2017
) -> torch.Tensor:
    """Random-erasing boxes (top, bottom, left, right) x n, drawn on the CPU; an empty box where a
    sample is not erased (probability ``1 - p``). Area fraction and aspect-ratio ranges are Zhong
    et al. 2017's, also timm's and torchvision's defaults."""
    frac = torch.empty(n).uniform_(*area)
    ratio = torch.exp(torch.empty(n).uniform_(*log_ratio))
    eh = torch.sqrt(frac * h * w * ratio).clamp(1, h).long()
    ew = torch.sqrt(frac * h * w / ratio).clamp(1, w).long()
    top = (torch.rand(n) * (h - eh + 1)).long()
    left = (torch.rand(n) * (w - ew + 1)).long()
    on = torch.rand(n) < p
    return torch.stack([top, top + eh * on, left, left + ew]).float()


def erase(x: torch.Tensor, box: torch.Tensor, mode: str) -> torch.Tensor:
    n, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w)
    b = box.view(4, n, 1, 1, 1)
    mask = (rows >= b[0]) & (rows < b[1]) & (cols >= b[2]) & (cols < b[3])
    fill = torch.randn_like(x) if mode == "pixel" else torch.zeros((), device=x.device, dtype=x.dtype)
    return torch.where(mask, fill, x)


def random_erase(
    x: torch.Tensor,
    p: float,
    area: tuple[float, float] = (0.02, 1 / 3),
    log_ratio: tuple[float, float] = (-1.2040, 1.2040),
    mode: str = "pixel",
) -> torch.Tensor:
    """Erase one random rectangle per sample with probability ``p`` (:func:`erase_params`).

    ``mode='pixel'``: filled with N(0, 1) noise (timm); ``'zero'``: zeros (torchvision's
    ``value=0``). Vectorised over the batch (no per-sample Python loop).
    """
    n, _, h, w = x.shape
    return erase(x, erase_params(n, h, w, p, area, log_ratio).to(x.device, non_blocking=True), mode)
