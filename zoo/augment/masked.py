"""The masked path of :class:`~zoo.augment.batched.BatchedAutoAugment`: shapes that do not depend
on the draw, so that ``torch.compile`` fuses a layer into a few kernels (the compiled GPU's path)."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Sequence

import torch

from . import kernels
from .kernels import UINT8_OPS, integer, to_uint8
from .policy import (
    AUTOCONTRAST, BRIGHTNESS, COLOR, CONTRAST, EQUALIZE, N_AFFINE, POSTERIZE, SHARPNESS, SOLARIZE, SOLARIZE_ADD,
    TA_WIDE_OPS, TIMM_INC_OPS,
)

# Each op's argument that leaves an image unchanged (colour factors: 1.0), for the masked path.
NEUTRAL = {POSTERIZE: 8.0, SOLARIZE: 256.0, SOLARIZE_ADD: 0.0}


# The masked path's costly ops, run on gathered slots: the warps (one resample for all five),
# and each op that reduces over an image (a histogram, a mean, a min and max).
GROUP_OF = {EQUALIZE: "equalize", CONTRAST: "contrast", AUTOCONTRAST: "autocontrast"}
SLOT_GROUPS = ("warp", *GROUP_OF.values())
OP_OF_GROUP = {g: op for op, g in GROUP_OF.items()}


def in_group(ops, group: str):
    """Whether op ids (a tensor, or one int) are in a slot group: any warp, or the group's op."""
    if group == "warp":
        return ops < N_AFFINE
    return ops == OP_OF_GROUP[group]


@functools.lru_cache(maxsize=256)
def binomial_quantile(n: int, p: float, eps: float) -> int:
    """The smallest c with P(Binomial(n, p) > c) < eps (terms summed in log space).

    Cached: the masked path asks for it at every call with the same few arguments, and the sum
    over n + 1 terms is host time that every training step would pay (docs/benchmarks.md, "GPU")."""
    if p <= 0.0:
        return 0
    if p >= 1.0:
        return n
    log_pmf = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p)
               + (n - k) * math.log1p(-p) for k in range(n + 1)]
    tail = 0.0
    for c in range(n, -1, -1):  # tail = P(X > c) before adding pmf(c)
        if tail >= eps:
            return c + 1
        tail += math.exp(log_pmf[c])
    return 0


