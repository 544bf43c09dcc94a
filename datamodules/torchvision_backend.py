"""The same augmentations as the FFCV pipelines with torchvision, where FFCV cannot be installed.

Train: RandomResizedCrop(res, scale, ratio) + RandomHorizontalFlip; val: Resize(res / crop_ratio)
+ CenterCrop(res) (the same region as ffcv's CenterCropRGBImageDecoder). Both give uint8 NCHW
batches; normalisation happens on the device, as with FFCV. Resizing uses PIL with the model's
interpolation (ffcv uses OpenCV INTER_AREA).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from .folder import DataError, load_rgb


class TrainTransform:
    """PIL image -> random resized crop + flip -> uint8 CHW tensor, at a resolution that can change.

    The resolution lives in a shared-memory tensor, so DataLoader workers (also persistent
    ones) see :meth:`set_resolution` from the next sample on: call it between epochs.
    """

    def __init__(self, res: int, scale: tuple[float, float], ratio: tuple[float, float], interpolation: str = "bilinear"):
        self.res = torch.tensor([res], dtype=torch.int64).share_memory_()
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = InterpolationMode(interpolation)
        self._built: tuple[int, Callable] | None = None

    def set_resolution(self, res: int) -> None:
        self.res[0] = res

    def __call__(self, image):
        res = int(self.res[0])
        if self._built is None or self._built[0] != res:
            self._built = (res, v2.Compose([
                v2.RandomResizedCrop(res, scale=self.scale, ratio=self.ratio, interpolation=self.interpolation, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.PILToTensor(),  # uint8 CHW, no float conversion
            ]))
        return self._built[1](image)


def val_transform(res: int, crop_ratio: float, interpolation: str = "bilinear") -> Callable:
    """Resize the short side to ``int(res / crop_ratio)``, center-crop ``res`` -> uint8 CHW tensor."""
    return v2.Compose([
        v2.Resize(int(res / crop_ratio), interpolation=InterpolationMode(interpolation), antialias=True),
        v2.CenterCrop(res),
        v2.PILToTensor(),
    ])


class ImageFolderDataset(Dataset):
    """``(path, label)`` samples -> ``(transform(image), label)``.

    An image that fails to decode raises DataError naming the file, or with ``skip_corrupt``
    is replaced by the next readable sample (and a warning names it).
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, skip_corrupt: bool = False):
        self.samples, self.transform, self.skip_corrupt = samples, transform, skip_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        for k in range(min(len(self.samples), 16)):  # give up after 16 unreadable neighbours
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                image = load_rgb(path)
            except DataError as e:
                if not self.skip_corrupt:
                    raise
                warnings.warn(f"skipping {e}", stacklevel=1)
                continue
            return self.transform(image), label
        raise DataError(f"16 unreadable images in a row from {self.samples[i][0]}: check the dataset")


def worker_ignores_job_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGUSR1 and SIGTERM.

    ``scancel --signal=USR1`` (Slurm's preemption warning) and the requeue's SIGTERM reach every
    process of the job step. The training process handles them (Lightning saves an hpc
    checkpoint and requeues); a worker, which does not, would die of them, and the rank would
    end in "DataLoader worker (pid N) is killed by signal" instead of stopping cleanly. The
    training process ends its workers itself, and a worker whose parent is gone exits.
    """
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    drop_last: bool,
    seed: int = 0,
    sampler=None,
) -> DataLoader:
    """A torch DataLoader; Lightning swaps in a DistributedSampler under DDP (use_distributed_sampler),
    unless ``sampler`` is one (samplers.RASampler)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),  # page-locked host memory for async host->device copies
        persistent_workers=num_workers > 0,  # keep worker processes (and their file handles) across epochs
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed) if shuffle and sampler is None else None,
        worker_init_fn=worker_ignores_job_signals,
    )
