"""ImageNetDataModule: ImageNet folder -> .beton (once) -> FFCV Loader, or torchvision as fallback.

Batches are ``(uint8 images N x 3 x res x res, int64 labels N)`` from both backends; the model
normalises on the device. ``batch_size`` is global: each of the ``world_size`` processes loads
``batch_size // world_size``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from . import synthetic
from .backends import Backend, eval_indices, get_backend
from .folder import DataError, SampleList, cache_dir_for
from .layouts import Layout, detect
from .ffcv_io import (
    DEFAULT_COMPRESS_PROBABILITY,
    DEFAULT_JPEG_QUALITY,
    DEFAULT_MAX_RESOLUTION,
    WriteParams,
    read_sidecar,
)

log = logging.getLogger(__name__)

__all__ = ["DataError", "ImageNetDataModule", "count_classes"]

DEFAULT_VAL_RES = 224  # He et al. 2016 / torchvision references: evaluate 224 px center crops
DEFAULT_CROP_RATIO = 224 / 256  # resize to 256, center-crop 224 (He et al. 2016; ffcv-imagenet DEFAULT_CROP_RATIO)


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
    layout = detect(root)
    if layout.kind == "flat":
        raise DataError(f"{root} holds images without class folders: only `zoo predict` reads such a folder "
                        "(with --model.weights); to train or validate use train/<class>/ and val/<class>/")
    return layout.classes


def class_ids(root: str | os.PathLike | None) -> list[str]:
    """Class ids in label order of the dataset at ``root`` (None: the embedded synthetic dataset)."""
    return _classes_of(root)


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
            DataLoader worker processes); any name in ``datamodules.backends.BACKENDS``.
        batch_size: global batch; must divide by the number of processes.
        num_workers: ffcv: decoding threads per process; torchvision: worker processes per process.
            None: the CPUs this process may use (its affinity, which Slurm's --cpus-per-task sets;
            shared between this node's processes when nothing binds them); a larger value is
            lowered to that count with one line (``datamodules/cpus.py``).
        train_res: train crop size; None: the model's ``input_size`` (else 224).
        val_res: eval crop size; None: the model's ``input_size`` (else 224).
        val_crop_ratio: center-crop side / short image side; None: the model's ``crop_pct``
            (else 224/256).
        scale, ratio: RandomResizedCrop area and aspect ranges (Szegedy et al. 2015 / torchvision
            defaults).
        flip: probability of a horizontal flip in training; 0 for data where a mirror image is
            another class (digits, text, some medical images).
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
        train_per_class: train on ``N`` images of each class (all of a class with fewer): a subset
            of the train split drawn with ``seed`` from the labels alone, so both backends and
            every rank train on the same images; val is untouched. None: the whole split. The
            course's overfitting example: a few images per class, memorised.
        normalize: the mean/std inputs are standardised with: ``imagenet`` (the model's own: ImageNet's
            constants, or those of the weights it starts from) or ``dataset`` (the train split's per-channel
            statistics, measured in one pass and cached: :meth:`normalization`); recorded in checkpoints.
        dct_scaling: ffcv backend's train pipeline only (the torchvision backend ignores it, as
            it does the other ffcv options): decode a JPEG at 1/2, 1/4 or 1/8 size (libjpeg-turbo's
            scaled IDCT) when the random crop stays at least twice (4x, 8x) the output size, then
            resize with INTER_AREA as usual. +3-9% train loader img/s on 2 CPU cores at 160 px
            from 500 px images, all or half JPEG (``benchmarks/loader.py``; docs/benchmarks.md, "Loader
            throughput", and its accuracy check, "Decode-time DCT scaling: accuracy").
        gpu_decode: ffcv backend: the share of JPEG samples decoded on the device (nvJPEG through
            ``torchvision.io.decode_jpeg``) and cropped/resized there, same crops and flips
            (datamodules/gpu_decode.py): ``off``; ``on`` (all; needs CUDA); a fraction such as 0.5;
            or ``auto``: measure the CPU decode rate against the rate training takes images over the
            first train batches and move just enough JPEGs to the device (none when the CPU keeps
            up; the CPU path on a machine without CUDA).
    """

    def __init__(
        self,
        root: str | None = None,
        backend: str = "ffcv",
        batch_size: int = 256,  # He et al. 2016 / Goyal et al. 2017 reference batch
        num_workers: int | None = None,  # the CPUs this process may use (datamodules/cpus.py)
        train_res: int | None = None,
        val_res: int | None = None,
        val_crop_ratio: float | None = None,
        scale: tuple[float, float] = (0.08, 1.0),  # Inception crop (Szegedy et al. 2015), torchvision default
        ratio: tuple[float, float] = (3 / 4, 4 / 3),  # same source
        flip: float = 0.5,  # RandomHorizontalFlip probability (torchvision/ffcv default); 0: never flip
        max_resolution: int = DEFAULT_MAX_RESOLUTION,
        jpeg_quality: int = DEFAULT_JPEG_QUALITY,
        compress_probability: float = DEFAULT_COMPRESS_PROBABILITY,
        beton_dir: str | None = None,
        skip_corrupt: bool = False,
        data_config: dict | None = None,
        drop_last: bool = True,  # as ffcv-imagenet's train loader (equal steps on every rank)
        os_cache: bool = True,  # ffcv's default (FFCV_DEFAULT_CACHE_PROCESS unset)
        order: str = "random",
        batches_ahead: int = 3,  # ffcv Loader default
        seed: int | None = None,
        progress: bool = True,
        ra_reps: int = 1,
        dct_scaling: bool = False,
        train_per_class: int | None = None,
        gpu_decode: str | float = "off",
        normalize: str = "imagenet",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backend: Backend = get_backend(backend)(self)
        self.backend.check_installed()
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        if num_workers is not None and num_workers < 0:
            raise DataError(f"num_workers={num_workers} must be >= 0")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise DataError(f"scale={tuple(scale)} must satisfy 0 < min <= max <= 1 (fractions of the image area)")
        if not (0 < ratio[0] <= ratio[1]):
            raise DataError(f"ratio={tuple(ratio)} must satisfy 0 < min <= max (crop width / height)")
        if not 0.0 <= flip <= 1.0:
            raise DataError(f"flip={flip} must be a probability in [0, 1] (0 turns horizontal flips off)")
        if order not in ("random", "quasi_random"):
            raise DataError(f"order={order!r} is unknown: use 'random' or 'quasi_random'")
        if ra_reps < 1:
            raise DataError(f"ra_reps={ra_reps} must be >= 1 (1: no repeated augmentation; torchvision's recipe: 4)")
        if normalize not in ("imagenet", "dataset"):
            raise DataError(f"normalize={normalize!r} is unknown: use 'imagenet' (the model's mean/std) or 'dataset' "
                            "(the train split's own, measured once and cached)")
        if batches_ahead < 1:
            raise DataError(f"batches_ahead={batches_ahead} must be >= 1")
        if train_per_class is not None and (isinstance(train_per_class, bool) or int(train_per_class) != train_per_class
                                            or train_per_class < 1):
            raise DataError(f"train_per_class={train_per_class} must be a whole number >= 1 (images per class), or null for all")
        if str(gpu_decode).strip().lower() not in ("off", "0", "0.0"):  # gpu_decode.py imports numba: only when asked
            if backend != "ffcv":
                raise DataError(f"data.gpu_decode={gpu_decode!r} decodes the .beton's JPEGs: it needs data.backend=ffcv (is {backend!r})")
            from .gpu_decode import check_device

            check_device(gpu_decode)  # also one line for a value that is no mode or share
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
        self._num_workers: int | None = None
        self._layout: Layout | None = None
        self._stats: tuple[list[float], list[float]] | None = None

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
    def num_workers(self) -> int:
        """Loader threads (ffcv) or worker processes (torchvision) of this process: ``num_workers``
        fitted to the CPUs it may use (:func:`datamodules.cpus.loader_workers`), decided once."""
        if self._num_workers is None:
            from .cpus import loader_workers

            trainer = getattr(self, "trainer", None)
            local = int(getattr(trainer, "num_devices", 1) or 1) if trainer is not None else 1
            self._num_workers = loader_workers(self.hparams.num_workers, local_processes=local)
        return self._num_workers

    @property
    def layout(self) -> Layout | None:
        """How ``root`` is organised (None for a folder of .beton files); detected once."""
        if self._layout is None and not self.is_beton_root:
            if self.hparams.root is None and not self.root.exists():
                return Layout("folder", self.root, list(synthetic.CLASSES), None, images=self.root)
            self._layout = detect(self.root)
        return self._layout

    @property
    def is_flat(self) -> bool:
        """A folder of images without classes (a user's photos): predict only."""
        return self.layout is not None and self.layout.kind == "flat"

    @property
    def seed(self) -> int:
        """The seed of sample order, crops and flips."""
        if self.hparams.seed is not None:
            return int(self.hparams.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by lightning's seed_everything

    @property
    def classes(self) -> list[str]:
        """Class ids in label order (folder names, ImageNet wnids)."""
        if self.layout is not None and not self.is_flat:
            return list(self.layout.classes)
        return _classes_of(self.hparams.root)

    @property
    def class_names(self) -> list[str] | None:
        """Human-readable class names (from the devkit / synset mapping), else the class ids; None for photos."""
        if self.is_flat:
            return None
        if self.layout is not None and self.layout.class_names:
            return list(self.layout.class_names)
        return self.classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def beton_dir(self) -> Path:
        if self.hparams.beton_dir:
            return Path(self.hparams.beton_dir).expanduser()
        return cache_dir_for(self.root) / "beton"

    @property
    def is_beton_root(self) -> bool:
        return self.root.is_dir() and _is_beton_root(self.root)

    def beton_path(self, split: str) -> Path:
        """The .beton a split is read from (a given one in a beton root, else the cache's)."""
        if self.is_beton_root:
            return self.root / f"{split}.beton"
        return self.beton_dir / self.write_params.file_name(split)

    def samples(self, split: str) -> list[tuple[str, int]]:
        """``(image path, label)`` of ``split`` in dataset order (the order evaluation reports)."""
        if self.is_beton_root:
            raise DataError(f"{self.root} holds only .beton files: use data.backend=ffcv, or point data.root to the image folders")
        if self.is_flat and split != "predict":
            self.classes  # noqa: B018 - raises the flat folder's one-line error
        return self.layout.samples(split)

    def train_subset(self, labels) -> np.ndarray | None:
        """Indices into the train split (whose labels, in order, are ``labels``) that training
        reads: ``train_per_class`` of each class (``samplers.per_class_subset``), or None for all.
        Fails in one line when the subset is smaller than one batch per process that drop_last
        would drop."""
        n = self.hparams.train_per_class
        if n is None:
            return None
        from lightning.pytorch.utilities import rank_zero_only

        from .samplers import per_class_subset

        idx = per_class_subset(labels, int(n), self.seed)
        per_rank = -(-len(idx) // self._world_size())
        if self.hparams.drop_last and per_rank < self.per_device_batch_size:
            raise DataError(
                f"train_per_class={n} keeps {len(idx)} train images, fewer than one batch of {self.per_device_batch_size} "
                f"per process: lower data.batch_size (at most {per_rank}) or set data.drop_last false"
            )
        rank_zero_only(log.info)(f"training on a subset: {len(idx)} of {len(labels)} train images, {n} per class (seed {self.seed})")
        return idx

    def sample_list(self, split: str) -> SampleList:
        return SampleList(self.samples(split), self.classes, f"{self.layout.images or self.root}/{split}")

    def normalization(self) -> tuple[list[float], list[float]] | None:
        """``(mean, std)`` per channel in [0, 1] units the model normalises with, or None: the model's
        own (ImageNet's). With ``normalize="dataset"``: the train split's statistics as eval crops
        (datamodules/stats.py), measured once and cached beside the prepared data. ImageClassifier
        adopts them at the start of ``fit`` and records them in its checkpoints."""
        if self.hparams.normalize != "dataset":
            return None
        if self._stats is None:
            if self.is_beton_root:
                raise DataError(f"{self.root} holds only .beton files: data.normalize=dataset measures the train "
                                "images, so point data.root to the image folders (or use data.normalize=imagenet)")
            from .stats import train_mean_std

            self._ensure_root()
            self._stats = train_mean_std(cache_dir_for(self.root), self.samples("train"), self.val_resolution,
                                         self.val_crop, self.interpolation, self.hparams.num_workers)
        return self._stats

    # ------------------------------------------------------------------ preparation
    def _ensure_root(self) -> Path:
        if self.hparams.root is None:
            return synthetic.make_synthetic_imagenet(synthetic.default_root())
        return self.root

    def prepare_data(self) -> None:
        """Generate the synthetic dataset if needed; validate; let the backend write its files (rank 0)."""
        self._ensure_root()
        if self.is_flat:
            return  # photos to predict: read as they are
        self.classes  # noqa: B018 - validates the folder with one clear line
        if self.layout is not None:
            self.layout.prepare()  # the official archives: extracted once
        self.backend.prepare()
        self.normalization()  # data.normalize=dataset: measured here (rank 0), read from the cache by every rank

    # ------------------------------------------------------------------ setup
    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.world_size) if trainer is not None else 1

    def _rank(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_rank) if trainer is not None else 0

    def setup(self, stage: str | None = None) -> None:
        """Check the batch split and the prepared files on every process; loaders are built lazily."""
        ws = self._world_size()
        if ws > 1:
            from .processes.exit_hooks import settle_gloo_at_exit

            settle_gloo_at_exit()  # a gloo rank could otherwise abort at exit after a finished run
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
        if self.is_flat:
            if stage not in ("predict", None):
                self.classes  # noqa: B018 - raises: only predict reads a folder without classes
            return
        prepared = self.backend.is_prepared() and (self.layout is None or self.layout.is_prepared())
        if (self.hparams.root is None and not (root / synthetic.MANIFEST).exists()) or not prepared:
            if ws > 1:
                raise DataError(
                    f"prepared data for {root} is missing on this node: prepare_data() runs on local rank 0 only; "
                    "use a beton_dir/ZOO_DATA_DIR that every node can read, or prepare_data_per_node"
                )
            self.prepare_data()
        self.backend.setup()
        if stage in ("fit", None):
            self.check_train_batches(ws)
        self._check_eval_split_covers_ranks(stage, ws)

    def check_train_batches(self, world_size: int = 1) -> None:
        """With ``drop_last``, a train split smaller than one batch per process trains nothing
        (Lightning stops with "No training batches" and exit 0): one DataError line instead.

        Each process loads ``batch_size // world_size`` images per step from its share of the
        train split, ``ceil(n / world_size)`` images (padded as torch's DistributedSampler and
        ffcv's distributed order do; with ``ra_reps`` the RASampler's count).
        """
        if not self.hparams.drop_last or (self.hparams.root is None and not self.root.exists()):
            return
        ws = max(1, int(world_size))
        per_rank_batch = self.hparams.batch_size // ws
        n = self._num_eval("train")
        if self.hparams.ra_reps > 1:
            from .samplers import ra_indices

            share = len(ra_indices(n, 0, reps=self.hparams.ra_reps, seed=0, world_size=ws, shuffle=False))
        else:
            share = -(-n // ws)
        if share >= per_rank_batch:
            return
        where = f" over {ws} processes ({share} per process, batch {per_rank_batch} per process)" if ws > 1 else ""
        raise DataError(
            f"the train split has {n} image(s){where}, fewer than one batch of data.batch_size={self.hparams.batch_size} "
            f"with data.drop_last true: nothing would be trained; use --data.batch_size {max(ws, share * ws)} "
            "or smaller, or --data.drop_last false"
        )

    def _check_eval_split_covers_ranks(self, stage: str | None, ws: int) -> None:
        """Each process evaluates its share of the val images, none padded (eval_indices); a
        process with none would stop Lightning's evaluation loop on a failed assertion."""
        if ws < 2 or stage == "predict":  # a folder of photos is checked by its own loader
            return
        if stage == "fit" and getattr(getattr(self, "trainer", None), "limit_val_batches", 1) == 0:
            return  # no validation in this fit
        n = self._num_eval("val")
        if n < ws:
            raise DataError(
                f"the val split has {n} image(s) for {ws} processes: every process needs at least one (each image "
                f"is evaluated once, without padding); use at most {n} devices or more val images"
            )

    # ------------------------------------------------------------------ loaders
    def set_train_resolution(self, res: int) -> None:
        """Change the train crop size from the next epoch on (progressive resizing)."""
        if res < 8:
            raise DataError(f"train resolution {res} is too small: use at least 8 px")
        self.train_resolution = int(res)
        self.backend.set_train_resolution(int(res))

    def _loader(self, split: str, train: bool = False):
        key = f"{split}:{'train' if train else 'eval'}"
        if key not in self._loaders:
            self._loaders[key] = self.backend.loader(split, train=train, rank=self._rank(), world_size=self._world_size())
        return self._loaders[key]

    def _num_eval(self, split: str) -> int:
        return len(self.samples(split)) if not self.is_beton_root else _beton_len(self.beton_path(split))

    def eval_indices(self, split: str = "val") -> list[int]:
        """Indices (into :meth:`samples`) this process evaluates or predicts, in the order it does."""
        return list(eval_indices(self._num_eval(split), self._rank(), self._world_size()))

    # what callbacks.prediction_writer.PredictionWriter asks (duck-typed: callbacks don't import datamodules)
    def _predict_split(self) -> str:
        return "predict" if self.is_flat else "val"

    def predict_indices(self) -> list[int]:
        """The dataset indices this process predicts, in order (every image once across processes)."""
        return self.eval_indices(self._predict_split())

    def predict_paths(self) -> list[str] | None:
        """Every predicted image's path in dataset order (None for a .beton root: no paths stored)."""
        return None if self.is_beton_root else [p for p, _ in self.samples(self._predict_split())]

    def train_dataloader(self):
        loader = self._loader("train", train=True)
        self._apply_train_position()
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            self.backend.on_train_epoch(loader, trainer.current_epoch)
        return loader

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("val")  # ImageNet's labelled test split is val

    def predict_dataloader(self):
        """`zoo predict`: the val images (eval crops, no augmentation), or a folder of photos, in order."""
        if self.is_flat:  # read with PIL whatever the backend: no .beton for a one-off pass
            if "predict" not in self._loaders:
                from .torchvision_backend import photo_loader

                self._loaders["predict"] = photo_loader(self, rank=self._rank(), world_size=self._world_size())
            return self._loaders["predict"]
        return self._loader("val")

    def teardown(self, stage: str) -> None:
        self.backend.teardown(stage)
        if stage == "fit" and not self.backend.keeps_loaders:
            self._loaders.clear()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"train_resolution": self.train_resolution}
        train = self._loaders.get("train:train")
        trainer = getattr(self, "trainer", None)
        if hasattr(train, "state_dict"):  # the ffcv loader's position in its epoch (ffcv_io.ClosingLoader)
            state["train_position"] = train.state_dict()
        elif train is not None and trainer is not None and trainer.state.fn == "fit":
            # a torch DataLoader prefetches: the position is the fit loop's count of trained batches
            state["train_position"] = {"epoch": trainer.current_epoch,
                                       "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_resolution" in state_dict:
            self.set_train_resolution(int(state_dict["train_resolution"]))
        # Lightning restores the datamodule before it builds the loaders; its own restore of a
        # stateful loader's position is skipped when configure_optimizers reads
        # estimated_stepping_batches (Lightning-AI/pytorch-lightning#20550), as ImageClassifier does.
        self._train_position = state_dict.get("train_position")
        self._apply_train_position()

    def _apply_train_position(self) -> None:
        pos, train = getattr(self, "_train_position", None), self._loaders.get("train:train")
        if not pos or train is None:
            return
        if hasattr(train, "load_state_dict"):
            train.load_state_dict(pos)
        elif hasattr(getattr(train, "sampler", None), "resume_at"):  # torchvision_backend.EpochSampler
            if pos["batches"] >= len(train):  # saved at the epoch's end: the next one starts afresh
                train.sampler.set_epoch(pos["epoch"] + 1)
            else:  # set now too: a DataLoader with workers draws its order when Lightning calls iter()
                train.sampler.set_epoch(pos["epoch"])
                train.sampler.resume_at = (pos["epoch"], pos["batches"] * train.batch_size)
        self._train_position = None


def _beton_len(path: Path) -> int:
    from .ffcv_io import beton_info

    return int(beton_info(path)["num_samples"])
