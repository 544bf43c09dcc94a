"""FFCV backend: each split is written once to a .beton, then decoded by numba threads.

Train: RandomResizedCrop decode + flip (``ffcv_io.train_image_pipeline``); eval: center crop.
Under DDP, train uses ffcv's ``distributed=True`` order; evaluation reads each rank's share
``rank::world_size`` in order with ``distributed=False``, because ffcv's distributed order pads
the last batch with duplicates that would be counted twice in the metrics.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from .backends import Backend, eval_indices
from .folder import DataError, corrupt_error

log = logging.getLogger(__name__)
_info = rank_zero_only(log.info)


class FFCVBackend(Backend):
    name = "ffcv"
    requires = ("ffcv", "cv2")
    install_hint = "pip install 'lightning-zoo[ffcv]' (it builds against libturbojpeg and OpenCV), or set data.backend=torchvision"

    def __init__(self, dm) -> None:
        super().__init__(dm)
        self._train_decoder: Any = None  # RandomResizedCrop decoder of the built train loader
        self.decode_device: Any = None  # gpu_decode's device (None: the trainer's); tests set "cpu"
        self.split: Any = None  # gpu_decode.Split shared by this DataModule's loaders

    # ------------------------------------------------------------------ files
    def prepare(self) -> None:
        from .ffcv_io import beton_lock, check_beton, write_beton

        dm = self.dm
        if dm.is_beton_root:
            for split in ("train", "val"):
                path = dm.beton_path(split)
                if check_beton(path, dm.write_params) is None:
                    rank_zero_warn(f"{path} has no .json sidecar: its write parameters cannot be checked")
            return
        classes = dm.classes
        for split in ("train", "val"):
            path = dm.beton_path(split)
            if self._cached_beton(path, classes):
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            with beton_lock(path):  # another node may be writing it: wait, then check again
                if self._cached_beton(path, classes):
                    continue
                _remove_unfinished(path)
                source = dm.sample_list(split)
                _info(f"writing {path} from {source.source} ({dm.write_params})")
                workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
                write_beton(
                    source, path, **{k: v for k, v in dm.write_params.as_dict().items() if k != "write_mode"},
                    num_workers=workers, progress=dm.hparams.progress, skip_corrupt=dm.hparams.skip_corrupt,
                    classes=classes,
                )

    def _cached_beton(self, path: Path, classes: list[str]) -> bool:
        """True if the cache's ``path`` is complete and was written from this dataset's classes."""
        from .ffcv_io import check_beton

        if not path.is_file():
            return False
        try:
            meta = check_beton(path, self.dm.write_params)
        except DataError:
            return False  # our own cache: a changed or foreign file is rewritten
        if meta is None or meta.get("classes") != classes:
            return False
        # Written with skip_corrupt: rewrite now that unreadable files must fail (or were fixed).
        return not (meta.get("skipped") and not self.dm.hparams.skip_corrupt)

    def is_prepared(self) -> bool:
        return all(self.dm.beton_path(s).is_file() for s in ("train", "val"))

    def setup(self) -> None:
        from .ffcv_io import check_beton

        for split in ("train", "val"):
            meta = check_beton(self.dm.beton_path(split), self.dm.write_params)
            if meta and meta.get("skipped"):
                if not self.dm.hparams.skip_corrupt:
                    raise corrupt_error([tuple(s) for s in meta["skipped"]])
                rank_zero_warn(f"{split}: skipped {len(meta['skipped'])} unreadable images (e.g. {meta['skipped'][0][0]})")

    # ------------------------------------------------------------------ loaders
    def loader(self, split: str, *, train: bool, rank: int, world_size: int):
        from .ffcv_io import beton_info, import_ffcv, label_pipeline, make_loader, train_image_pipeline, val_image_pipeline
        from .samplers import ffcv_ra_order

        import_ffcv()  # before any path below imports ffcv (ffcv_io/_compat.py: 4.4 s less per process)
        dm, hp = self.dm, self.dm.hparams
        path = dm.beton_path(split)
        gpu = self._gpu_loader(split, train=train, rank=rank, world_size=world_size)
        if gpu is not None:
            return gpu
        if train:
            image = train_image_pipeline(dm.train_resolution, hp.scale, hp.ratio, hp.flip, seed=dm.seed,
                                         distinct_repeats=hp.ra_reps > 1, dct_scaling=hp.dct_scaling)
            # everything the pipelines are built from (the resolution is reset below: progressive resizing changes it)
            reuse_key = ("train", tuple(hp.scale), tuple(hp.ratio), hp.flip, dm.seed, hp.ra_reps > 1, hp.dct_scaling)
        else:
            image = val_image_pipeline(dm.val_resolution, dm.val_crop)
            reuse_key = ("eval", dm.val_resolution, dm.val_crop)
        distributed = train and world_size > 1
        if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise DataError("ffcv distributed loading needs the process group first: request dataloaders after Trainer setup")
        indices = None
        if not train and world_size > 1:
            indices = list(eval_indices(beton_info(path)["num_samples"], rank, world_size))
        if train and hp.train_per_class is not None:
            from .ffcv_io import beton_labels

            indices = dm.train_subset(beton_labels(path))  # ffcv's orders (and distributed split) draw from these
        loader = make_loader(
            path, {"image": image, "label": label_pipeline()},
            batch_size=dm.per_device_batch_size, num_workers=max(1, dm.num_workers),
            order=(ffcv_ra_order(hp.ra_reps) if hp.ra_reps > 1 else hp.order) if train else "sequential",
            distributed=distributed, seed=dm.seed,
            drop_last=hp.drop_last if train else False, os_cache=hp.os_cache, batches_ahead=hp.batches_ahead,
            indices=indices, reuse_key=reuse_key,
        )
        if train:
            self._train_decoder = loader.ops["image"][0]  # the object the Loader decodes with (reused: not `image`)
            self._train_decoder.output_size = (dm.train_resolution, dm.train_resolution)
        return loader

    def _gpu_loader(self, split: str, *, train: bool, rank: int, world_size: int):
        """The GPU-decode loader (datamodules/gpu_decode.py) when ``gpu_decode`` asks for it and a
        device can decode; None: the FFCV Loader (``off``, or ``auto`` without CUDA)."""
        from .gpu_decode import GPUDecodeLoader, Split, decode_device, parse_gpu_decode
        from .samplers import ffcv_ra_order

        dm, hp = self.dm, self.dm.hparams
        mode, share = parse_gpu_decode(getattr(hp, "gpu_decode", "off"))
        if mode == "off":
            return None
        device = decode_device(dm) if self.decode_device is not None or torch.cuda.is_available() else None
        if self.decode_device is None and (device is None or device.type != "cuda"):
            if mode == "auto":
                return None  # nothing to decode on: the CPU path
            raise DataError(f"data.gpu_decode={hp.gpu_decode!r} needs a CUDA device and the trainer runs on "
                            f"{device.type if device else 'a machine without CUDA'}: use data.gpu_decode=auto or off, or train on a GPU")
        if train and hp.order != "random":
            raise DataError(f"data.gpu_decode={hp.gpu_decode!r} reads in order='random' (or ra_reps) only, "
                            f"not {hp.order!r}: set data.order=random or data.gpu_decode=off")
        if self.split is None:
            self.split = Split(mode, 0.0 if share is None else share)
        distributed = train and world_size > 1
        if distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise DataError("distributed loading needs the process group first: request dataloaders after Trainer setup")
        path = dm.beton_path(split)
        indices = None
        if not train and world_size > 1:
            from .ffcv_io import beton_info

            indices = list(eval_indices(beton_info(path)["num_samples"], rank, world_size))
        loader = GPUDecodeLoader(
            path, batch_size=dm.per_device_batch_size, res=dm.train_resolution if train else dm.val_resolution,
            train=train, device=device, split=self.split, scale=hp.scale, ratio=hp.ratio, flip=hp.flip, seed=dm.seed,
            distinct_repeats=hp.ra_reps > 1, center=dm.val_crop,
            order=(ffcv_ra_order(hp.ra_reps) if hp.ra_reps > 1 else "random") if train else "sequential",
            distributed=distributed, drop_last=hp.drop_last if train else False, indices=indices,
            num_workers=max(1, hp.num_workers), batches_ahead=hp.batches_ahead,
            dct_scaling=hp.dct_scaling and train,
        )
        if train:
            self._train_decoder = loader  # set_train_resolution sets its output_size, as the ffcv decoder's
        return loader

    def set_train_resolution(self, res: int) -> None:
        if self._train_decoder is not None:
            # ffcv allocates buffers from output_size at every epoch and its compiled code reads
            # shapes from the buffers: no rebuild or recompile needed (as ffcv-imagenet does).
            self._train_decoder.output_size = (res, res)

    def on_train_epoch(self, loader, epoch: int) -> None:
        loader.next_epoch = epoch  # before a resume restores the epoch; Lightning then calls loader.sampler.set_epoch

    # teardown: ffcv loaders hold no processes and are kept; building one costs ~1-3 s of numba
    # compile with the decode loop in the on-disk cache (tests/test_data.py) and code that numba
    # never frees, so a later DataModule with the same settings reuses it (ffcv_io.LoaderPool).


def _remove_unfinished(path: Path) -> None:
    """Delete the temporary files of earlier writers of ``path`` that were killed (write_beton
    names them ``.<name>.<random>.tmp``; a SIGKILL leaves them behind). Called with the
    ``beton_lock`` held: no other writer of ``path`` is running."""
    stale = [p for pattern in (f".{path.name}.*.tmp", f".{path.name}.*.tmp.errors") for p in path.parent.glob(pattern)]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        _info(f"removed {len(stale)} unfinished file(s) of an earlier writer of {path} that did not finish")
