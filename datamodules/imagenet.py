"""ImageNetDataModule: ImageNet folder -> .beton (once) -> FFCV Loader, or torchvision as fallback.

Batches are ``(uint8 images N x 3 x res x res, int64 labels N)`` from both backends; the model
normalises on the device. ``batch_size`` is global: each of the ``world_size`` processes loads
``batch_size // world_size``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from . import synthetic
from .folder import (
    DataError,
    atomic_write_json,
    cache_dir_for,
    check_headers,
    corrupt_error,
    read_json,
    scan_split,
    validate_root,
)
from .ffcv_io import (
    DEFAULT_COMPRESS_PROBABILITY,
    DEFAULT_JPEG_QUALITY,
    DEFAULT_MAX_RESOLUTION,
    WriteParams,
    read_sidecar,
)

__all__ = ["DataError", "ImageNetDataModule", "count_classes"]

DEFAULT_VAL_RES = 224  # He et al. 2016 / torchvision references: evaluate 224 px center crops
DEFAULT_CROP_RATIO = 224 / 256  # resize to 256, center-crop 224 (He et al. 2016; ffcv-imagenet DEFAULT_CROP_RATIO)
HEADER_CHECK = "headers-v1"  # marker format for the torchvision backend's one-time file check


def _is_beton_root(root: Path) -> bool:
    """A folder that holds ready ``train.beton`` and ``val.beton`` (e.g. written by ffcv-imagenet)."""
    return (root / "train.beton").is_file() and (root / "val.beton").is_file()


def _classes_of(root: str | os.PathLike | None) -> list[str]:
    if root is None:
        return list(synthetic.CLASSES)
    root = Path(root).expanduser()
    if root.is_dir() and _is_beton_root(root):
        meta = read_sidecar(root / "train.beton")
        if meta and meta.get("classes"):
            return list(meta["classes"])
        from .ffcv_io import beton_info

        return [str(i) for i in range(beton_info(root / "train.beton")["num_classes"])]
    return validate_root(root)


def count_classes(root: str | None) -> int:
    """Number of classes of the dataset at ``root`` (None: the embedded synthetic dataset).

    Reads folder names only (or a .beton's sidecar), so LightningCLI can link it to the model.
    """
    return len(_classes_of(root))


def _input_size(data_config: dict | None) -> int | None:
    size = (data_config or {}).get("input_size")
    if isinstance(size, Sequence):  # timm writes (3, H, W)
        size = size[-1]
    return int(size) if size else None


class ImageNetDataModule(L.LightningDataModule):
    """ImageNet-format data (``root/{train,val}/<class>/*.JPEG``) with FFCV or torchvision loading.

    Args:
        root: the dataset folder; None uses the embedded synthetic dataset (generated once at
            ``synthetic.default_root()``). A folder holding ``train.beton``/``val.beton`` is used
            as is (their write parameters must match the options below).
        backend: ``ffcv`` (JPEG decode + crop in numba threads) or ``torchvision`` (PIL in
            DataLoader worker processes).
        batch_size: global batch; must divide by the number of processes.
        num_workers: ffcv: decoding threads per process; torchvision: worker processes per process.
        train_res: train crop size; None: the model's ``input_size`` (else 224).
        val_res: eval crop size; None: the model's ``input_size`` (else 224).
        val_crop_ratio: center-crop side / short image side; None: the model's ``crop_pct``
            (else 224/256).
        scale, ratio: RandomResizedCrop area and aspect ranges (Szegedy et al. 2015 / torchvision
            defaults).
        max_resolution, jpeg_quality, compress_probability: how the .beton stores images (max side
            in px, JPEG quality, fraction stored as JPEG; the rest raw). Defaults: ffcv-imagenet's
            ResNet-50 betons (500 px, 50% JPEG, q90).
        beton_dir: where .beton files are written; None: a cache folder keyed by ``root``
            under ``$ZOO_DATA_DIR`` (or ``~/.cache/lightning-zoo``), as ``root`` may be read-only.
        skip_corrupt: leave out unreadable images (with a warning) instead of failing.
        data_config: the model's preprocessing (``input_size``, ``crop_pct``, ``mean``, ``std``,
            ``interpolation``), linked by the CLI; gives the resolution defaults.
        drop_last: drop the last incomplete train batch (validation never drops).
        os_cache: ffcv reads through the OS page cache (True) or its own process cache.
        order: ffcv train order; ``quasi_random`` reads page-wise for datasets larger than RAM
            (needs ``os_cache=False``, one process).
        batches_ahead: ffcv batches prepared in advance per loader (ffcv's default 3).
        seed: seed of the sample order and of every sample's crop and flip (drawn from seed, epoch
            and sample index, so runs repeat whatever the thread scheduling); None: the
            ``seed_everything`` seed (``PL_GLOBAL_SEED``), else 0.
        progress: show a progress bar while writing .beton files.
        ra_reps: repeated augmentation: each train image ``ra_reps`` times per epoch with different
            crops (torchvision's RASampler, ``--ra-reps 4`` in its ResNet-50 v2 recipe); 1: off.
    """

    def __init__(
        self,
        root: str | None = None,
        backend: Literal["ffcv", "torchvision"] = "ffcv",
        batch_size: int = 256,  # He et al. 2016 / Goyal et al. 2017 reference batch
        num_workers: int = 2,  # a laptop's share; on a GPU node use (cores / GPUs) - 1
        train_res: int | None = None,
        val_res: int | None = None,
        val_crop_ratio: float | None = None,
        scale: tuple[float, float] = (0.08, 1.0),  # Inception crop (Szegedy et al. 2015), torchvision default
        ratio: tuple[float, float] = (3 / 4, 4 / 3),  # same source
        max_resolution: int = DEFAULT_MAX_RESOLUTION,
        jpeg_quality: int = DEFAULT_JPEG_QUALITY,
        compress_probability: float = DEFAULT_COMPRESS_PROBABILITY,
        beton_dir: str | None = None,
        skip_corrupt: bool = False,
        data_config: dict | None = None,
        drop_last: bool = True,  # as ffcv-imagenet's train loader (equal steps on every rank)
        os_cache: bool = True,  # ffcv's default (FFCV_DEFAULT_CACHE_PROCESS unset)
        order: Literal["random", "quasi_random"] = "random",
        batches_ahead: int = 3,  # ffcv Loader default
        seed: int | None = None,
        progress: bool = True,
        ra_reps: int = 1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if backend not in ("ffcv", "torchvision"):
            raise DataError(f"backend={backend!r} is unknown: use 'ffcv' or 'torchvision'")
        if backend == "ffcv" and importlib.util.find_spec("ffcv") is None:
            raise DataError("backend='ffcv' but ffcv is not installed: pip install 'lightning-zoo[ffcv]' or set data.backend=torchvision")
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        if num_workers < 0:
            raise DataError(f"num_workers={num_workers} must be >= 0")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise DataError(f"scale={tuple(scale)} must satisfy 0 < min <= max <= 1 (fractions of the image area)")
        if not (0 < ratio[0] <= ratio[1]):
            raise DataError(f"ratio={tuple(ratio)} must satisfy 0 < min <= max (crop width / height)")
        if ra_reps < 1:
            raise DataError(f"ra_reps={ra_reps} must be >= 1 (1: no repeated augmentation; torchvision's recipe: 4)")
        if batches_ahead < 1:
            raise DataError(f"batches_ahead={batches_ahead} must be >= 1")
        self.write_params = WriteParams(max_resolution, jpeg_quality, compress_probability)
        dc = data_config or {}
        self.val_resolution: int = val_res or _input_size(dc) or DEFAULT_VAL_RES
        self.train_resolution: int = train_res or _input_size(dc) or DEFAULT_VAL_RES
        self.val_crop: float = float(val_crop_ratio or dc.get("crop_pct") or DEFAULT_CROP_RATIO)
        self.interpolation: str = str(dc.get("interpolation") or "bilinear")
        for name, value in (("train_res", self.train_resolution), ("val_res", self.val_resolution)):
            if value < 8:
                raise DataError(f"{name}={value} is too small: use at least 8 px")
        if not 0 < self.val_crop <= 1:
            raise DataError(f"val_crop_ratio={self.val_crop} must be in (0, 1] (224/256 = 0.875 is standard)")
        self.per_device_batch_size = batch_size
        self._loaders: dict[str, Any] = {}
        self._train_decoder: Any = None  # ffcv RandomResizedCrop decoder of the train loader
        self._train_transform: Any = None  # torchvision TrainTransform
        self._samples: dict[str, list[tuple[str, int]]] = {}

    # ------------------------------------------------------------------ what the data is
    @property
    def root(self) -> Path:
        r = self.hparams.root
        return Path(r).expanduser() if r is not None else synthetic.default_root()

    @property
    def batch_size(self) -> int:
        """The global batch (all processes); ImageClassifier scales its LR with it."""
        return int(self.hparams.batch_size)

    @property
    def seed(self) -> int:
        if self.hparams.seed is not None:
            return int(self.hparams.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by lightning's seed_everything

    @property
    def classes(self) -> list[str]:
        return _classes_of(self.hparams.root)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def beton_dir(self) -> Path:
        if self.hparams.beton_dir:
            return Path(self.hparams.beton_dir).expanduser()
        return cache_dir_for(self.root) / "beton"

    def beton_path(self, split: str) -> Path:
        """The .beton a split is read from (a given one in a beton root, else the cache's)."""
        if self.root.is_dir() and _is_beton_root(self.root):
            return self.root / f"{split}.beton"
        return self.beton_dir / self.write_params.file_name(split)

    # ------------------------------------------------------------------ preparation
    def _ensure_root(self) -> Path:
        if self.hparams.root is None:
            return synthetic.make_synthetic_imagenet(synthetic.default_root())
        return self.root

    def prepare_data(self) -> None:
        """Generate the synthetic dataset if needed; validate; write each .beton once (rank 0)."""
        root = self._ensure_root()
        if self.hparams.backend == "ffcv":
            self._prepare_betons(root)
        else:
            self._prepare_headers(root)

    def _prepare_betons(self, root: Path) -> None:
        from .ffcv_io import beton_lock, check_beton, write_beton

        if root.is_dir() and _is_beton_root(root):
            for split in ("train", "val"):
                if check_beton(root / f"{split}.beton", self.write_params) is None:
                    rank_zero_warn(f"{root / f'{split}.beton'} has no .json sidecar: its write parameters cannot be checked")
            return
        classes = validate_root(root)
        for split in ("train", "val"):
            path = self.beton_path(split)
            if self._cached_beton(path, classes):
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            with beton_lock(path):  # another node may be writing it: wait, then check again
                if self._cached_beton(path, classes):
                    continue
                rank_zero_info(f"writing {path} from {root / split} ({self.write_params})")
                workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
                write_beton(
                    root / split, path, **{k: v for k, v in self.write_params.as_dict().items() if k != "write_mode"},
                    num_workers=workers, progress=self.hparams.progress, skip_corrupt=self.hparams.skip_corrupt,
                    classes=classes,
                )

    def _cached_beton(self, path: Path, classes: list[str]) -> bool:
        """True if the cache's ``path`` is complete and was written from this dataset's classes."""
        from .ffcv_io import check_beton

        if not path.is_file():
            return False
        try:
            meta = check_beton(path, self.write_params)
        except DataError:
            return False  # our own cache: a changed or foreign file is rewritten
        if meta is None or meta.get("classes") != classes:
            return False
        # Written with skip_corrupt: rewrite now that unreadable files must fail (or were fixed).
        return not (meta.get("skipped") and not self.hparams.skip_corrupt)

    def _header_marker(self, split: str) -> Path:
        return cache_dir_for(self.root) / f"{split}.{HEADER_CHECK}.json"

    def _prepare_headers(self, root: Path) -> None:
        classes = validate_root(root)
        for split in ("train", "val"):
            samples = scan_split(root / split, classes)
            marker = read_json(self._header_marker(split))
            if marker and marker.get("num_files") == len(samples):
                continue
            bad = check_headers(samples)
            atomic_write_json(self._header_marker(split), {"num_files": len(samples), "bad": bad})

    # ------------------------------------------------------------------ setup
    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.world_size) if trainer is not None else 1

    def setup(self, stage: str | None = None) -> None:
        """Check the batch split and the prepared files on every process; loaders are built lazily."""
        ws = self._world_size()
        bs = self.hparams.batch_size
        if bs % ws:
            lo, hi = (bs // ws) * ws, (bs // ws + 1) * ws
            raise DataError(
                f"batch_size={bs} does not divide by world_size={ws} processes: use a multiple of {ws} "
                f"(e.g. {lo or hi} or {hi}); batch_size is the global batch"
            )
        if bs // ws != self.per_device_batch_size:
            self._loaders.clear()  # built for another world size
        self.per_device_batch_size = bs // ws
        root = self.root
        if (self.hparams.root is None and not (root / synthetic.MANIFEST).exists()) or self._missing_files():
            if ws > 1:
                raise DataError(
                    f"prepared data for {root} is missing on this node: prepare_data() runs on local rank 0 only; "
                    "use a beton_dir/ZOO_DATA_DIR that every node can read, or prepare_data_per_node"
                )
            self.prepare_data()
        if self.hparams.backend == "ffcv":
            self._check_betons()
        else:
            self._load_samples()

    def _missing_files(self) -> bool:
        if self.hparams.backend == "ffcv":
            return not all(self.beton_path(s).is_file() for s in ("train", "val"))
        return not all(self._header_marker(s).is_file() for s in ("train", "val"))

    def _check_betons(self) -> None:
        from .ffcv_io import check_beton

        for split in ("train", "val"):
            meta = check_beton(self.beton_path(split), self.write_params)
            if meta and meta.get("skipped"):
                if not self.hparams.skip_corrupt:
                    raise corrupt_error([tuple(s) for s in meta["skipped"]])
                rank_zero_warn(
                    f"{split}: skipped {len(meta['skipped'])} unreadable images (e.g. {meta['skipped'][0][0]})"
                )

    def _load_samples(self) -> None:
        root = self.root
        classes = validate_root(root)
        for split in ("train", "val"):
            samples = scan_split(root / split, classes)
            bad = (read_json(self._header_marker(split)) or {}).get("bad") or []
            if bad:
                if not self.hparams.skip_corrupt:
                    raise corrupt_error([tuple(b) for b in bad])
                rank_zero_warn(f"{split}: skipping {len(bad)} unreadable images (e.g. {bad[0][0]})")
                bad_paths = {b[0] for b in bad}
                samples = [s for s in samples if s[0] not in bad_paths]
            self._samples[split] = samples

    # ------------------------------------------------------------------ loaders
    def set_train_resolution(self, res: int) -> None:
        """Change the train crop size from the next epoch on (progressive resizing)."""
        if res < 8:
            raise DataError(f"train resolution {res} is too small: use at least 8 px")
        self.train_resolution = int(res)
        if self._train_decoder is not None:
            # ffcv allocates buffers from output_size at every epoch and its compiled code reads
            # shapes from the buffers: no rebuild or recompile needed (as ffcv-imagenet does).
            self._train_decoder.output_size = (res, res)
        if self._train_transform is not None:
            self._train_transform.set_resolution(res)

    def _distributed(self) -> bool:
        if self._world_size() <= 1:
            return False
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise DataError("ffcv distributed loading needs the process group first: request dataloaders after Trainer setup")
        return True

    def _ffcv_loader(self, split: str):
        from .ffcv_io import label_pipeline, make_loader, train_image_pipeline, val_image_pipeline
        from .samplers import ffcv_ra_order

        hp = self.hparams
        train = split == "train"
        image = (
            train_image_pipeline(self.train_resolution, hp.scale, hp.ratio, seed=self.seed, distinct_repeats=hp.ra_reps > 1) if train
            else val_image_pipeline(self.val_resolution, self.val_crop)
        )
        loader = make_loader(
            self.beton_path(split), {"image": image, "label": label_pipeline()},
            batch_size=self.per_device_batch_size, num_workers=max(1, hp.num_workers),
            order=(ffcv_ra_order(hp.ra_reps) if hp.ra_reps > 1 else hp.order) if train else "sequential", distributed=self._distributed(), seed=self.seed,
            drop_last=hp.drop_last if train else False, os_cache=hp.os_cache, batches_ahead=hp.batches_ahead,
        )
        if train:
            self._train_decoder = image[0]  # the same object the Loader decodes with
        return loader

    def _torch_loader(self, split: str):
        from .torchvision_backend import ImageFolderDataset, TrainTransform, make_dataloader, val_transform

        hp = self.hparams
        if split not in self._samples:
            self._load_samples()
        train = split == "train"
        if train:
            self._train_transform = TrainTransform(self.train_resolution, hp.scale, hp.ratio, self.interpolation)
            tf = self._train_transform
        else:
            tf = val_transform(self.val_resolution, self.val_crop, self.interpolation)
        dataset = ImageFolderDataset(self._samples[split], tf, hp.skip_corrupt)
        sampler = None
        if train and hp.ra_reps > 1:
            from .samplers import RASampler

            trainer = getattr(self, "trainer", None)
            sampler = RASampler(dataset, reps=hp.ra_reps, num_replicas=self._world_size(), seed=self.seed,
                                rank=int(trainer.global_rank) if trainer is not None else 0)
        return make_dataloader(
            dataset, batch_size=self.per_device_batch_size, num_workers=hp.num_workers,
            shuffle=train, drop_last=hp.drop_last if train else False, seed=self.seed, sampler=sampler,
        )

    def _loader(self, split: str):
        if split not in self._loaders:
            build = self._ffcv_loader if self.hparams.backend == "ffcv" else self._torch_loader
            self._loaders[split] = build(split)
        return self._loaders[split]

    def train_dataloader(self):
        loader = self._loader("train")
        trainer = getattr(self, "trainer", None)
        if self.hparams.backend == "ffcv" and trainer is not None:
            loader.next_epoch = trainer.current_epoch  # ffcv's order is seed + epoch: same order after a resume
        return loader

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("val")  # ImageNet's labelled test split is val

    def predict_dataloader(self):
        return self._loader("val")  # `zoo predict`: class probabilities for the val images, in order

    def teardown(self, stage: str) -> None:
        # torchvision: end the persistent worker processes. ffcv loaders hold no processes and
        # are kept: rebuilding one costs a numba compile (~10-20 s).
        if stage == "fit" and self.hparams.backend == "torchvision":
            self._loaders.clear()
            self._train_transform = None

    def state_dict(self) -> dict[str, Any]:
        return {"train_resolution": self.train_resolution}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_resolution" in state_dict:
            self.set_train_resolution(int(state_dict["train_resolution"]))
