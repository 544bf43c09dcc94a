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
(:meth:`~zoo.augment.masked.MaskedPath.apply_masked`: shapes that do not depend on the draw, so
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

Modules: :mod:`~zoo.augment.policy` (op ids, policy names, the per-sample draw),
:mod:`~zoo.augment.kernels` (the ops on batches), :mod:`~zoo.augment.grouped` and
:mod:`~zoo.augment.masked` (the two paths), :mod:`~zoo.augment.resample` (the
``zoo::grid_sample_head`` operator), :mod:`~zoo.augment.batched` (BatchedAutoAugment),
:mod:`~zoo.augment.erasing`, :mod:`~zoo.augment.mixing`, :mod:`~zoo.augment.device`
(DeviceAugment, what the model uses).
"""

from .batched import BatchedAutoAugment
from .device import DeviceAugment
from .erasing import erase_params, random_erase
from .policy import (
    AUTOCONTRAST, BRIGHTNESS, COLOR, CONTRAST, EQUALIZE, IDENTITY, INVERT, N_AFFINE, OP_NAMES, POSTERIZE, ROTATE,
    SHARPNESS, SHEAR_X, SHEAR_Y, SKIP, SOLARIZE, SOLARIZE_ADD, TA_BINS, TA_WIDE_OPS, TIMM_INC_OPS, TRANSLATE_X,
    TRANSLATE_Y, Policy,
)
from .resample import grid_sample_head

__all__ = [
    "AUTOCONTRAST", "BRIGHTNESS", "COLOR", "CONTRAST", "EQUALIZE", "IDENTITY", "INVERT", "N_AFFINE", "OP_NAMES",
    "POSTERIZE", "ROTATE", "SHARPNESS", "SHEAR_X", "SHEAR_Y", "SKIP", "SOLARIZE", "SOLARIZE_ADD", "TA_BINS",
    "TA_WIDE_OPS", "TIMM_INC_OPS", "TRANSLATE_X", "TRANSLATE_Y", "BatchedAutoAugment", "DeviceAugment", "Policy",
    "erase_params", "grid_sample_head", "random_erase",
]
