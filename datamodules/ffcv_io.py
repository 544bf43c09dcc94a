"""FFCV I/O: write .beton files (atomic, parameters recorded), build pipelines and Loaders.

Facts about ffcv 1.0.2 this module relies on (read in its source):

- ``DatasetWriter`` runs ``num_workers`` forked processes and its progress loop waits until all
  samples are counted: a worker that raises (unreadable image, sample bigger than a page) makes
  it wait forever. So sources here never raise; failures are recorded and reported afterwards.
  (Don't call ``cv2.setNumThreads`` in those children: after the parent used OpenCV's thread
  pool it deadlocks in the fork; plain cv2 calls are fine.)
- A pipeline op is "jitted" when its ``declare_state_and_memory`` returns ``State.jit_mode=True``
  (decoders always are); ``Graph.group_operations`` loops forever on jitted -> not jitted ->
  jitted (libffcv/ffcv#396). :func:`assert_pipeline_safe` checks this before every Loader.
- Memory is allocated per epoch from the decoder's ``output_size`` and the compiled code takes
  the shape from its buffers, so changing ``decoder.output_size`` on a built Loader takes effect
  at the next epoch without recompiling (ffcv-imagenet's progressive resizing does this).
- ``Loader`` pops the decoder out of each pipeline list it is given (``PipelineSpec``): pass
  copies, and keep a reference to the decoder to change it later.
- Batches are views into a ring of ``batches_ahead + 2`` preallocated buffers: clone a batch
  if you keep it longer than that. ``ToTorchImage()`` returns NCHW in channels_last memory.
- Each ``Loader`` compiles its pipeline with numba (new closures, so numba's caches do not
  apply), and numba never frees compiled code: ~9 MiB per fit's train + val pair (benchmarks/soak.py).
  :class:`LoaderPool` hands a built Loader to the next DataModule with the same settings.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import numpy as np
from PIL import Image

from .folder import DataError, atomic_write_json, corrupt_error, find_classes, load_rgb, read_json, scan_split, to_rgb, umask_mode

# ffcv-imagenet README, "Dataset setup": ResNet-50 betons are written with 500 px max side,
# 50% JPEG / 50% raw pixels, JPEG quality 90 (write_imagenet.sh 500 0.50 90); ResNet-18 with
# 400 px, 10% JPEG. Raw pixels decode fastest but take ~10x the disk of JPEG.
DEFAULT_MAX_RESOLUTION = 500
DEFAULT_COMPRESS_PROBABILITY = 0.5
DEFAULT_JPEG_QUALITY = 90
SIDECAR_FORMAT = "lightning-zoo/beton-v1"  # bump when the sidecar's meaning changes
MIN_PAGE_SIZE = 1 << 23  # ffcv DatasetWriter default page (4 x 2 MiB); one sample must fit a page

OrderName = Literal["random", "quasi_random", "sequential"]


@dataclass(frozen=True)
class WriteParams:
    """How a .beton's images were stored (``RGBImageField(write_mode='proportion', ...)``)."""

    max_resolution: int = DEFAULT_MAX_RESOLUTION
    jpeg_quality: int = DEFAULT_JPEG_QUALITY
    compress_probability: float = DEFAULT_COMPRESS_PROBABILITY

    def __post_init__(self) -> None:
        if not 16 <= self.max_resolution <= 65535:  # ffcv stores width/height as uint16
            raise DataError(f"max_resolution={self.max_resolution} is out of range: use 16..65535 px (ffcv-imagenet: 500)")
        if not 1 <= self.jpeg_quality <= 100:
            raise DataError(f"jpeg_quality={self.jpeg_quality} is out of range: use 1..100 (ffcv-imagenet: 90)")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise DataError(
                f"compress_probability={self.compress_probability} is out of range: use 0..1 "
                "(fraction of images stored as JPEG; ffcv-imagenet: 0.5)"
            )

    def file_name(self, split: str) -> str:
        """``train_500_0.50_90.beton``: ffcv-imagenet's naming, so a cache key is visible."""
        return f"{split}_{self.max_resolution}_{self.compress_probability:.2f}_{self.jpeg_quality}.beton"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "write_mode": "proportion"}


def sidecar_path(path: str | os.PathLike) -> Path:
    """``<path>.json``: the write parameters, sample count and classes of a .beton."""
    return Path(f"{os.fspath(path)}.json")


def read_sidecar(path: str | os.PathLike) -> dict | None:
    return read_json(sidecar_path(path))


