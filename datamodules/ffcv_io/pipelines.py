"""FFCV pipelines (lists of ops per field) for training and validation, and the check that ffcv
can build a Loader from them.

A pipeline op is "jitted" when its ``declare_state_and_memory`` returns ``State.jit_mode=True``
(decoders always are); ffcv 1.0.2 hangs building a Loader whose pipeline goes jitted -> not
jitted -> jitted (libffcv/ffcv#396): :func:`assert_pipeline_safe` checks this before every
Loader. Normalisation happens on the device (``ImageClassifier``), so pipelines end in uint8.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..folder import DataError
from ._compat import import_ffcv, pipeline_jit_modes

__all__ = ["assert_pipeline_safe", "label_pipeline", "pipeline_jit_modes", "train_image_pipeline", "val_image_pipeline"]


def train_image_pipeline(
    res: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip: float = 0.5,
    seed: int | None = None,
    distinct_repeats: bool = False,
    dct_scaling: bool = False,
    crop_decode: bool | None = None,
) -> list:
    """RandomResizedCrop decode -> flip (probability ``flip``, 0: none) -> uint8 NCHW tensor.

    With ``seed``, crops and flips are drawn from (seed, epoch, sample index) (datamodules/ffcv_ops.py),
    so a run is reproducible whatever the thread scheduling; the epoch is set by :class:`ClosingLoader`.
    None: ffcv's own ops (numba's per-thread, OS-seeded generators). Normalisation happens on the device.
    ``crop_decode`` (seeded ops): decode only the part of a JPEG that the crop reads, same pixels
    (datamodules/jpeg_region.py); None: where available, unless ``ZOO_CROP_DECODE=0``.
    """
    import_ffcv()
    from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    if not 0.0 <= flip <= 1.0:
        raise DataError(f"flip={flip} is a probability: use 0..1 (0.5 is standard, 0 for data where a mirror changes the class)")
    if seed is None:
        ops: list = [RandomResizedCropRGBImageDecoder((res, res), scale=tuple(scale), ratio=tuple(ratio))]
        if flip > 0:
            ops.append(RandomHorizontalFlip(flip))
    else:
        from ..ffcv_ops import EpochSeed, make_seeded_decoder

        # the flip is fused into the decoder (same draws as make_seeded_flip, one batch copy less)
        ops = [make_seeded_decoder((res, res), scale, ratio, EpochSeed(seed), distinct_repeats, flip=flip,
                                   dct_scaling=dct_scaling, crop_decode=crop_decode)]
    return ops + [ToTensor(), ToTorchImage()]


def val_image_pipeline(res: int, crop_ratio: float) -> list:
    """Center crop of ``crop_ratio`` x the short side, resized to ``res`` -> uint8 NCHW tensor."""
    import_ffcv()
    from ffcv.transforms import ToTensor, ToTorchImage

    from ..ffcv_ops import make_center_crop_decoder

    # ffcv's CenterCropRGBImageDecoder, decoded by a loop kept in numba's on-disk cache
    return [make_center_crop_decoder((res, res), crop_ratio), ToTensor(), ToTorchImage()]


def label_pipeline() -> list:
    """int64 labels of shape (B,). ``Squeeze(1)``: a bare Squeeze() makes a batch of 1 a 0-d tensor."""
    import_ffcv()
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToTensor

    return [IntDecoder(), ToTensor(), Squeeze(1)]


def assert_pipeline_safe(pipeline: Sequence[Any], metadata: np.ndarray | None = None, name: str = "image") -> None:
    """Raise DataError if ``pipeline`` goes jitted -> not jitted -> jitted (ffcv#396 hangs on it)."""
    modes = pipeline_jit_modes(pipeline, metadata)
    seen_unjitted = None
    for op, jitted in zip(pipeline, modes):
        if not jitted and seen_unjitted is None:
            seen_unjitted = op
        elif jitted and seen_unjitted is not None:
            raise DataError(
                f"ffcv pipeline {name!r} runs {type(op).__name__} (numba-jitted) after {type(seen_unjitted).__name__} "
                f"(not jitted): ffcv 1.0.2 hangs building such a Loader (libffcv/ffcv#396, jitted -> not jitted -> jitted); "
                f"put jitted ops before ToTensor(), or normalise on the device (ImageClassifier does)"
            )

