"""Input standardisation: per-channel mean and std of a training split, in one pass, cached.

``ImageNetDataModule(normalize="dataset")`` (``--data.normalize dataset``) normalises with the
training split's own statistics instead of ImageNet's (``zoo.registry.IMAGENET_MEAN/STD``), as
a course on input standardisation teaches (LeCun et al. 1998, "Efficient BackProp", Sec. 4.3:
inputs with zero mean and unit variance per variable). The statistics are those of the pixels the
model sees at evaluation: every train image resized and centre-cropped as the val images are
(``torchvision_backend.val_transform``), so each image weighs the same whatever its size.

One pass: per-channel sums of ``x`` and ``x**2`` in float64 over all pixels (std = sqrt(E[x^2] -
E[x]^2)), read by a torch DataLoader with the data's workers. The result is cached beside the
prepared data (``cache_dir_for(root)/stats/``, as the .beton files are), keyed by the eval size,
crop ratio and interpolation, and checked against a digest of the sample list, so a changed
folder is measured again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import torch

from .folder import DataError, atomic_write_json, load_rgb

log = logging.getLogger(__name__)

STATS_VERSION = 1


def stats_file_name(res: int, crop: float, interpolation: str) -> str:
    """``train_mean_std_32_1.000_bilinear.json``: the cache key is visible, as the .beton names."""
    return f"train_mean_std_{int(res)}_{float(crop):.3f}_{interpolation}.json"


def samples_digest(samples: list[tuple[str, int]]) -> str:
    h = hashlib.sha1()
    for path, label in samples:
        h.update(f"{path}\t{label}\n".encode())
    return h.hexdigest()[:16]


class _PixelSums(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        x = self.transform(load_rgb(self.paths[i])).to(torch.float64)  # DataError naming a bad file
        return x.sum(dim=(1, 2)), x.square().sum(dim=(1, 2)), x.shape[1] * x.shape[2]


def measure(samples: list[tuple[str, int]], res: int, crop: float, interpolation: str,
            num_workers: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel (mean, std) in [0, 1] units of ``samples`` as eval crops (one pass)."""
    from .torchvision_backend import val_transform

    if not samples:
        raise DataError("the train split holds no images to measure its mean/std")
    ds = _PixelSums([p for p, _ in samples], val_transform(res, crop, interpolation))
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=num_workers)
    s1 = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    n = 0
    for a, b, c in loader:
        s1 += a.sum(0)
        s2 += b.sum(0)
        n += int(c.sum())
    mean = s1 / n
    var = (s2 / n - mean.square()).clamp_min(0.0)
    std = var.sqrt().clamp_min(1e-3 * 255)  # a constant channel: no division by ~0
    return [float(v) / 255.0 for v in mean], [float(v) / 255.0 for v in std]


def train_mean_std(cache_dir: Path, samples: list[tuple[str, int]], res: int, crop: float,
                   interpolation: str, num_workers: int = 0) -> tuple[list[float], list[float]]:
    """The cached statistics of ``samples`` at this eval size, measured on the first call."""
    path = Path(cache_dir) / "stats" / stats_file_name(res, crop, interpolation)
    digest = samples_digest(samples)
    try:
        cached = json.loads(path.read_text())
        if cached.get("version") == STATS_VERSION and cached.get("samples_digest") == digest:
            return list(cached["mean"]), list(cached["std"])
    except (OSError, ValueError, KeyError):
        pass
    mean, std = measure(samples, res, crop, interpolation, num_workers)
    if not all(math.isfinite(v) for v in mean + std):
        raise DataError(f"the train mean/std of {len(samples)} images is not finite ({mean}, {std})")
    atomic_write_json(path, {"version": STATS_VERSION, "samples_digest": digest, "images": len(samples),
                             "res": int(res), "crop": float(crop), "interpolation": interpolation,
                             "mean": mean, "std": std})
    log.info("train mean %s std %s over %d images (cached in %s)",
             [round(v, 4) for v in mean], [round(v, 4) for v in std], len(samples), path)
    return mean, std
