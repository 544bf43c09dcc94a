"""Train-time augmentation on the device, after the host->device transfer.

FFCV's pipeline does crops and flips on the CPU; the heavier recipe augmentations
(RandAugment/TrivialAugment, random erasing, mixup/cutmix) run here on whatever device the
model is on, so they work the same with either data backend.

RandAugment / TrivialAugment are batched: the per-sample choices (op, whether it applies,
magnitude, sign) are drawn on the CPU with torch's default generator (seeded by
``seed_everything``; a few hundred numbers, so no host-device sync is needed to group the
samples), the batch is sorted by op once per layer, and each op runs as one vectorised kernel
over its contiguous slice: colour ops with per-sample broadcast factors, all geometric ops of a
layer in one ``affine_grid``/``grid_sample`` with per-sample matrices. No Python loop over images.
That grouped path is the CPU's; compiled on a GPU the masked path runs instead
(:meth:`BatchedAutoAugment.apply_masked`: shapes that do not depend on the draw, so
``torch.compile`` fuses a layer into a few kernels; the same images).

Two variants, each faithful to the implementation a recipe cites (``policy``):

- ``rand-m9-mstd0.5-inc1`` (timm ``rand_augment_transform``, ConvNeXt's ``--aa``): 2 layers,
  each op drawn uniformly from the 15 "increasing" ops and applied with probability 0.5,
  magnitude ~ N(M, mstd) per op clipped to [0, 10], fill = the model's mean colour, bicubic.
  (timm's ``transforms_factory`` passes ``img_mean`` and ``train_interpolation``.)
- ``ta_wide`` (torchvision ``TrivialAugmentWide``, the tv2 recipe's ``--auto-augment ta_wide``):
  one op from 14 (incl. Identity), magnitude one of 31 bins, random sign, fill 0, bilinear
  (references/classification/presets.py passes the recipe's interpolation).

Known differences from the PIL/torchvision kernels, all below a few grey levels on average
(tests/test_augment.py): torch's bicubic uses a = -0.75 where PIL uses -0.5; warps blend the
fill into border pixels as torchvision does, where PIL fills whole pixels; intermediate values
are rounded to integers after every op (PIL rounds, torchvision truncates some blends).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

# Op ids; geometric ops (< N_AFFINE) come first so a sorted layer has them in one slice, the
# translations last among them (integer translations are shifts, not resamples).
SHEAR_X, SHEAR_Y, ROTATE, TRANSLATE_X, TRANSLATE_Y = range(5)
N_AFFINE = 5
(BRIGHTNESS, COLOR, CONTRAST, SHARPNESS, POSTERIZE, SOLARIZE, SOLARIZE_ADD,
 AUTOCONTRAST, EQUALIZE, INVERT, IDENTITY) = range(5, 16)
OP_NAMES = (
    "ShearX", "ShearY", "Rotate", "TranslateX", "TranslateY", "Brightness", "Color", "Contrast",
    "Sharpness", "Posterize", "Solarize", "SolarizeAdd", "AutoContrast", "Equalize", "Invert", "Identity",
)
SKIP = 99  # a layer not applied to a sample (timm's p=0.5): sorts last, left untouched

# timm _RAND_INCREASING_TRANSFORMS (timm/data/auto_augment.py), in timm's order.
TIMM_INC_OPS = (AUTOCONTRAST, EQUALIZE, INVERT, ROTATE, POSTERIZE, SOLARIZE, SOLARIZE_ADD, COLOR,
                CONTRAST, BRIGHTNESS, SHARPNESS, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y)
# torchvision TrivialAugmentWide._AUGMENTATION_SPACE, in its order.
TA_WIDE_OPS = (IDENTITY, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y, ROTATE, BRIGHTNESS, COLOR,
               CONTRAST, SHARPNESS, POSTERIZE, SOLARIZE, AUTOCONTRAST, EQUALIZE)
TA_BINS = 31  # TrivialAugmentWide(num_magnitude_bins=31)

_TIMM_RE = re.compile(r"^rand(-[a-z]+[\d.]+)*$")


@dataclass(frozen=True)
class Policy:
    """A parsed augmentation policy: which implementation's semantics to follow."""

    kind: str  # "timm_rand" or "ta_wide"
    num_layers: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.0
    prob: float = 0.5
    interpolation: str = "bicubic"

    @staticmethod
    def parse(name: str, magnitude: int = 9) -> "Policy":
        """``rand-m9-mstd0.5-inc1`` (timm), ``ta_wide`` (torchvision), or the legacy names
        ``randaugment`` (= ``rand-m{magnitude}-mstd0.5-inc1``) and ``trivialaugment`` (= ``ta_wide``)."""
        if name in ("ta_wide", "trivialaugment"):
            return Policy("ta_wide", num_layers=1, prob=1.0, interpolation="bilinear")
        if name == "randaugment":
            name = f"rand-m{magnitude}-mstd0.5-inc1"
        if not _TIMM_RE.match(name):
            raise ValueError(
                f"unknown auto_augment {name!r}: use a timm RandAugment string such as "
                "'rand-m9-mstd0.5-inc1', 'ta_wide' (torchvision TrivialAugmentWide), or null"
            )
        kw: dict = {"magnitude": 10.0}  # timm's default M is _LEVEL_DENOM
        for part in name.split("-")[1:]:
            key, val = re.match(r"([a-z]+)([\d.]+)", part).groups()
            if key == "m":
                kw["magnitude"] = float(int(val))
            elif key == "mstd":
                kw["magnitude_std"] = float(val)
            elif key == "n":
                kw["num_layers"] = int(val)
            elif key == "p":
                kw["prob"] = float(val)
            elif key == "inc":
                if not int(val):
                    raise ValueError(f"auto_augment {name!r}: only timm's increasing op set (inc1) is implemented")
            else:
                raise ValueError(f"auto_augment {name!r}: unknown section {part!r} (supported: m, mstd, n, p, inc1)")
        if kw.get("magnitude_std", 0.0) > 100:
            raise ValueError(f"auto_augment {name!r}: uniform magnitudes (mstd > 100) are not implemented")
        if "inc1" not in name.split("-"):
            raise ValueError(f"auto_augment {name!r}: add '-inc1': only timm's increasing op set is implemented")
        return Policy("timm_rand", **kw)