class _Source:
    """Indexable (RGB uint8 HWC array, int) source for DatasetWriter that never raises.

    An unreadable sample becomes an 8x8 black image and its ``(index, path, reason)`` is
    appended to ``error_log`` (one JSON line; O_APPEND writes are atomic across processes).
    """

    def __init__(self, dataset: Any, samples: list[tuple[str, int]] | None, error_log: str):
        self.dataset, self.samples, self.error_log = dataset, samples, error_log

    def __len__(self) -> int:
        return len(self.samples) if self.samples is not None else len(self.dataset)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        name = self.samples[i][0] if self.samples is not None else f"dataset[{i}]"
        try:
            if self.samples is not None:
                image, label = load_rgb(self.samples[i][0]), self.samples[i][1]
            else:
                image, label = self.dataset[i]
            if isinstance(image, Image.Image):
                image = to_rgb(image)
            arr = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
            if arr.ndim == 2:
                arr = np.repeat(arr[:, :, None], 3, axis=2)
            if arr.ndim != 3 or arr.shape[2] != 3 or min(arr.shape[:2]) < 1:
                raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
            return arr, int(label)
        except Exception as e:
            cause = e.__cause__ if isinstance(e, DataError) and e.__cause__ else e
            with open(self.error_log, "a") as f:  # i is a numpy int from ffcv
                f.write(json.dumps([int(i), str(name), f"{type(cause).__name__}: {cause}"]) + "\n")
            return np.zeros((8, 8, 3), np.uint8), 0


def _page_size(max_resolution: int) -> int:
    # A raw image takes H*W*3 bytes; a JPEG of noise can exceed that, so allow 2x, then round
    # up to the power of two ffcv requires.
    need = 2 * max_resolution * max_resolution * 3
    return max(MIN_PAGE_SIZE, 1 << (need - 1).bit_length())


def beton_lock(path: str | os.PathLike, timeout: float = -1):
    """A lock file ``<path>.lock``: one writer per .beton, also across the nodes of a shared cache.

    Every node's local rank 0 runs prepare_data(); with a cache on a shared file system they
    would all write the same file at once. The first takes the lock and writes; the others
    wait, then find the finished file and its sidecar and only check them. ``filelock`` uses
    flock(2), which Linux NFS clients map to NFS byte-range locks.
    """
    from filelock import FileLock

    return FileLock(f"{path}.lock", timeout=timeout)


