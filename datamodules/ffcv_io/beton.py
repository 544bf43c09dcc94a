""".beton files: write them (atomically, parameters recorded in a sidecar), check them, read
their header.

Facts about ffcv 1.0.2's ``DatasetWriter`` this module relies on (read in its source):

- It runs ``num_workers`` forked processes and its progress loop waits until all samples are
  counted: a worker that raises (unreadable image, sample bigger than a page) makes it wait
  forever. So sources here never raise; failures are recorded and reported afterwards (and a
  worker that dies anyway is caught by ``_compat.writer_patched``). Don't call
  ``cv2.setNumThreads`` in those children: after the parent used OpenCV's thread pool it
  deadlocks in the fork; plain cv2 calls are fine.
- A sample must fit one page (``page_size``, a power of two, 8 MiB by default).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..folder import DataError, atomic_write_json, corrupt_error, find_classes, load_rgb, read_json, scan_split, to_rgb, umask_mode
from ._compat import ffcv_version, import_ffcv, writer_patched

# ffcv-imagenet README, "Dataset setup": ResNet-50 betons are written with 500 px max side,
# 50% JPEG / 50% raw pixels, JPEG quality 90 (write_imagenet.sh 500 0.50 90); ResNet-18 with
# 400 px, 10% JPEG. Raw pixels decode fastest but take ~10x the disk of JPEG.
DEFAULT_MAX_RESOLUTION = 500
DEFAULT_COMPRESS_PROBABILITY = 0.5
DEFAULT_JPEG_QUALITY = 90
SIDECAR_FORMAT = "lightning-zoo/beton-v1"  # bump when the sidecar's meaning changes
MIN_PAGE_SIZE = 1 << 23  # ffcv DatasetWriter default page (4 x 2 MiB); one sample must fit a page



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
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
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
            with writer_patched(bar):  # our bar, and a watchdog on ffcv's workers (_compat.py)
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
            "ffcv_version": ffcv_version(),
        }
        atomic_write_json(sidecar_path(path), meta)
        return meta
    finally:
        Path(tmp).unlink(missing_ok=True)
        Path(error_log).unlink(missing_ok=True)


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


def beton_info(path: str | os.PathLike) -> dict:
    """Sample count and label range read from a .beton's header and metadata (cheap)."""
    import_ffcv()
    from ffcv.reader import Reader

    reader = Reader(os.fspath(path))
    info: dict[str, Any] = {"num_samples": int(reader.num_samples), "fields": list(reader.handlers)}
    if "label" in reader.handlers:
        labels = reader.metadata[f"f{list(reader.handlers).index('label')}"]
        info["num_classes"] = int(labels.max()) + 1 if len(labels) else 0
    return info


def beton_labels(path: str | os.PathLike) -> np.ndarray:
    """Every sample's label, in the .beton's order, from its metadata (no image is read)."""
    import_ffcv()
    from ffcv.reader import Reader

    reader = Reader(os.fspath(path))
    if "label" not in reader.handlers:
        raise DataError(f"{path} has no 'label' field: data.train_per_class needs labelled data")
    return np.asarray(reader.metadata[f"f{list(reader.handlers).index('label')}"], dtype=np.int64).reshape(-1)