class _Compiles(nn.Module):
    """A module keeping ``torch.compile``-d bound methods: copies and pickles leave them out (they
    would call the original module), and compile again on first use."""

    _compiled_attrs: tuple[str, ...] = ()

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.update({k: None for k in self._compiled_attrs})
        return state


class BatchedAutoAugment(_Compiles):
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
        """Per layer: (op id per sample, argument per sample), drawn on the CPU.

        The argument is what the kernel takes: a factor, a threshold, a number of bits, or an
        affine parameter (shear factor, pixels, degrees), signs included.
        """
        p = self.policy
        layers = []
        for _ in range(p.num_layers):
            if p.kind == "timm_rand":
                ops = torch.tensor(TIMM_INC_OPS)[torch.randint(len(TIMM_INC_OPS), (n,))]
                # AugmentOp: skipped when random() > prob; magnitude = clip(gauss(M, mstd), 0, 10)
                skip = torch.rand(n) > p.prob
                mag = torch.full((n,), p.magnitude)
                if p.magnitude_std > 0:
                    mag = mag + p.magnitude_std * torch.randn(n)
                level = mag.clamp(0.0, 10.0) / 10.0  # timm _LEVEL_DENOM
                sign = torch.where(torch.rand(n) > 0.5, -1.0, 1.0)  # _randomly_negate
                arg = torch.zeros(n)
                arg = torch.where(ops == ROTATE, sign * level * 30.0, arg)
                arg = torch.where((ops == SHEAR_X) | (ops == SHEAR_Y), sign * level * 0.3, arg)
                arg = torch.where(ops == TRANSLATE_X, sign * level * 0.45 * width, arg)  # translate_pct 0.45
                arg = torch.where(ops == TRANSLATE_Y, sign * level * 0.45 * height, arg)
                enh = (ops == COLOR) | (ops == CONTRAST) | (ops == BRIGHTNESS) | (ops == SHARPNESS)
                arg = torch.where(enh, (1.0 + sign * level * 0.9).clamp(min=0.1), arg)
                arg = torch.where(ops == POSTERIZE, 4.0 - torch.floor(level * 4), arg)  # bits kept
                arg = torch.where(ops == SOLARIZE, 256.0 - torch.floor(level * 256).clamp(max=256), arg)
                arg = torch.where(ops == SOLARIZE_ADD, torch.floor(level * 110).clamp(max=128), arg)
                ops = torch.where(skip, torch.full_like(ops, SKIP), ops)
            else:  # torchvision TrivialAugmentWide.forward
                ops = torch.tensor(TA_WIDE_OPS)[torch.randint(len(TA_WIDE_OPS), (n,))]
                b = torch.randint(TA_BINS, (n,)).float()
                sign = torch.where(torch.rand(n) <= 0.5, -1.0, 1.0)
                lin = b / (TA_BINS - 1)  # torch.linspace(0, x, 31)[b] = x * b / 30
                arg = torch.zeros(n)
                arg = torch.where((ops == SHEAR_X) | (ops == SHEAR_Y), sign * lin * 0.99, arg)
                # translate=[int(magnitude), 0] moves the content by +t: x_in = x_out - t
                arg = torch.where((ops == TRANSLATE_X) | (ops == TRANSLATE_Y), -torch.trunc(sign * lin * 32.0), arg)
                arg = torch.where(ops == ROTATE, sign * lin * 135.0, arg)
                enh = (ops == COLOR) | (ops == CONTRAST) | (ops == BRIGHTNESS) | (ops == SHARPNESS)
                arg = torch.where(enh, 1.0 + sign * lin * 0.99, arg)
                arg = torch.where(ops == POSTERIZE, torch.round(8 - b / ((TA_BINS - 1) / 6)), arg)
                arg = torch.where(ops == SOLARIZE, 255.0 * (1.0 - lin), arg)
            layers.append((ops, arg))
        return layers

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

    def apply_masked(self, images: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """:meth:`apply` with shapes that do not depend on the draw.

        Per layer, the cheap pointwise ops (colour blends, LUT-like integer ops, Sharpness's 3x3
        stencil) run on the whole batch and each sample keeps the result of its own op
        (``torch.where``); the costly ones (the warp: 16 taps per pixel for bicubic; Equalize: a
        histogram; Contrast and AutoContrast: a reduction over each image) run on a gathered
        slot of the samples that drew them, and are gathered back (:data:`_SLOT_GROUPS`: run on
        the whole batch, these reductions were the costliest kernels of a call). A slot has a
        fixed capacity per batch size (:meth:`capacity`), so a compiled graph sees one shape
        (slot sizes that varied with the draw would recompile at nearly every step); a draw
        that overflows it (odds below 1e-9 per slot) runs uncompiled with larger slots. No sorting, no slices of
        data-dependent size, one host->device copy per call (ops, arguments, slots, affine
        matrices, packed): on a GPU the grouped path is launch-bound (hundreds of small kernels
        per call), and these shapes let ``torch.compile`` fuse each layer into a few kernels
        (figures: docs/benchmarks.md, "GPU"). The one opaque operator is the
        warp slot's resample (:func:`grid_sample_head`: ATen's kernel on the slot's real
        members, not its padding).
        """
        n, _, h, w = images.shape
        layers = [(ops.long(), arg.float()) for ops, arg in layers]
        members = [[_in_group(ops, g).nonzero().flatten() for g in _SLOT_GROUPS] for ops, _ in layers]
        caps = [self.capacity(n, g) for g in _SLOT_GROUPS]
        overflow = any(m.numel() > c for per in members for m, c in zip(per, caps))
        if overflow:
            caps = [n] * len(caps)
        # per slot, how many samples it holds: CPU tensors (grid_sample_head reads them without a device wait)
        counts = [torch.tensor(m.numel()) for per in members for m in per]
        parts: list[torch.Tensor] = []  # per layer: ops, arg, warp matrices, then each group's idx, pos
        for (ops, arg), per in zip(layers, members):
            slots = [_slots(m, n, c) for m, c in zip(per, caps)]
            warp_idx = slots[_SLOT_GROUPS.index("warp")][0]
            parts += [ops.float(), arg, self._theta(ops[warp_idx], arg[warp_idx], h, w).flatten()]
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
        exceeds with odds below 1e-9 (:func:`_binomial_quantile`). For the timm policy at
        n = 128: 56 warps (mean 21.3), 24 for each single op (mean 4.3); ta_wide: 80 / 32.
        (A 300-epoch ImageNet run at batch 128 fills ~2.4e7 slots: one overflow has odds ~2%,
        and costs one uncompiled call.)"""
        ops = TIMM_INC_OPS if self.policy.kind == "timm_rand" else TA_WIDE_OPS
        p = self.policy.prob * sum(bool(_in_group(op, group)) for op in ops) / len(ops)
        return min(n, 8 * math.ceil(_binomial_quantile(n, p, 1e-9) / 8))

    def _masked(self, x: torch.Tensor, tensors: list[torch.Tensor], counts: list[torch.Tensor]) -> torch.Tensor:
        per_layer = 3 + 2 * len(_SLOT_GROUPS)  # ops, arg, matrices, each group's idx and pos (apply_masked)
        for layer, i in enumerate(range(0, len(tensors), per_layer)):
            ops, arg, theta, *slots = tensors[i:i + per_layer]
            count = counts[layer * len(_SLOT_GROUPS):(layer + 1) * len(_SLOT_GROUPS)]
            slot = {g: (idx, pos, c) for g, idx, pos, c in zip(_SLOT_GROUPS, slots[::2], slots[1::2], count)}
            x = self._masked_layer(x, ops, arg, theta, slot)
        return x

    def _masked_layer(self, x: torch.Tensor, ops: torch.Tensor, arg: torch.Tensor, theta: torch.Tensor,
                      slots: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        n = x.shape[0]
        present = self._ops_present

        def arg_of(op: int) -> torch.Tensor:  # the op's argument where it applies, its no-op elsewhere
            return torch.where(ops == op, arg, _NEUTRAL.get(op, 1.0)).view(n, 1, 1, 1)

        def keep(op_mask: torch.Tensor, result: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            return torch.where(op_mask.view(n, 1, 1, 1), result, out)

        fill = None if self.fill_is_zero else self.fill

        def on_slot(fn, group: str) -> torch.Tensor:  # fn(slot images, their ids, member count), back in place
            idx, pos, count = slots[group]
            idx = idx.long()
            return fn(x.index_select(0, idx), idx, count).index_select(0, pos.long())

        def colour(op: int):
            return lambda s, idx, count: self._colour(op, s, arg_of(op).view(n).index_select(0, idx).view(-1, 1, 1, 1))

        out = x
        if present & set(range(N_AFFINE)):  # all warps in one resample, of the slot's members only
            warp = lambda s, idx, count: _to_uint8(_warp(s.float(), theta.view(-1, 2, 3), fill,  # noqa: E731
                                                         self.interpolation, count))
            out = keep(ops < N_AFFINE, on_slot(warp, "warp"), out)
        for op in (BRIGHTNESS, COLOR, CONTRAST, SHARPNESS, AUTOCONTRAST):
            if op in present:
                if op in _GROUP_OF:  # a reduction per image: on its slot
                    result = on_slot(colour(op), _GROUP_OF[op])
                else:
                    result = self._colour(op, x, arg_of(op))
                out = keep(ops == op, result, out)
        for op in sorted(_UINT8_OPS & present):
            if op == EQUALIZE:
                result = on_slot(lambda s, idx, count: self._integer(EQUALIZE, s, None), "equalize")
            else:
                result = self._integer(op, x, arg_of(op))
            out = keep(ops == op, result, out)
        return out

    @property
    def _ops_present(self) -> set[int]:
        return set(TIMM_INC_OPS if self.policy.kind == "timm_rand" else TA_WIDE_OPS)

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
            theta = self._theta(sorted_ops[:nw], arg[order[:nw]], x.shape[-2], x.shape[-1]).to(dev, non_blocking=True)
            xs[:nw] = _to_uint8(self._warp(xs[:nw].float(), theta))
        if shift:
            if ny > nt:
                xs[nt:ny] = self._shift(xs[nt:ny], a[nt:ny], dim=3)
            if na > ny:
                xs[ny:na] = self._shift(xs[ny:na], a[ny:na], dim=2)
        for op in range(N_AFFINE, IDENTITY):
            lo, hi = bounds[op], bounds[op + 1]
            if hi <= lo:
                continue
            ai = a[lo:hi].view(-1, 1, 1, 1)
            if op in _UINT8_OPS:  # integer ops: no float round trip
                xs[lo:hi] = self._integer(op, xs[lo:hi], ai)
            else:
                xs[lo:hi] = self._colour(op, xs[lo:hi], ai)
        return xs.index_select(0, torch.argsort(order).to(dev, non_blocking=True))

    def _shift(self, x: torch.Tensor, t: torch.Tensor, dim: int) -> torch.Tensor:
        """uint8 ``x`` translated by whole pixels ``t`` (per sample, ``x_in = x_out + t``) along
        ``dim``, the fill colour outside: what the bilinear/bicubic warp gives at integer offsets,
        with one gather instead of a float resample."""
        size = x.shape[dim]
        src = torch.arange(size, device=x.device) + t.long().view(-1, 1)  # (k, size) input positions
        shape = [x.shape[0], 1, 1, 1]
        shape[dim] = size
        valid = ((src >= 0) & (src < size)).view(shape)
        out = torch.gather(x, dim, src.clamp(0, size - 1).view(shape).expand_as(x))
        return torch.where(valid, out, self.fill.to(x.device, torch.uint8))  # also when not moved with a model

    @staticmethod
    def _theta(ops: torch.Tensor, arg: torch.Tensor, h: int, w: int) -> torch.Tensor:
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

    def _warp(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Resample with the fill colour outside: ``grid_sample(x - fill) + fill``.

        The interpolation weights sum to 1 and zero padding drops the outside taps, so this is
        ``inside + (1 - mask) * fill`` with one 3-channel resample (torchvision resamples a 4th
        "ones" channel for the mask; its blend also scales the inside part by the mask).
        """
        return _warp(x, theta, None if self.fill_is_zero else self.fill, self.interpolation)

    @staticmethod
    def _colour(op: int, images: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Colour op ``op`` on uint8 ``images``, computed in float, rounded back to uint8."""
        f = images.float()
        BatchedAutoAugment._colour_(op, f, a)
        return _to_uint8(f)

    @staticmethod
    def _colour_(op: int, x: torch.Tensor, a: torch.Tensor) -> None:
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

    @staticmethod
    def _integer(op: int, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
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


_UINT8_OPS = frozenset({POSTERIZE, SOLARIZE, SOLARIZE_ADD, EQUALIZE, INVERT})
# Each op's argument that leaves an image unchanged (colour factors: 1.0), for the masked path.
_NEUTRAL = {POSTERIZE: 8.0, SOLARIZE: 256.0, SOLARIZE_ADD: 0.0}


# The masked path's costly ops, run on gathered slots: the warps (one resample for all five),
# and each op that reduces over an image (a histogram, a mean, a min and max).
_GROUP_OF = {EQUALIZE: "equalize", CONTRAST: "contrast", AUTOCONTRAST: "autocontrast"}
_SLOT_GROUPS = ("warp", *_GROUP_OF.values())
_OP_OF_GROUP = {g: op for op, g in _GROUP_OF.items()}


def _in_group(ops, group: str):
    """Whether op ids (a tensor, or one int) are in a slot group: any warp, or the group's op."""
    if group == "warp":
        return ops < N_AFFINE
    return ops == _OP_OF_GROUP[group]


@functools.lru_cache(maxsize=256)
def _binomial_quantile(n: int, p: float, eps: float) -> int:
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


def _slots(members: torch.Tensor, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, pos) on the CPU for the sample indices ``members`` of a batch of ``n``: ``idx`` lists
    them, padded with sample 0 to ``size``; ``pos[i]`` is sample i's place in ``idx`` (0 for
    samples outside: their gathered result is not kept)."""
    idx = torch.cat([members, torch.zeros(size - members.numel(), dtype=torch.long)])
    pos = torch.zeros(n, dtype=torch.long)
    pos[members] = torch.arange(members.numel())
    return idx, pos


def _affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
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


def _warp(x: torch.Tensor, theta: torch.Tensor, fill: Optional[torch.Tensor], interpolation: str,
          count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:meth:`BatchedAutoAugment._warp` (``fill`` None: zero, torchvision's; nothing to shift).

    ``count`` (a CPU tensor): resample only the first ``count`` images (a slot's members; the rest
    of the result is left unset) with :func:`grid_sample_head`."""
    n, _, h, w = x.shape
    grid = _affine_grid(theta.to(x.dtype), h, w)

    def resample(v: torch.Tensor) -> torch.Tensor:
        if count is None:
            return F.grid_sample(v, grid, mode=interpolation, padding_mode="zeros", align_corners=False)
        return grid_sample_head(v, grid, count, interpolation)

    if fill is None:
        return resample(x)
    fill = fill.to(x.device, x.dtype)  # also when the augmentation was not moved with a model
    return resample(x.sub_(fill)).add_(fill)


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


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


class DeviceAugment(_Compiles):
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
    (tests/test_augment.py).

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
        parts = []
        if self.random_erasing > 0:
            parts.append(erase_params(n, h, w, self.random_erasing).flatten())
        if self.mixers:
            parts.append(self.mix_params(h, w))
        packed = torch.cat(parts).to(x.device, non_blocking=True)  # one small copy, no wait
        if not self.compile or x.device.type != "cuda":  # as the masked pre stage: compiled on CUDA only
            return self._post(x, y, packed)
        if self._compiled_post is None:
            object.__setattr__(self, "_compiled_post", torch.compile(self._post, dynamic=False))
        return self._compiled_post(x, y, packed)

    def mix_params(self, h: int, w: int) -> torch.Tensor:
        """(weight of the image, weight of the previous one (``roll(1, 0)``) outside the box,
        label weights of both, box y1, y2, x1, x2): torchvision's v2 draws, in its order
        (``RandomChoice``: ``multinomial``; ``MixUp``/``CutMix.make_params``)."""
        kind, dist = self.mixers[int(torch.multinomial(torch.tensor([1 / len(self.mixers)] * len(self.mixers)), 1))
                                 if len(self.mixers) > 1 else 0]
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

    def _post(self, x: torch.Tensor, y: torch.Tensor, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        if self.random_erasing > 0:
            x = _erase(x, packed[: 4 * n].view(4, n), self.erase_mode)
            packed = packed[4 * n:]
        if not self.mixers:
            return x, y
        rows = torch.arange(h, device=x.device).view(h, 1)
        cols = torch.arange(w, device=x.device).view(1, w)
        box = (rows >= packed[4]) & (rows < packed[5]) & (cols >= packed[6]) & (cols < packed[7])
        # cutmix: the previous image inside the box, this one outside (weights 0/1 are exact);
        # mixup: an empty box, weights lam and 1 - lam everywhere (v2: roll.mul_(1 - lam).add_(x * lam))
        prev = x.roll(1, 0)
        out = torch.where(box, prev, prev * packed[1] + x * packed[0])
        hot = torch.zeros(n, self.num_classes, device=x.device).scatter_(1, y.view(n, 1).long(), 1.0)
        return out, hot.roll(1, 0) * packed[3] + hot * packed[2]


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


def _erase(x: torch.Tensor, box: torch.Tensor, mode: str) -> torch.Tensor:
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
    return _erase(x, erase_params(n, h, w, p, area, log_ratio).to(x.device, non_blocking=True), mode)