def write_beton(
    dataset_or_folder: Any,
    path: str | os.PathLike,
    *,
    max_resolution: int = DEFAULT_MAX_RESOLUTION,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    compress_probability: float = DEFAULT_COMPRESS_PROBABILITY,
    num_workers: int = 2,
    progress: bool = True,
    skip_corrupt: bool = False,
    classes: list[str] | None = None,
) -> dict:
    """Write a class folder (``<dir>/<class>/<image>``) or a ``(image, label)`` dataset to ``path``.

    Atomic: written to a temporary file in the same folder, then ``os.replace``d; the sidecar
    ``<path>.json`` follows. Unreadable images raise DataError naming the file, or with
    ``skip_corrupt`` are left out and listed in the sidecar's ``skipped``. Returns the sidecar.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    import ffcv.writer
    from tqdm import tqdm

    params = WriteParams(max_resolution, jpeg_quality, compress_probability)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = None
    if isinstance(dataset_or_folder, (str, os.PathLike)):
        folder = Path(dataset_or_folder)
        classes = classes or find_classes(folder)
        samples = scan_split(folder, classes)
        source_name: str = str(folder.resolve())
    else:
        classes = classes or list(getattr(dataset_or_folder, "classes", []) or [])
        source_name = str(getattr(dataset_or_folder, "source", None) or type(dataset_or_folder).__name__)
        samples = getattr(dataset_or_folder, "samples", None)  # (path, label) lists: errors name the file
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    error_log = tmp + ".errors"
    source = _Source(dataset_or_folder if samples is None else None, samples, error_log)
    fields = {
        "image": RGBImageField(
            write_mode="proportion", max_resolution=params.max_resolution,
            jpeg_quality=params.jpeg_quality, compress_probability=params.compress_probability,
        ),
        "label": IntField(),
    }
    # disable=None: tqdm's own "no bar where stderr is not a terminal" (a Slurm log, CI), where
    # each redraw would be another carriage-return line; the caller's "writing ..." line stays
    bar = functools.partial(tqdm, desc=f"writing {path.name}", unit="img", disable=None if progress else True)
    try:
        indices = list(range(len(source)))
        if not indices:
            raise DataError(f"{source_name} has no samples: nothing to write to {path}")
        skipped: list[tuple[str, str]] = []
        for _attempt in range(2):  # a second pass only to leave out unreadable samples
            writer = DatasetWriter(tmp, fields, page_size=_page_size(params.max_resolution), num_workers=max(1, num_workers))
            # ffcv has no switch for its bar; its progress loop sleeps 0.1 s between polls.
            with mock.patch.object(ffcv.writer, "tqdm", bar), mock.patch.object(ffcv.writer, "sleep", _Watchdog()):
                writer.from_indexed_dataset(source, indices=np.array(indices))
            errors = _read_errors(error_log)
            if not errors:
                break
            if not skip_corrupt:
                raise corrupt_error([(name, reason) for _, name, reason in errors])
            skipped += [(name, reason) for _, name, reason in errors]
            bad = {i for i, _, _ in errors}
            indices = [i for i in indices if i not in bad]
            Path(error_log).unlink()
            if not indices:
                raise DataError(f"no readable image in {source_name}: check the files, e.g. {skipped[0][0]}")
        else:
            raise DataError(f"images of {source_name} failed while rewriting without unreadable ones, e.g. {errors[0][1]}")
        os.chmod(tmp, umask_mode())
        sidecar_path(path).unlink(missing_ok=True)  # a .beton without sidecar is never taken as ready
        os.replace(tmp, path)
        meta = {
            "format": SIDECAR_FORMAT,
            "params": params.as_dict(),
            "num_samples": len(indices),
            "classes": list(classes),
            "source": source_name,
            "skipped": skipped,
            "file_size": path.stat().st_size,
            "ffcv_version": version("ffcv"),  # ffcv.__version__ says 0.0.3rc1 in 1.0.2
        }
        atomic_write_json(sidecar_path(path), meta)
        return meta
    finally:
        Path(tmp).unlink(missing_ok=True)
        Path(error_log).unlink(missing_ok=True)


class _Watchdog:
    """Replaces the ``sleep`` of DatasetWriter's progress loop: raise once no worker is alive.

    Without it a crashed worker (killed for memory, a bug in a Field) makes ffcv wait forever.
    """

    GRACE = 5.0  # seconds without live workers before giving up: the last count may lag a poll

    def __init__(self) -> None:
        self.idle = 0.0

    def __call__(self, seconds: float) -> None:
        import multiprocessing
        import time

        time.sleep(seconds)
        if multiprocessing.active_children():
            self.idle = 0.0
            return
        self.idle += seconds
        if self.idle > self.GRACE:
            raise DataError("ffcv DatasetWriter workers exited before writing every sample (see a worker's traceback above)")


def _read_errors(error_log: str) -> list[list]:
    try:
        with open(error_log) as f:
            return sorted(json.loads(line) for line in f if line.strip())
    except FileNotFoundError:
        return []


def check_beton(path: str | os.PathLike, params: WriteParams | Mapping[str, Any]) -> dict | None:
    """The sidecar of ``path`` after checking it was written with ``params``.

    Returns None if the file has no sidecar (written by another tool: nothing to check).
    Raises DataError if the file is missing, changed since it was written, or was written
    with other parameters.
    """
    path = Path(path)
    want = params.as_dict() if isinstance(params, WriteParams) else dict(params)
    if not path.is_file():
        raise DataError(f"{path} does not exist: let prepare_data() write it, or point data.root to where it is")
    meta = read_sidecar(path)
    if meta is None:
        return None
    if meta.get("format") != SIDECAR_FORMAT:
        raise DataError(f"{sidecar_path(path)} is not a {SIDECAR_FORMAT} sidecar: delete {path} and its .json to rewrite it")
    diff = {k: (meta["params"].get(k), v) for k, v in want.items() if meta["params"].get(k) != v}
    if diff:
        was = ", ".join(f"{k}={a!r}" for k, (a, _) in diff.items())
        asked = ", ".join(f"{k}={b!r}" for k, (_, b) in diff.items())
        raise DataError(
            f"{path} was written with {was} but the data options ask for {asked}: "
            f"set data.{'/'.join(diff)} to the written values to use it, or delete it (and its .json) to rewrite it"
        )
    size = path.stat().st_size
    if size != meta.get("file_size"):
        raise DataError(f"{path} has {size} bytes but was written with {meta.get('file_size')}: delete it (and its .json) to rewrite it")
    return meta


# --------------------------------------------------------------------------- pipelines


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
    from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    if not 0.0 <= flip <= 1.0:
        raise DataError(f"flip={flip} is a probability: use 0..1 (0.5 is standard, 0 for data where a mirror changes the class)")
    if seed is None:
        ops: list = [RandomResizedCropRGBImageDecoder((res, res), scale=tuple(scale), ratio=tuple(ratio))]
        if flip > 0:
            ops.append(RandomHorizontalFlip(flip))
    else:
        from .ffcv_ops import EpochSeed, make_seeded_decoder

        # the flip is fused into the decoder (same draws as make_seeded_flip, one batch copy less)
        ops = [make_seeded_decoder((res, res), scale, ratio, EpochSeed(seed), distinct_repeats, flip=flip,
                                   dct_scaling=dct_scaling, crop_decode=crop_decode)]
    return ops + [ToTensor(), ToTorchImage()]


def val_image_pipeline(res: int, crop_ratio: float) -> list:
    """Center crop of ``crop_ratio`` x the short side, resized to ``res`` -> uint8 NCHW tensor."""
    from ffcv.transforms import ToTensor, ToTorchImage

    from .ffcv_ops import make_center_crop_decoder

    # ffcv's CenterCropRGBImageDecoder, decoded by a loop kept in numba's on-disk cache
    return [make_center_crop_decoder((res, res), crop_ratio), ToTensor(), ToTorchImage()]


def label_pipeline() -> list:
    """int64 labels of shape (B,). ``Squeeze(1)``: a bare Squeeze() makes a batch of 1 a 0-d tensor."""
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import Squeeze, ToTensor

    return [IntDecoder(), ToTensor(), Squeeze(1)]


def _dummy_image_metadata() -> np.ndarray:
    from ffcv.fields import RGBImageField

    meta = np.zeros(1, dtype=RGBImageField().metadata_type)
    meta["width"], meta["height"] = 1, 1
    return meta


def pipeline_jit_modes(pipeline: Sequence[Any], metadata: np.ndarray | None = None) -> list[bool]:
    """Whether ffcv runs each op jitted (numba) or not, computed as ffcv's Graph does.

    ``pipeline[0]`` is the decoder (always jitted, ``DecoderNode.is_jitted``); each later op is
    jitted when its ``declare_state_and_memory(previous_state)`` returns ``jit_mode=True``
    (``Graph.collect_requirements`` copies that to ``TransformNode.jitted``). ``metadata`` is
    the field's metadata from the .beton (decoders read image sizes from it); a one-row
    stand-in is used without it.
    """
    from ffcv.pipeline.graph import INITIAL_STATE
    from ffcv.transforms import ModuleWrapper
    import torch

    meta = _dummy_image_metadata() if metadata is None else metadata
    state, modes = INITIAL_STATE, []
    for i, op in enumerate(pipeline):
        if isinstance(op, torch.nn.Module):
            op = ModuleWrapper(op)  # what PipelineSpec.accept_decoder does
        op.accept_globals(meta, None)  # the Loader sets these again before use
        state, _ = op.declare_state_and_memory(state)
        modes.append(True if i == 0 else bool(state.jit_mode))
    return modes


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


_ORDERS = {"random": "RANDOM", "quasi_random": "QUASI_RANDOM", "sequential": "SEQUENTIAL"}


class _EpochSetter:
    """``ClosingLoader.sampler``: Lightning calls ``loader.sampler.set_epoch(epoch)`` before every
    train epoch (``lightning.fabric.utilities.data._set_sampler_epoch``), also after a resume,
    when the loader was built before the checkpoint's epoch was restored."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader  # the ffcv Loader (not the ClosingLoader: no reference cycle)

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = int(epoch)


