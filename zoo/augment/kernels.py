"""The ops' kernels on batches with per-sample arguments, shared by the grouped and the masked
paths: colour blends, integer (uint8 -> uint8) ops, affine matrices, the warp and whole-pixel shifts."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from .policy import (
    AUTOCONTRAST, BRIGHTNESS, COLOR, CONTRAST, EQUALIZE, INVERT, POSTERIZE, ROTATE, SHARPNESS, SHEAR_X, SHEAR_Y,
    SOLARIZE, SOLARIZE_ADD, TRANSLATE_X, TRANSLATE_Y,
)
from .resample import grid_sample_head

UINT8_OPS = frozenset({POSTERIZE, SOLARIZE, SOLARIZE_ADD, EQUALIZE, INVERT})


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def colour(op: int, images: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Colour op ``op`` on uint8 ``images``, computed in float, rounded back to uint8."""
    f = images.float()
    colour_(op, f, a)
    return to_uint8(f)

def colour_(op: int, x: torch.Tensor, a: torch.Tensor) -> None:
    """Apply colour op ``op`` with per-sample arguments ``a`` (N, 1, 1, 1) to float ``x`` in place."""
    if op == BRIGHTNESS:  # blend with black
        x.mul_(a)
    elif op == COLOR:  # blend with the grey image (ITU-R 601-2 luma, PIL's "L")
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).round_()
        x.sub_(grey).mul_(a).add_(grey)
    elif op == CONTRAST:  # blend with the mean grey level of each image
        grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        mean = grey.mean(dim=(2, 3), keepdim=True).round_()
        x.sub_(mean).mul_(a).add_(mean)
    elif op == SHARPNESS:  # blend with PIL's SMOOTH kernel (1s around a 5, / 13), border unchanged
        inner = x[..., 1:-1, 1:-1]
        # 3x3 box sum as two 3-tap sums of shifted views (exact in float; ~12x cheaper than
        # avg_pool2d on one CPU thread at 224 px, measured) + 4 x centre
        rows = x[..., :-2] + x[..., 1:-1] + x[..., 2:]
        blur = (rows[..., :-2, :] + rows[..., 1:-1, :]).add_(rows[..., 2:, :]).add_(inner, alpha=4).div_(13).round_()
        inner.sub_(blur).mul_(a).add_(blur)
    elif op == AUTOCONTRAST:  # per channel: min -> 0, max -> 255 (unchanged if flat)
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        flat = hi <= lo
        scale = torch.where(flat, torch.ones_like(hi), 255.0 / (hi - lo).clamp(min=1))
        x.sub_(torch.where(flat, torch.zeros_like(lo), lo)).mul_(scale).floor_()  # PIL: int(ix * scale + offset)
    else:
        raise AssertionError(op)

