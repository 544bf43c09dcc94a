"""Mixup and cutmix on a normalised batch, drawn as torchvision's
``v2.RandomChoice([v2.MixUp, v2.CutMix])`` draws: :func:`mix_params` on the CPU, :func:`mix` with
fixed shapes on the device (what a compiled step runs), and :func:`torchvision_mixer` (what an
eager step runs: torchvision's own transforms, the same batches from the same generator,
tests/test_augment.py)."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torchvision.transforms import v2


def mix_params(mixers: list[tuple[str, torch.distributions.Beta]], h: int, w: int) -> torch.Tensor:
    """(weight of the image, weight of the previous one (``roll(1, 0)``) outside the box,
    label weights of both, box y1, y2, x1, x2): torchvision's v2 draws, in its order
    (``RandomChoice``: ``multinomial``; ``MixUp``/``CutMix.make_params``). ``mixers``:
    (``mixup`` or ``cutmix``, Beta(alpha, alpha)) in that order."""
    kind, dist = mixers[int(torch.multinomial(torch.tensor([1 / len(mixers)] * len(mixers)), 1))
                        if len(mixers) > 1 else 0]
    lam = float(dist.sample(()))
    if kind == "mixup":
        return torch.tensor([lam, 1.0 - lam, lam, 1.0 - lam, 0, 0, 0, 0])
    r_x, r_y = torch.randint(w, size=(1,)), torch.randint(h, size=(1,))
    r = 0.5 * math.sqrt(1.0 - lam)
    r_w_half, r_h_half = int(r * w), int(r * h)
    x1, y1 = int(torch.clamp(r_x - r_w_half, min=0)), int(torch.clamp(r_y - r_h_half, min=0))
    x2, y2 = int(torch.clamp(r_x + r_w_half, max=w)), int(torch.clamp(r_y + r_h_half, max=h))
    lam_adjusted = float(1.0 - (x2 - x1) * (y2 - y1) / (w * h))
    return torch.tensor([1.0, 0.0, lam_adjusted, 1.0 - lam_adjusted, y1, y2, x1, x2])


def mix(x: torch.Tensor, y: torch.Tensor, params: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch and soft targets mixed by :func:`mix_params`' numbers (on the device)."""
    n, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(h, 1)
    cols = torch.arange(w, device=x.device).view(1, w)
    box = (rows >= params[4]) & (rows < params[5]) & (cols >= params[6]) & (cols < params[7])
    # cutmix: the previous image inside the box, this one outside (weights 0/1 are exact);
    # mixup: an empty box, weights lam and 1 - lam everywhere (v2: roll.mul_(1 - lam).add_(x * lam))
    prev = x.roll(1, 0)
    out = torch.where(box, prev, prev * params[1] + x * params[0])
    hot = torch.zeros(n, num_classes, device=x.device).scatter_(1, y.view(n, 1).long(), 1.0)
    return out, hot.roll(1, 0) * params[3] + hot * params[2]


def torchvision_mixer(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> Optional[v2.Transform]:
    """torchvision's ``MixUp``, ``CutMix`` or ``RandomChoice`` of both (None: neither is on)."""
    mixers = [cls(alpha=a, num_classes=num_classes)
              for cls, a in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if a > 0]
    if not mixers:
        return None
    return v2.RandomChoice(mixers) if len(mixers) > 1 else mixers[0]