class ClosingLoader:
    """An ffcv Loader whose epochs end their decoding thread when abandoned, and which resumes
    an epoch at a batch.

    ffcv's ``iter(loader)`` starts a thread that fills ``batches_ahead`` buffers and then waits
    for a reader forever: an epoch that is not run to the end (Lightning's ``iter()`` check of
    every dataloader, the sanity check, ``limit_*_batches``) leaks the thread and its buffers,
    and advances the epoch counter. Here ``iter()`` is a generator: the ffcv epoch starts at the
    first ``next()``, and closing or dropping the generator stops it.

    Position: ``state_dict()`` is ``{"epoch", "batches"}`` (batches yielded in that epoch; a
    sized loader is not prefetched by Lightning, so yielded = trained). After
    ``load_state_dict``, the next epoch, if it is the saved one, starts at batch ``batches``:
    the epoch's order (a function of seed and epoch) is sliced, so the skipped batches are not
    decoded, and the crops, drawn from (seed, epoch, sample index), are those of the
    uninterrupted run.
    """

    def __init__(self, loader: Any, ops: Mapping[str, Sequence[Any] | None] | None = None):
        self.loader = loader
        self.ops = dict(ops or {})  # the pipelines the Loader decodes with (ops["image"][0]: its decoder)
        self.epoch_seeds = _epoch_seeds(self.ops)  # ffcv_ops.EpochSeed of the seeded ops, told each epoch
        self.sampler = _EpochSetter(loader)
        self.batch_sampler = None  # Lightning's _is_dataloader_shuffled reads both
        self._position = {"epoch": int(loader.next_epoch), "batches": 0}
        self._resume_at: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return self._epoch()

    def state_dict(self) -> dict[str, int]:
        return dict(self._position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def _epoch(self):
        epoch, skip = self.loader.next_epoch, 0  # the epoch ffcv's iter() is about to run
        if self._resume_at is not None:
            if self._resume_at["epoch"] == epoch and 0 < self._resume_at["batches"] < len(self.loader):
                skip = self._resume_at["batches"]
            self._resume_at = None
        for s in self.epoch_seeds:
            s.set_epoch(epoch)
        if skip:
            keep = len(self.loader) * self.loader.batch_size  # what ffcv's __iter__ keeps (drop_last)
            order = self.loader.next_traversal_order()[:keep][skip * self.loader.batch_size:]
            self.loader.next_traversal_order = lambda: order  # read once by ffcv's __iter__
        try:
            it = iter(self.loader)
        finally:
            self.loader.__dict__.pop("next_traversal_order", None)
        self._position = {"epoch": int(epoch), "batches": skip}
        try:
            for batch in it:
                self._position["batches"] += 1
                yield batch
        finally:
            it.close()  # idempotent in ffcv 1.0.2: sets terminate_event, exits the memory context

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    @property
    def next_epoch(self) -> int:
        """The epoch number ffcv seeds the next order with (``seed + epoch``)."""
        return self.loader.next_epoch

    @next_epoch.setter
    def next_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch


class LoaderPool:
    """Built ffcv Loaders, reused across DataModules in one process, one holder at a time.

    Why: a Loader's numba code is never freed (about 9 MiB for a fit's train + val pair, docs/reliability.md,
    "Soak"), so a process that fits again and again (a sweep, a notebook, fit + resume in one
    process) grew by that much per fit. A Loader is taken out under its key (the .beton's identity, the
    pipeline's settings, every Loader argument) and comes back when the :class:`ClosingLoader`
    holding it is garbage; while one is held, the same key builds another. So two holders never
    share a Loader, and a reused one behaves as a new one: its epoch counter is reset to 0 and
    the caller sets its decoder's size again (``ClosingLoader.ops``).
    """

    def __init__(self) -> None:
        self._free: dict[Any, list[tuple[Any, dict]]] = {}
        self._keys: set = set()  # every key a Loader was built under
        self._lock = threading.Lock()
        self.built = 0  # Loaders built under a key (for tests and the soak)

    def take(self, key: Any) -> tuple[Any, dict] | None:
        if key not in self._keys:
            return None  # never built: nothing to wait for, no collection to pay for
        for attempt in range(2):
            with self._lock:
                free = self._free.get(key)
                if free:
                    return free.pop()
            if attempt == 0:
                gc.collect()  # a finished fit's loaders are often held only by reference cycles (Trainer <-> module)
        return None

    def give_back(self, key: Any, entry: tuple[Any, dict]) -> None:
        with self._lock:
            self._free.setdefault(key, []).append(entry)

    def hold(self, key: Any, closing: ClosingLoader, entry: tuple[Any, dict]) -> ClosingLoader:
        self._keys.add(key)
        weakref.finalize(closing, self.give_back, key, entry).atexit = False
        return closing


LOADER_POOL = LoaderPool()


def _file_identity(path: str | os.PathLike) -> tuple:
    """A rewritten .beton (written to a temp file, then renamed) has a new inode and mtime."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def make_loader(
    path: str | os.PathLike,
    pipelines: Mapping[str, Sequence[Any]],
    *,
    batch_size: int,
    num_workers: int,
    order: OrderName | Any = "random",
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool = True,
    os_cache: bool = True,
    batches_ahead: int = 3,
    indices: Sequence[int] | None = None,
    reuse_key: Any = None,
) -> ClosingLoader:
    """An ffcv Loader over ``path``, checked by :func:`assert_pipeline_safe`, in a :class:`ClosingLoader`.

    ``num_workers`` numba threads decode in this process; ffcv also sets
    ``torch.set_num_threads(num_workers)`` at every epoch, so decoding and CPU compute share cores.
    ``indices``: read only these samples (in this order with ``order='sequential'``).
    ``reuse_key``: a hashable description of ``pipelines`` (their settings, not their identity);
    with it, a free Loader built with the same key and arguments comes from :data:`LOADER_POOL`
    instead of a new one (``pipelines`` is then unused: ``ClosingLoader.ops`` has the ones it runs).
    """
    from ffcv.loader import Loader, OrderOption

    if order == "quasi_random" and (distributed or os_cache):
        raise DataError(
            "order='quasi_random' needs os_cache=False and no distributed training (ffcv 1.0.2): "
            "use order='random' or set os_cache=false on one device"
        )
    if indices is not None:
        indices = np.asarray(indices, dtype=np.int64)
    key = None
    order_key = order if isinstance(order, str) else getattr(order, "cache_key", None)
    if reuse_key is not None and order_key is not None:
        import torch.distributed as dist

        rank_world = (dist.get_rank(), dist.get_world_size()) if distributed and dist.is_available() and dist.is_initialized() else None
        idx = None if indices is None else hashlib.sha1(indices.tobytes()).hexdigest()
        key = (reuse_key, _file_identity(path), batch_size, num_workers, order_key, distributed, rank_world, seed,
               drop_last, os_cache, batches_ahead, idx)
        entry = LOADER_POOL.take(key)
        if entry is not None:
            loader, ops = entry
            loader.next_epoch = 0  # as built
            return LOADER_POOL.hold(key, ClosingLoader(loader, ops), entry)
    _check_pipelines(path, pipelines)
    ops = {k: list(v) if v is not None else None for k, v in pipelines.items()}
    loader = Loader(
        os.fspath(path), batch_size=batch_size, num_workers=num_workers,
        order=getattr(OrderOption, _ORDERS[order]) if isinstance(order, str) else order,  # or a TraversalOrder
        distributed=distributed, seed=seed,
        # list copies: ffcv's PipelineSpec pops the decoder out of the list it is given
        pipelines={k: list(v) if v is not None else None for k, v in ops.items()},
        drop_last=drop_last, os_cache=os_cache, batches_ahead=batches_ahead,
        indices=indices,
    )
    closing = ClosingLoader(loader, ops)
    if key is None:
        return closing
    LOADER_POOL.built += 1
    return LOADER_POOL.hold(key, closing, (loader, ops))


def _check_pipelines(path: str | os.PathLike, pipelines: Mapping[str, Sequence[Any]]) -> None:
    from ffcv.reader import Reader

    reader = Reader(os.fspath(path))
    for name, ops in pipelines.items():
        if name not in reader.handlers:
            raise DataError(f"{path} has no field {name!r} (fields: {', '.join(reader.handlers)})")
        ix = list(reader.handlers).index(name)
        if ops:
            assert_pipeline_safe(ops, reader.metadata[f"f{ix}"], name)


def _epoch_seeds(pipelines: Mapping[str, Sequence[Any] | None]) -> list:
    seeds = {id(op.epoch_seed): op.epoch_seed for ops in pipelines.values() for op in (ops or []) if hasattr(op, "epoch_seed")}
    return list(seeds.values())


def beton_info(path: str | os.PathLike) -> dict:
    """Sample count and label range read from a .beton's header and metadata (cheap)."""
    from ffcv.reader import Reader

    reader = Reader(os.fspath(path))
    info: dict[str, Any] = {"num_samples": int(reader.num_samples), "fields": list(reader.handlers)}
    if "label" in reader.handlers:
        labels = reader.metadata[f"f{list(reader.handlers).index('label')}"]
        info["num_classes"] = int(labels.max()) + 1 if len(labels) else 0
    return info


def beton_labels(path: str | os.PathLike) -> np.ndarray:
    """Every sample's label, in the .beton's order, from its metadata (no image is read)."""
    from ffcv.reader import Reader

    reader = Reader(os.fspath(path))
    if "label" not in reader.handlers:
        raise DataError(f"{path} has no 'label' field: data.train_per_class needs labelled data")
    return np.asarray(reader.metadata[f"f{list(reader.handlers).index('label')}"], dtype=np.int64).reshape(-1)