def slot_indices(members: torch.Tensor, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, pos) on the CPU for the sample indices ``members`` of a batch of ``n``: ``idx`` lists
    them, padded with sample 0 to ``size``; ``pos[i]`` is sample i's place in ``idx`` (0 for
    samples outside: their gathered result is not kept)."""
    idx = torch.cat([members, torch.zeros(size - members.numel(), dtype=torch.long)])
    pos = torch.zeros(n, dtype=torch.long)
    pos[members] = torch.arange(members.numel())
    return idx, pos


class MaskedPath:
    """:meth:`apply_masked`, mixed into BatchedAutoAugment (uses its ``policy``, ``fill``,
    ``interpolation``, ``compile``)."""

    def apply_masked(self, images: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """:meth:`apply` with shapes that do not depend on the draw.

        Per layer, the cheap pointwise ops (colour blends, LUT-like integer ops, Sharpness's 3x3
        stencil) run on the whole batch and each sample keeps the result of its own op
        (``torch.where``); the costly ones (the warp: 16 taps per pixel for bicubic; Equalize: a
        histogram; Contrast and AutoContrast: a reduction over each image) run on a gathered
        slot of the samples that drew them, and are gathered back (:data:`SLOT_GROUPS`: run on
        the whole batch, these reductions were the costliest kernels of a call). A slot has a
        fixed capacity per batch size (:meth:`capacity`), so a compiled graph sees one shape
        (slot sizes that varied with the draw would recompile at nearly every step); a draw
        that overflows it (odds below 1e-9 per slot) runs uncompiled with larger slots. No sorting, no slices of
        data-dependent size, one host->device copy per call (ops, arguments, slots, affine
        matrices, packed): on a GPU the grouped path is launch-bound (hundreds of small kernels
        per call), and these shapes let ``torch.compile`` fuse each layer into a few kernels
        (figures: docs/benchmarks.md, "GPU"). The one opaque operator is the
        warp slot's resample (:func:`~zoo.augment.resample.grid_sample_head`: ATen's kernel on the slot's real
        members, not its padding).
        """
        n, _, h, w = images.shape
        layers = [(ops.long(), arg.float()) for ops, arg in layers]
        members = [[in_group(ops, g).nonzero().flatten() for g in SLOT_GROUPS] for ops, _ in layers]
        caps = [self.capacity(n, g) for g in SLOT_GROUPS]
        overflow = any(m.numel() > c for per in members for m, c in zip(per, caps))
        if overflow:
            caps = [n] * len(caps)
        # per slot, how many samples it holds: CPU tensors (grid_sample_head reads them without a device wait)
        counts = [torch.tensor(m.numel()) for per in members for m in per]
        parts: list[torch.Tensor] = []  # per layer: ops, arg, warp matrices, then each group's idx, pos
        for (ops, arg), per in zip(layers, members):
            slots = [slot_indices(m, n, c) for m, c in zip(per, caps)]
            warp_idx = slots[SLOT_GROUPS.index("warp")][0]
            parts += [ops.float(), arg, kernels.theta(ops[warp_idx], arg[warp_idx], h, w).flatten()]
            parts += [t.float() for slot in slots for t in slot]
        packed = torch.cat(parts).to(images.device, non_blocking=True)  # small pageable copy: staged, no wait
        tensors = list(packed.split([t.numel() for t in parts]))  # views: no kernels
        if not self.compile or overflow:
            return self._masked(images, tensors, counts)
        if self._compiled is None:  # not an attribute set in __init__: a compiled fn is not picklable
            # static shapes: slot sizes vary only with the batch size (a new batch size compiles again)
            object.__setattr__(self, "_compiled", torch.compile(self._masked, dynamic=False))
            try:  # the first call compiles: a compiler that fails costs speed, not the run
                return self._compiled(images, tensors, counts)
            except Exception as e:
                warnings.warn(f"BatchedAutoAugment: torch.compile of the masked path failed ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); it runs uncompiled "
                              "(the same images, more kernels)", RuntimeWarning, stacklevel=2)
                object.__setattr__(self, "_compiled", self._masked)
                return self._masked(images, tensors, counts)
        return self._compiled(images, tensors, counts)

    def capacity(self, n: int, group: str) -> int:
        """Slot size for ``group`` in a batch of ``n``: the smallest multiple of 8 (at most ``n``,
        the whole batch) that the number of samples drawing the group's ops, Binomial(n, p),
        exceeds with odds below 1e-9 (:func:`binomial_quantile`). For the timm policy at
        n = 128: 56 warps (mean 21.3), 24 for each single op (mean 4.3); ta_wide: 80 / 32.
        (A 300-epoch ImageNet run at batch 128 fills ~2.4e7 slots: one overflow has odds ~2%,
        and costs one uncompiled call.)"""
        ops = TIMM_INC_OPS if self.policy.kind == "timm_rand" else TA_WIDE_OPS
        p = self.policy.prob * sum(bool(in_group(op, group)) for op in ops) / len(ops)
        return min(n, 8 * math.ceil(binomial_quantile(n, p, 1e-9) / 8))

    def _masked(self, x: torch.Tensor, tensors: list[torch.Tensor], counts: list[torch.Tensor]) -> torch.Tensor:
        per_layer = 3 + 2 * len(SLOT_GROUPS)  # ops, arg, matrices, each group's idx and pos (apply_masked)
        for layer, i in enumerate(range(0, len(tensors), per_layer)):
            ops, arg, theta, *slots = tensors[i:i + per_layer]
            count = counts[layer * len(SLOT_GROUPS):(layer + 1) * len(SLOT_GROUPS)]
            slot = {g: (idx, pos, c) for g, idx, pos, c in zip(SLOT_GROUPS, slots[::2], slots[1::2], count)}
            x = self._masked_layer(x, ops, arg, theta, slot)
        return x

    def _masked_layer(self, x: torch.Tensor, ops: torch.Tensor, arg: torch.Tensor, theta: torch.Tensor,
                      slots: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        n = x.shape[0]
        present = self._ops_present

        def arg_of(op: int) -> torch.Tensor:  # the op's argument where it applies, its no-op elsewhere
            return torch.where(ops == op, arg, NEUTRAL.get(op, 1.0)).view(n, 1, 1, 1)

        def keep(op_mask: torch.Tensor, result: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            return torch.where(op_mask.view(n, 1, 1, 1), result, out)

        fill = None if self.fill_is_zero else self.fill

        def on_slot(fn, group: str) -> torch.Tensor:  # fn(slot images, their ids, member count), back in place
            idx, pos, count = slots[group]
            idx = idx.long()
            return fn(x.index_select(0, idx), idx, count).index_select(0, pos.long())

        def colour(op: int):
            return lambda s, idx, count: kernels.colour(op, s, arg_of(op).view(n).index_select(0, idx).view(-1, 1, 1, 1))

        out = x
        if present & set(range(N_AFFINE)):  # all warps in one resample, of the slot's members only
            warp = lambda s, idx, count: to_uint8(kernels.warp(s.float(), theta.view(-1, 2, 3), fill,  # noqa: E731
                                                         self.interpolation, count))
            out = keep(ops < N_AFFINE, on_slot(warp, "warp"), out)
        for op in (BRIGHTNESS, COLOR, CONTRAST, SHARPNESS, AUTOCONTRAST):
            if op in present:
                if op in GROUP_OF:  # a reduction per image: on its slot
                    result = on_slot(colour(op), GROUP_OF[op])
                else:
                    result = kernels.colour(op, x, arg_of(op))
                out = keep(ops == op, result, out)
        for op in sorted(UINT8_OPS & present):
            if op == EQUALIZE:
                result = on_slot(lambda s, idx, count: integer(EQUALIZE, s, None), "equalize")
            else:
                result = integer(op, x, arg_of(op))
            out = keep(ops == op, result, out)
        return out

    @property
    def _ops_present(self) -> set[int]:
        return set(TIMM_INC_OPS if self.policy.kind == "timm_rand" else TA_WIDE_OPS)