def integer(op: int, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Ops that map uint8 to uint8 exactly, computed on uint8 (or int16) tensors."""
    if op == POSTERIZE:  # keep the top `bits` bits (PIL: img & ~(2**(8 - bits) - 1))
        mask = (256 - torch.exp2(8 - a)).to(torch.uint8)
        return x & mask
    if op == SOLARIZE:  # invert pixels >= threshold (threshold 256: none)
        return torch.where(x >= a.ceil().to(torch.int16), 255 - x, x)
    if op == SOLARIZE_ADD:  # timm: add to pixels < 128, clipped at 255
        return torch.where(x < 128, (x.to(torch.int16) + a.to(torch.int16)).clamp_(max=255).to(torch.uint8), x)
    if op == EQUALIZE:  # torchvision's batched histogram equalisation (PIL's algorithm)
        return TF.equalize(x)
    if op == INVERT:
        return 255 - x
    raise AssertionError(op)


def theta(ops: torch.Tensor, arg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-sample ``affine_grid`` matrices (output -> input, normalised coordinates).

    Built in pixel coordinates centred on the image (PIL's and torchvision's conventions agree:
    shears about the top-left corner, rotation counter-clockwise about the centre; the
    argument of a translation is the input offset, ``x_in = x_out + t``).
    """
    # element-wise in numpy: boolean-mask assignments in small torch CPU ops cost several
    # times more host time per layer (docs/benchmarks.md, "GPU")
    o, a = ops.numpy(), arg.numpy().astype(np.float64)
    sx, sy, tx, ty, r = (o == SHEAR_X), (o == SHEAR_Y), (o == TRANSLATE_X), (o == TRANSLATE_Y), (o == ROTATE)
    rad = np.deg2rad(np.where(r, a, 0.0))
    c, s = np.cos(rad), np.sin(rad)  # identity where not a rotation
    # pixel coordinates centred on the image; shears about the corner: x_in = x + s*y in corner coordinates
    m01 = np.where(sx, a, -s)
    m02 = np.where(sx, a * h / 2, np.where(tx, a, 0.0))
    m10 = np.where(sy, a, s)
    m12 = np.where(sy, a * w / 2, np.where(ty, a, 0.0))
    # pixel (centred) -> normalised coordinates for align_corners=False
    theta = np.stack([c, m01 * h / w, m02 * 2 / w, m10 * w / h, c, m12 * 2 / h], axis=1)
    return torch.from_numpy(theta.astype(np.float32)).view(-1, 2, 3)


def affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, [n, 1, h, w], align_corners=False)`` by broadcasting.

    The same sampling points (to float rounding); affine_grid multiplies an (n, h*w, 3) base
    grid with a batched matmul whose inner size is 3, which on a CPU cost ~16 ms for 32 images
    of 224 px vs ~1 ms here.
    """
    n = theta.shape[0]
    xs = (torch.linspace(-1, 1, w, device=theta.device, dtype=theta.dtype) * ((w - 1) / w)).view(1, 1, w)
    ys = (torch.linspace(-1, 1, h, device=theta.device, dtype=theta.dtype) * ((h - 1) / h)).view(1, h, 1)
    t = theta.view(n, 6, 1, 1)
    grid = torch.empty(n, h, w, 2, device=theta.device, dtype=theta.dtype)
    grid[..., 0].copy_(t[:, 0] * xs + (t[:, 1] * ys + t[:, 2]))
    grid[..., 1].copy_(t[:, 3] * xs + (t[:, 4] * ys + t[:, 5]))
    return grid


def warp(x: torch.Tensor, theta: torch.Tensor, fill: Optional[torch.Tensor], interpolation: str,
          count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Resample with the fill colour outside: ``grid_sample(x - fill) + fill`` (``fill`` None:
    zero, torchvision's; nothing to shift).

    The interpolation weights sum to 1 and zero padding drops the outside taps, so this is
    ``inside + (1 - mask) * fill`` with one 3-channel resample (torchvision resamples a 4th
    "ones" channel for the mask; its blend also scales the inside part by the mask).

    ``count`` (a CPU tensor): resample only the first ``count`` images (a slot's members; the rest
    of the result is left unset) with :func:`grid_sample_head`."""
    n, _, h, w = x.shape
    grid = affine_grid(theta.to(x.dtype), h, w)

    def resample(v: torch.Tensor) -> torch.Tensor:
        if count is None:
            return F.grid_sample(v, grid, mode=interpolation, padding_mode="zeros", align_corners=False)
        return grid_sample_head(v, grid, count, interpolation)

    if fill is None:
        return resample(x)
    fill = fill.to(x.device, x.dtype)  # also when the augmentation was not moved with a model
    return resample(x.sub_(fill)).add_(fill)


def shift(x: torch.Tensor, t: torch.Tensor, dim: int, fill: torch.Tensor) -> torch.Tensor:
    """uint8 ``x`` translated by whole pixels ``t`` (per sample, ``x_in = x_out + t``) along
    ``dim``, the fill colour outside: what the bilinear/bicubic warp gives at integer offsets,
    with one gather instead of a float resample."""
    size = x.shape[dim]
    src = torch.arange(size, device=x.device) + t.long().view(-1, 1)  # (k, size) input positions
    shape = [x.shape[0], 1, 1, 1]
    shape[dim] = size
    valid = ((src >= 0) & (src < size)).view(shape)
    out = torch.gather(x, dim, src.clamp(0, size - 1).view(shape).expand_as(x))
    return torch.where(valid, out, fill.to(x.device, torch.uint8))  # also when not moved with a model
