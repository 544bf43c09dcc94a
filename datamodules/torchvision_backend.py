"""The same augmentations as the FFCV pipelines with torchvision, where FFCV cannot be installed.

Train: RandomResizedCrop(res, scale, ratio) + RandomHorizontalFlip(flip); val: Resize(res / crop_ratio)
+ CenterCrop(res) (the same region as ffcv's CenterCropRGBImageDecoder). Both give uint8 NCHW
batches; normalisation happens on the device, as with FFCV. Resizing uses PIL with the model's
interpolation (ffcv uses OpenCV INTER_AREA).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from lightning.pytorch.utilities import rank_zero_warn

from .backends import Backend
from .folder import DataError, atomic_write_json, cache_dir_for, check_headers, corrupt_error, load_rgb, read_json
from .processes.workers import WorkerInit, WorkerLoader, worker_context, worker_start_method

HEADER_CHECK = "headers-v1"  # marker format for the one-time file check


class TrainTransform:
    """PIL image -> random resized crop + flip -> uint8 CHW tensor, at a resolution that can change.

    The resolution lives in a shared-memory tensor, so DataLoader workers (also persistent
    ones) see :meth:`set_resolution` from the next sample on: call it between epochs.
    """

    def __init__(
        self, res: int, scale: tuple[float, float], ratio: tuple[float, float], interpolation: str = "bilinear",
        flip: float = 0.5,
    ):
        self.res = torch.tensor([res], dtype=torch.int64).share_memory_()
        self.flip = float(flip)
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
                *([v2.RandomHorizontalFlip(self.flip)] if self.flip > 0 else []),
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


class PackedSamples:
    """``(path, label)`` samples in three numpy arrays (UTF-8 paths end to end, their offsets,
    the labels) instead of a list of tuples.

    A worker started from a forkserver (:func:`worker_start_method`) receives the dataset
    pickled: 1.28M tuples (ImageNet's train split) pickle to 78 MB in 1.4 s, per worker, on
    the main process; the arrays are a copy of ~70 MB of memory. Forked workers gain too: a
    list of Python objects is copied page by page into each worker as reading it touches the
    reference counts (pytorch/pytorch#13246); arrays stay shared.
    """

    def __init__(self, samples: list[tuple[str, int]]):
        import numpy as np

        encoded = [p.encode("utf-8", "surrogateescape") for p, _ in samples]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[str, int]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.blob[a:b].tobytes().decode("utf-8", "surrogateescape"), int(self.labels[i])


class ImageFolderDataset(Dataset):
    """``(path, label)`` samples -> ``(transform(image), label)``.

    An image that fails to decode raises DataError naming the file, or with ``skip_corrupt``
    is replaced by the next readable sample (and a warning names it).
    """

    def __init__(self, samples: "list[tuple[str, int]] | PackedSamples", transform: Callable, skip_corrupt: bool = False):
        self.samples = samples if isinstance(samples, PackedSamples) else PackedSamples(samples)
        self.transform, self.skip_corrupt = transform, skip_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):  # from EpochSampler: the augmentation's randomness is a function of the key
            i, seed = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self._get(i)
        return self._get(key)

    def _get(self, i: int) -> tuple[torch.Tensor, int]:
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


class EpochSampler(Sampler):
    """One process's train order as a function of (seed, epoch) only, and a seed per sample.

    Yields ``(index, sample_seed)``; ImageFolderDataset seeds the crop/flip of that sample
    with it, so epoch e's batches are the same whether the process ran epochs 0..e-1 or
    resumed from a checkpoint at the end of epoch e-1 (torch's RandomSampler draws from one
    generator across epochs: a resumed run would repeat epoch 0's order). Lightning calls
    :meth:`set_epoch` before each epoch. Under DDP: :class:`DistributedEpochSampler`.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, int(seed), 0
        self.resume_at: tuple[int, int] | None = None  # (epoch, samples already trained)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # a generator: the order is drawn (and resume_at used) at the first next()
        order, seeds = _epoch_draws(self.n, self.seed, self.epoch)
        yield from ((i, seeds[i]) for i in order[_take_resume(self):])


def _epoch_draws(n: int, seed: int, epoch: int) -> tuple[list[int], list[int]]:
    """Epoch ``epoch``'s order of ``n`` samples and each sample's crop seed: a function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist(), torch.randint(0, 2**62, (n,), generator=g).tolist()


def _take_resume(sampler) -> int:
    """Samples of this epoch already trained before a mid-epoch resume (0 otherwise); used once."""
    at, sampler.resume_at = sampler.resume_at, None
    return at[1] if at is not None and at[0] == sampler.epoch else 0


class DistributedEpochSampler(DistributedSampler):
    """:class:`EpochSampler` for one rank of ``num_replicas``: the same (seed, epoch) order and
    per-sample seeds, padded and split the way torch's DistributedSampler does (rank ``r``
    takes positions ``r, r + world, ...``). A DistributedSampler, so Lightning keeps it instead
    of putting in its own, whose crops would come from the workers' RNG (not resumable)."""

    def __init__(self, n: int, seed: int = 0, *, num_replicas: int, rank: int, drop_last: bool = False) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.n = n
        self.resume_at: tuple[int, int] | None = None  # (epoch, samples this rank already trained)

    def __iter__(self):
        order, seeds = _epoch_draws(self.n, self.seed, self.epoch)  # EpochSampler's draws
        if self.drop_last:
            order = order[: self.total_size]
        else:
            order += (order * math.ceil(self.total_size / max(len(order), 1)))[: self.total_size - len(order)]
        mine = order[self.rank : self.total_size : self.num_replicas]
        yield from ((i, seeds[i]) for i in mine[_take_resume(self):])


def make_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    drop_last: bool,
    seed: int = 0,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A torch DataLoader. Train: Lightning swaps in a DistributedSampler under DDP
    (use_distributed_sampler), unless ``sampler`` is one (samplers.RASampler, or the unpadded
    evaluation sampler), which it keeps."""
    return WorkerLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),  # page-locked host memory for async host->device copies
        persistent_workers=num_workers > 0,  # keep worker processes (and their file handles) across epochs
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed) if shuffle and sampler is None else None,
        worker_init_fn=WorkerInit(os.getpid()),
        multiprocessing_context=worker_context(worker_start_method()) if num_workers > 0 else None,
    )


class TorchvisionBackend(Backend):
    """PIL decoding in DataLoader worker processes; files are checked once (headers) and remembered.

    Under DDP the train loader gets :class:`DistributedEpochSampler` and evaluation loaders
    Lightning's UnrepeatedDistributedSampler (rank ``r`` reads ``r::world_size``, no padding);
    Lightning keeps both because they are DistributedSamplers.
    """

    name = "torchvision"
    keeps_loaders = False  # dropping them ends their persistent worker processes

    def __init__(self, dm) -> None:
        super().__init__(dm)
        self._train_transform: TrainTransform | None = None
        # per split, packed once per setup (~0.56 s for ImageNet's 1.28M train samples), not per loader
        self._samples: dict[str, PackedSamples] = {}

    def _marker(self, split: str):
        return cache_dir_for(self.dm.root) / f"{split}.{HEADER_CHECK}.json"

    def prepare(self) -> None:
        for split in ("train", "val"):
            samples = self.dm.samples(split)
            marker = read_json(self._marker(split))
            if marker and marker.get("num_files") == len(samples):
                continue
            atomic_write_json(self._marker(split), {"num_files": len(samples), "bad": check_headers(samples)})

    def is_prepared(self) -> bool:
        return all(self._marker(s).is_file() for s in ("train", "val"))

    def setup(self) -> None:
        for split in ("train", "val"):
            samples = self.dm.samples(split)
            bad = (read_json(self._marker(split)) or {}).get("bad") or []
            if bad:
                if not self.dm.hparams.skip_corrupt:
                    raise corrupt_error([tuple(b) for b in bad])
                rank_zero_warn(f"{split}: skipping {len(bad)} unreadable images (e.g. {bad[0][0]})")
                bad_paths = {b[0] for b in bad}
                samples = [s for s in samples if s[0] not in bad_paths]
            self._samples[split] = PackedSamples(samples)

    def loader(self, split: str, *, train: bool, rank: int, world_size: int) -> DataLoader:
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        dm, hp = self.dm, self.dm.hparams
        if split not in self._samples:
            self.setup()
        if train:
            self._train_transform = TrainTransform(dm.train_resolution, hp.scale, hp.ratio, dm.interpolation, flip=hp.flip)
            tf: Callable = self._train_transform
        else:
            tf = val_transform(dm.val_resolution, dm.val_crop, dm.interpolation)
        samples = self._samples[split]
        if train and hp.train_per_class is not None:
            samples = PackedSamples([samples[int(i)] for i in dm.train_subset(samples.labels)])
        dataset = ImageFolderDataset(samples, tf, hp.skip_corrupt)
        sampler = None
        if not train and world_size > 1:
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        if train and hp.ra_reps > 1:
            from .samplers import RASampler

            sampler = RASampler(dataset, reps=hp.ra_reps, num_replicas=world_size, seed=dm.seed, rank=rank)
        elif train and world_size == 1:
            sampler = EpochSampler(len(dataset), dm.seed)
        elif train:
            # padded to a multiple of world_size like Lightning's own DistributedSampler (drop_last=False)
            sampler = DistributedEpochSampler(len(dataset), dm.seed, num_replicas=world_size, rank=rank)
        return make_dataloader(
            dataset, batch_size=dm.per_device_batch_size, num_workers=dm.num_workers,
            shuffle=train, drop_last=hp.drop_last if train else False, seed=dm.seed, sampler=sampler,
        )

    def set_train_resolution(self, res: int) -> None:
        if self._train_transform is not None:
            self._train_transform.set_resolution(res)

    def teardown(self, stage: str) -> None:
        if stage == "fit":  # the DataModule drops its loaders: their persistent workers end
            self._train_transform = None


def photo_loader(dm, *, rank: int, world_size: int) -> DataLoader:
    """Eval crops of a folder of photos (labels -1), each once across ``world_size`` processes."""
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    tf = val_transform(dm.val_resolution, dm.val_crop, dm.interpolation)
    dataset = ImageFolderDataset(dm.samples("predict"), tf, dm.hparams.skip_corrupt)
    sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False) if world_size > 1 else None
    return make_dataloader(dataset, batch_size=dm.per_device_batch_size, num_workers=dm.num_workers,
                           shuffle=False, drop_last=False, sampler=sampler)
