"""Augmentation policies: the op ids, the policy names (timm RandAugment strings, torchvision
TrivialAugmentWide), and each policy's per-sample draw of ops and arguments."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

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


def sample_layers(p: Policy, n: int, height: int, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (op id per sample, argument per sample), drawn on the CPU.

    The argument is what the kernel takes: a factor, a threshold, a number of bits, or an
    affine parameter (shear factor, pixels, degrees), signs included.
    """
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
