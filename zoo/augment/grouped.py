"""The grouped path of :class:`~zoo.augment.batched.BatchedAutoAugment`: the batch sorted by op,
each op on its contiguous slice (the least arithmetic; many small kernels: the CPU's path)."""

from __future__ import annotations

from typing import Sequence

import torch

from . import kernels
from .kernels import UINT8_OPS, colour, integer, theta, to_uint8
from .policy import IDENTITY, N_AFFINE, TRANSLATE_X, TRANSLATE_Y


class GroupedPath:
    """:meth:`apply`, mixed into BatchedAutoAugment (uses its ``fill`` and ``_warp``)."""

    def apply(self, images: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Apply given per-sample ``(ops, args)`` layers (CPU tensors, as :meth:`sample` draws).

        The batch stays uint8 between layers, as PIL's and torchvision's ops return uint8; only
        the samples an op acts on are converted to float, and written back in place.
        """
        x = images
        for ops, arg in layers:
            x = self._apply_layer(x, ops.long(), arg.float())
        return x.clone() if x is images else x

    def _apply_layer(self, x: torch.Tensor, ops: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
        """One layer on a new tensor: the batch is gathered in op order (one ``index_select``),
        each op rewrites its contiguous slice in place, and a second gather restores the order
        (two full gathers cost less than clone + gather + ``index_copy_`` of the active samples:
        ``index_copy_`` was ~9 ms of a 224 px x 64 call on one CPU thread)."""
        order = torch.argsort(ops, stable=True)  # CPU: group the samples by op
        sorted_ops = ops[order]
        counts = torch.bincount(sorted_ops.clamp(max=IDENTITY + 1), minlength=IDENTITY + 2).tolist()
        bounds = [0]
        for c in counts:
            bounds.append(bounds[-1] + c)
        active = bounds[IDENTITY]  # samples with a real op come first (Identity and SKIP last)
        if active == 0:
            return x
        dev = x.device
        # Small pageable host -> device copies: CUDA stages them at once without waiting for the
        # stream, pinned or not, so a call returns long before queued work ends
        # (tests/test_gpu.py::test_augmentation_does_not_wait_for_the_device).
        a = arg[order[:active]].to(dev, non_blocking=True)
        xs = x.index_select(0, order.to(dev, non_blocking=True))  # uint8, sorted by op
        na = bounds[N_AFFINE]  # geometric ops: one grid_sample for all of them, except ...
        nt, ny = bounds[TRANSLATE_X], bounds[TRANSLATE_Y]
        t = arg[order[nt:na]]  # (CPU) ... translations by whole pixels (torchvision's): exact shifts
        shift = na > nt and bool((t == t.round()).all())
        nw = nt if shift else na
        if nw:
            mats = theta(sorted_ops[:nw], arg[order[:nw]], x.shape[-2], x.shape[-1]).to(dev, non_blocking=True)
            xs[:nw] = to_uint8(self._warp(xs[:nw].float(), mats))
        if shift:
            if ny > nt:
                xs[nt:ny] = kernels.shift(xs[nt:ny], a[nt:ny], 3, self.fill)
            if na > ny:
                xs[ny:na] = kernels.shift(xs[ny:na], a[ny:na], 2, self.fill)
        for op in range(N_AFFINE, IDENTITY):
            lo, hi = bounds[op], bounds[op + 1]
            if hi <= lo:
                continue
            ai = a[lo:hi].view(-1, 1, 1, 1)
            if op in UINT8_OPS:  # integer ops: no float round trip
                xs[lo:hi] = integer(op, xs[lo:hi], ai)
            else:
                xs[lo:hi] = colour(op, xs[lo:hi], ai)
        return xs.index_select(0, torch.argsort(order).to(dev, non_blocking=True))
