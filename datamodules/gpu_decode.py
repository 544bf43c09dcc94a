"""JPEG decoding on the GPU for the FFCV backend (``data.gpu_decode``): the same samples, crops and
flips as the CPU loader, with all or a share of each batch's JPEGs decoded by nvJPEG.

Per batch (:class:`GPUDecodeLoader`):

1. the sample order is ffcv's own (its ``Random``/``Sequential`` traversal orders, or the
   repeated-augmentation order), so batches hold the same samples as the FFCV Loader's;
2. every sample's crop and flip are drawn on the host by the FFCV path's own numba code
   (``ffcv_ops._random_crop`` seeded by ``ffcv_ops._sample_seed_jit`` from seed, epoch and
   sample index), a few microseconds per image;
3. the JPEG samples chosen for the device (the first ``share`` of the batch's JPEGs) are read
   from the .beton as bytes, without decoding (ffcv's reader and allocation table), and decoded
   in one call, ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG's batched decode on CUDA);
4. the decoded images are packed into one flat buffer with per-image offsets, and one batched
   resample produces the ``(N, 3, res, res)`` uint8 crops: two separable passes (rows, then
   columns) that gather through an overlapping-window view of the buffer, with per-image weight
   tables computed on the host. The weights are OpenCV's ``INTER_AREA`` (what the FFCV path
   resizes with, ``cv::resize`` in libffcv): exact box averaging when neither side of the crop
   is upscaled, else OpenCV's 2-tap area-linear coefficients. The flip reverses the column
   table (no extra pass). About 20 kernels per batch whatever its size, no host-device sync;
5. the other samples (raw pixels, and the JPEGs left to the CPU) go through the FFCV path's
   decode loop (``ffcv_ops._decode_batch``, numba threads) and are copied into the batch.

Images differ from the FFCV path's only by decoder and rounding differences
(tests/test_gpu_decode.py states the measured figure). On CUDA the device work runs on a side
stream in a prefetching thread (``batches_ahead``), and the training stream waits on an event.

The share of JPEGs decoded on the device: ``off`` (0), ``on`` (1), a number in [0, 1], or
``auto``: on CUDA, the first train batches are decoded on the CPU while the loader measures the
CPU decode rate and the rate at which training takes batches; :func:`choose_share` then moves
just enough JPEGs to the device (none when the CPU keeps up). Without CUDA ``auto`` is the CPU path.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import statistics
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numba
import numpy as np
import torch

from .ffcv_ops import _random_crop, _sample_seed_jit  # the FFCV path's crop draw and per-sample seed
from .folder import DataError

log = logging.getLogger(__name__)

MODES = ("off", "auto", "on")
HEADROOM = 0.1  # auto: the CPU must decode 10% faster than training takes images to keep the CPU path
SHARE_STEP = 0.05  # auto: shares are rounded up to 5% steps (a stable choice across small rate changes)
# auto: train batches before measuring (the first ones include torch.compile and numba compiles),
# then the batches measured (the median interval of 16), as benchmarks/gpu.py times steps after a warm-up
AUTO_WARMUP, AUTO_WINDOW = 8, 16
PASS_BYTES = 256 << 20  # bound on one resample chunk's float rows (images are split into chunks above it)


def parse_gpu_decode(value: Any) -> tuple[str, float | None]:
    """``("off", 0.0)``, ``("on", 1.0)``, ``("auto", None)`` or ``("share", s)`` from the option's value."""
    if isinstance(value, str) and value.strip().lower() in MODES:
        mode = value.strip().lower()
        return mode, {"off": 0.0, "on": 1.0, "auto": None}[mode]
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = float("nan")
    if not 0.0 <= share <= 1.0:  # also NaN
        raise DataError(f"data.gpu_decode={value!r} is not a mode or a share: use off, auto, on, or a fraction 0..1 (e.g. 0.5)")
    return ("off", 0.0) if share == 0 else ("share", share)


def check_device(value: Any, cuda_available: bool | None = None) -> None:
    """One line when ``value`` asks for the device and there is no CUDA device (``auto`` is fine)."""
    mode, share = parse_gpu_decode(value)
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if mode in ("on", "share") and not cuda:
        raise DataError(f"data.gpu_decode={value!r} needs a CUDA device and torch.cuda.is_available() is False: "
                        "use data.gpu_decode=auto (CPU decoding here) or off")


def choose_share(cpu_rate: float, train_rate: float, headroom: float = HEADROOM, step: float = SHARE_STEP) -> float:
    """The share of JPEGs to decode on the device so that the CPU keeps up with training.

    ``cpu_rate``: images/s the CPU path decodes (all of a batch on the CPU); ``train_rate``:
    images/s training takes. The CPU keeps ``1 - share`` of the JPEGs (raw samples are cheap and
    ignored here), so it needs ``(1 - share) * train_rate * (1 + headroom) <= cpu_rate``. 0 when
    the CPU keeps up, else rounded up to ``step``.
    """
    if train_rate <= 0 or not math.isfinite(train_rate) or cpu_rate >= train_rate * (1 + headroom):
        return 0.0
    need = 1.0 - max(cpu_rate, 0.0) / (train_rate * (1 + headroom))
    return min(1.0, math.ceil(need / step - 1e-9) * step)


@dataclass
class Split:
    """The share of JPEGs decoded on the device, shared by a DataModule's loaders, and how it was chosen."""

    mode: str
    share: float
    decision: dict = field(default_factory=dict)  # auto: the measured rates and the share chosen

    def describe(self) -> str:
        if self.mode == "auto" and self.decision:
            d = self.decision
            return (f"auto: CPU decode {d['cpu_rate']:.0f} img/s vs training {d['train_rate']:.0f} img/s "
                    f"-> {d['share']:.2f} of the JPEGs on the device")
        return f"{self.mode}: {self.share:.2f} of the JPEGs on the device"


# --------------------------------------------------------------------------- crop parameters


@numba.njit(cache=True)
def _crop_table(indices, heights, widths, state, scale, ratio, distinct, flip_p, center, out):
    """Per sample ``(i, j, h, w, flip)``: the draws of ``ffcv_ops._decode_batch`` (same functions,
    same streams, same argument types), without decoding."""
    seed, epoch = state[0], state[1]
    for d in range(len(indices)):
        source_ix = indices[d]
        height, width = heights[d], widths[d]
        if center > 0:
            c = int(center * min(height, width))
            out[d, 0], out[d, 1], out[d, 2], out[d, 3] = (height - c) // 2, (width - c) // 2, c, c
        else:
            stream = 2 * (d + 1) if distinct else 0
            np.random.seed(_sample_seed_jit(seed, epoch, source_ix, stream))
            i, j, h, w = _random_crop(height, width, scale, ratio)
            out[d, 0], out[d, 1], out[d, 2], out[d, 3] = i, j, h, w
        out[d, 4] = 0
        if flip_p > 0:
            fstream = 2 * (d + 1) + 1 if distinct else 1
            np.random.seed(_sample_seed_jit(seed, epoch, source_ix, fstream))
            if np.random.rand() < flip_p:
                out[d, 4] = 1
    return out


def crop_table(indices, heights, widths, seed: int, epoch: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
               distinct: bool = False, flip: float = 0.0, center: float = 0.0) -> np.ndarray:
    """``(N, 5)`` int64 ``(i, j, h, w, flip)`` of samples ``indices`` with the given image sizes."""
    out = np.zeros((len(indices), 5), dtype=np.int64)
    return _crop_table(np.asarray(indices, dtype=np.int64), np.asarray(heights, dtype=np.uint32),
                       np.asarray(widths, dtype=np.uint32), np.array([seed, epoch], dtype=np.int64),
                       np.asarray(scale, dtype=np.float64), np.asarray(ratio, dtype=np.float64), bool(distinct),
                       float(flip), float(center), out)


# --------------------------------------------------------------------------- resample weights


def axis_taps(length: np.ndarray, out: int, area: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV ``INTER_AREA`` taps along one axis: ``(index, weight)`` of shape ``(N, out, K)``,
    indices into ``0..length-1`` (the crop's pixels).

    ``area[n]``: box averaging (OpenCV's ``computeResizeAreaTab``, used when neither side of the
    crop is upscaled): output pixel ``d`` averages source ``[d * s, (d + 1) * s)``, ``s = length / out``,
    each pixel weighted by its overlap (overlaps under 1e-3 px dropped, as OpenCV does). Otherwise
    OpenCV's linear ``INTER_AREA`` coefficients: ``sx = floor(d * s)``,
    ``fx = (d + 1) - (sx + 1) / s`` taken mod 1 when positive (else 0), weights ``1 - fx, fx``.
    """
    length = np.asarray(length, dtype=np.float64)[:, None]
    s = length / out
    d = np.arange(out, dtype=np.float64)[None, :]
    k_area = int(np.ceil(s[area].max())) + 1 if area.any() else 1
    K = max(k_area, 2)
    k = np.arange(K, dtype=np.float64)[None, None, :]
    # area
    f1, f2 = d * s, (d + 1) * s
    cell = np.minimum(s, length - f1)
    p = np.floor(f1)[..., None] + k
    overlap = np.minimum(p + 1, f2[..., None]) - np.maximum(p, f1[..., None])
    overlap = np.where(overlap > 1e-3, overlap, 0.0)
    w_area = np.where(p < length[..., None], overlap / cell[..., None], 0.0)
    # linear
    sx = np.floor(d * s)
    fx = (d + 1) - (sx + 1) / s
    fx = np.where(fx <= 0, 0.0, fx - np.floor(fx))
    p_lin = sx[..., None] + k
    w_lin = np.where(k == 0, 1.0 - fx[..., None], np.where(k == 1, fx[..., None], 0.0))
    a = area[:, None, None]
    idx = np.where(a, p, p_lin)
    wts = np.where(a, w_area, w_lin)
    idx = np.clip(idx, 0, length[..., None] - 1).astype(np.int64)
    return idx, wts.astype(np.float32)


@dataclass
class ResamplePlan:
    """Host-side tables of one batch's device resample (made by :func:`plan_resample`)."""

    rowstart: np.ndarray  # (N, 3, R, Ky) int64: flat offset of each tap row's first crop pixel
    wy: np.ndarray  # (N, R, Ky) float32
    ix: np.ndarray  # (N, R, Kx) int64 column within the crop (reversed for flipped images)
    wx: np.ndarray  # (N, R, Kx) float32
    width: int  # widest crop of the batch (the window length)
    total: int  # bytes of the packed images


def plan_resample(heights, widths, crops: np.ndarray, res: int) -> ResamplePlan:
    """The tables that crop ``crops[n] = (i, j, h, w, flip)`` of packed CHW images of ``heights``
    x ``widths`` and resize it to ``res`` x ``res``."""
    H, W = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    i, j, h, w, flip = (crops[:, c].astype(np.int64) for c in range(5))
    area = (h >= res) & (w >= res)  # OpenCV: INTER_AREA averages only when no side is upscaled
    iy, wy = axis_taps(h, res, area)
    ix, wx = axis_taps(w, res, area)
    flipped = flip.astype(bool)
    ix[flipped], wx[flipped] = ix[flipped, ::-1], wx[flipped, ::-1]
    sizes = 3 * H * W
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    plane = (H * W)[:, None, None, None] * np.arange(3)[None, :, None, None]
    rowstart = offsets[:, None, None, None] + plane + ((i[:, None, None] + iy) * W[:, None, None] + j[:, None, None])[:, None]
    return ResamplePlan(rowstart, wy, np.ascontiguousarray(ix), np.ascontiguousarray(wx), int(w.max()), int(sizes.sum()))


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without making the host wait (through pinned memory on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def resample(flat: torch.Tensor, plan: ResamplePlan, res: int, device: torch.device) -> torch.Tensor:
    """``(N, 3, res, res)`` uint8 from ``flat`` (the packed CHW images followed by ``plan.width``
    spare bytes) by the batched two-pass resample of ``plan``: no per-image work on the device."""
    n, ky, kx, width = plan.wy.shape[0], plan.wy.shape[2], plan.wx.shape[2], plan.width
    windows = flat.as_strided((flat.numel() - width + 1, width), (1, 1))  # row r: flat[r : r + width]
    rowstart, wy, ix, wx = (to_device(a, device) for a in (plan.rowstart, plan.wy, plan.ix, plan.wx))
    out = torch.empty((n, 3, res, res), dtype=torch.uint8, device=device)
    chunk = max(1, PASS_BYTES // (3 * res * width * 4))
    for a in range(0, n, chunk):  # one chunk for a batch of 256 at 176 px from 500 px images
        b = min(n, a + chunk)
        rows = None
        for k in range(ky):  # pass 1: crop rows -> res rows, (b-a, 3, res, width) float
            t = windows[rowstart[a:b, :, :, k]].float() * wy[a:b, None, :, k, None]
            rows = t if rows is None else rows.add_(t)
        cols = None
        for k in range(kx):  # pass 2: crop columns -> res columns (flip: reversed table)
            idx = ix[a:b, None, None, :, k].expand(b - a, 3, res, res)
            t = rows.gather(3, idx).mul_(wx[a:b, None, None, :, k])
            cols = t if cols is None else cols.add_(t)
        out[a:b] = cols.round_().clamp_(0, 255).to(torch.uint8)
    return out


# --------------------------------------------------------------------------- reading the .beton


class BetonSamples:
    """A .beton's images as stored (JPEG bytes or raw pixels) and its labels, read with ffcv's
    reader and allocation table, without decoding; plus what the FFCV decode loop needs."""

    def __init__(self, path: str | os.PathLike, image: str = "image", label: str = "label") -> None:
        from ffcv.fields.rgb_image import IMAGE_MODES
        from ffcv.reader import Reader

        reader = Reader(os.fspath(path))
        names = list(reader.handlers)
        if image not in names or label not in names:
            raise DataError(f"{path} has no {image!r}/{label!r} fields (fields: {', '.join(names)})")
        self.path = os.fspath(path)
        self.num_samples = int(reader.num_samples)
        self.meta = reader.metadata[f"f{names.index(image)}"]  # mode, width, height, data_ptr per sample
        self.labels = np.ascontiguousarray(reader.metadata[f"f{names.index(label)}"]).astype(np.int64)
        table = reader.alloc_table
        order = np.argsort(table["ptr"])
        self.ptrs = np.ascontiguousarray(table["ptr"][order])
        self.sizes = np.ascontiguousarray(table["size"][order])
        self.jpg = IMAGE_MODES["jpg"]
        self.mmap = np.memmap(self.path, "uint8", mode="r")  # the FFCV loop reads this (as ffcv's OSCacheManager)
        self._bytes = np.memmap(self.path, "uint8", mode="c")  # writable view for torch.from_numpy, never written
        self.max_pixels = int(self.meta["height"].max()) * int(self.meta["width"].max()) if len(self.meta) else 1

    def jpeg_bytes(self, indices: np.ndarray) -> list[torch.Tensor]:
        """The stored JPEG files of samples ``indices`` as 1-D uint8 tensors (views of the file)."""
        ptrs = self.meta["data_ptr"][indices]
        sizes = self.sizes[np.searchsorted(self.ptrs, ptrs)]
        return [torch.from_numpy(self._bytes[p:p + s]) for p, s in zip(ptrs.tolist(), sizes.tolist())]


def _cpu_decode(samples: BetonSamples, indices, res, state, scale, ratio, distinct, flip, center, crop_decode, dest,
                dct_scaling=False):
    """The FFCV path's decode loop on ``indices`` into ``dest`` ((n, res, res, 3) uint8)."""
    from .ffcv_ops import _decode_batch, _register_symbols

    _register_symbols()
    temp = np.empty((len(indices), samples.max_pixels * 3), dtype=np.uint8)
    _decode_batch(np.asarray(indices, dtype=np.uint64), dest, temp, samples.meta, (samples.mmap, samples.ptrs, samples.sizes),
                  np.uint64(0), state, np.asarray(scale, dtype=np.float64), np.asarray(ratio, dtype=np.float64),
                  bool(distinct), float(flip), bool(dct_scaling), samples.jpg, float(center), bool(crop_decode))
    return dest


# --------------------------------------------------------------------------- the loader


class _EpochSetter:
    def __init__(self, loader: GPUDecodeLoader) -> None:
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = int(epoch)


class GPUDecodeLoader:
    """Batches ``(uint8 N x 3 x res x res, int64 N)`` on ``device`` from a .beton, decoding
    ``split.share`` of each batch's JPEGs on the device (module docstring).

    The loader interface of :class:`datamodules.ffcv_io.ClosingLoader`: ``len``, ``next_epoch``,
    ``sampler.set_epoch``, ``state_dict``/``load_state_dict`` (resume at a batch of an epoch,
    the skipped batches not decoded), ``output_size`` (the train resolution from the next epoch on).
    """

    def __init__(self, path, *, batch_size: int, res: int, train: bool, device: str | torch.device,
                 split: Split, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.5, seed: int = 0,
                 distinct_repeats: bool = False, center: float = 224 / 256, order: Any = "random",
                 distributed: bool = False, drop_last: bool = True, indices=None, num_workers: int = 1,
                 batches_ahead: int = 3, crop_decode: bool | None = None, dct_scaling: bool = False) -> None:
        from ffcv.traversal_order import Random, Sequential

        from .ffcv_ops import crop_decode_available

        self.samples = BetonSamples(path)
        self.batch_size, self.train, self.split = int(batch_size), bool(train), split
        self.device = torch.device(device)
        self.output_size = (int(res), int(res))
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), float(flip) if train else 0.0
        self.seed, self.distinct = int(seed), bool(distinct_repeats)
        self.center = 0.0 if train else float(center)
        self.drop_last = bool(drop_last)
        self.num_workers, self.batches_ahead = max(1, int(num_workers)), max(1, int(batches_ahead))
        self.crop_decode = crop_decode_available() and crop_decode is not False
        self.dct_scaling = bool(dct_scaling)  # the CPU share only (the device decodes whole JPEGs)
        idx = np.arange(self.samples.num_samples, dtype="uint64") if indices is None else np.asarray(indices)
        shim = SimpleNamespace(indices=idx, seed=self.seed, distributed=bool(distributed))
        if order == "random":
            self.order = Random(shim)
        elif order == "sequential":
            self.order = Sequential(shim)
        else:  # a TraversalOrder factory (samplers.ffcv_ra_order)
            self.order = order(shim)
        self.next_epoch = 0
        self.sampler = _EpochSetter(self)
        self.batch_sampler = None
        self._position = {"epoch": 0, "batches": 0}
        self._resume_at: dict[str, int] | None = None
        self._len = self._length(len(self.order.sample_order(0)))
        self._cpu_times: list[tuple[int, float]] = []  # auto: (images, seconds) of CPU-decoded parts

    def _length(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return self._len

    def state_dict(self) -> dict[str, int]:
        return dict(self._position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    # ---------------------------------------------------------------- one batch
    def decode(self, batch: np.ndarray, epoch: int, res: int, share: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch (dataset indices ``batch``) on the device; device work is queued, not waited for."""
        s, dev = self.samples, self.device
        meta = s.meta[batch]
        heights, widths = meta["height"].astype(np.int64), meta["width"].astype(np.int64)
        state = np.array([self.seed, epoch], dtype=np.int64)
        crops = crop_table(batch, heights, widths, self.seed, epoch, self.scale, self.ratio, self.distinct,
                           self.flip, self.center)
        is_jpg = meta["mode"] == s.jpg
        jpg_pos = np.flatnonzero(is_jpg)
        on_device = np.zeros(len(batch), dtype=bool)
        on_device[jpg_pos[: math.ceil(share * len(jpg_pos) - 1e-9)]] = True
        dev_pos, cpu_pos = np.flatnonzero(on_device), np.flatnonzero(~on_device)
        labels = to_device(s.labels[batch], dev)
        out = None
        if len(dev_pos):
            from torchvision.io import ImageReadMode, decode_jpeg

            images = decode_jpeg(s.jpeg_bytes(batch[dev_pos]), mode=ImageReadMode.RGB, device=dev)
            plan = plan_resample(heights[dev_pos], widths[dev_pos], crops[dev_pos], res)
            flat = torch.cat([*(im.reshape(-1) for im in images), torch.zeros(plan.width, dtype=torch.uint8, device=dev)])
            resized = resample(flat, plan, res, dev)
            if not len(cpu_pos):
                return resized, labels
            out = torch.empty((len(batch), 3, res, res), dtype=torch.uint8, device=dev)
            out[to_device(dev_pos, dev)] = resized
        if len(cpu_pos):
            t = time.perf_counter()
            pin = dev.type == "cuda"
            host = torch.empty((len(cpu_pos), res, res, 3), dtype=torch.uint8, pin_memory=pin)
            # drawn with their positions in the CPU part: the same crops unless distinct_repeats (ra_reps > 1)
            # with a share strictly between 0 and 1, where the copies still get distinct crops
            _cpu_decode(s, batch[cpu_pos], res, state, self.scale, self.ratio, self.distinct, self.flip, self.center,
                        self.crop_decode, host.numpy(), self.dct_scaling)
            self._cpu_times.append((len(cpu_pos), time.perf_counter() - t))
            part = host.to(dev, non_blocking=True).permute(0, 3, 1, 2)
            if out is None:
                return part.contiguous(), labels
            out[to_device(cpu_pos, dev)] = part
        return out, labels

    # ---------------------------------------------------------------- epochs
    def __iter__(self):
        return self._epoch()

    def _epoch(self):
        epoch, skip = self.next_epoch, 0
        if self._resume_at is not None:
            if self._resume_at["epoch"] == epoch and 0 < self._resume_at["batches"] < len(self):
                skip = self._resume_at["batches"]
            self._resume_at = None
        order = np.asarray(self.order.sample_order(epoch))
        order = order[: len(self) * self.batch_size] if self.drop_last else order
        batches = [order[b * self.batch_size:(b + 1) * self.batch_size].astype(np.int64) for b in range(skip, len(self))]
        self.next_epoch = epoch + 1  # as ffcv's Loader: the counter moves when an epoch starts
        self._position = {"epoch": int(epoch), "batches": skip}
        res = self.output_size[0]
        measure = self.train and self.split.mode == "auto" and not self.split.decision and self.device.type == "cuda"
        stop = threading.Event()
        ready: queue.Queue = queue.Queue(maxsize=self.batches_ahead)
        worker = threading.Thread(target=self._produce, args=(batches, epoch, res, ready, stop), daemon=True,
                                  name="zoo-gpu-decode")
        worker.start()
        intervals: list[float] = []
        try:
            t_back = None
            for _ in batches:
                t_ask = time.perf_counter()
                if t_back is not None and measure:
                    intervals.append(t_ask - t_back)
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                images, labels, event = item
                if event is not None:  # the training stream waits for the side stream's work, the host does not
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    images.record_stream(current)
                    labels.record_stream(current)
                self._position["batches"] += 1
                t_back = time.perf_counter()
                yield images, labels
                if measure and len(intervals) >= AUTO_WARMUP + AUTO_WINDOW:
                    self._decide(intervals[AUTO_WARMUP:])
                    measure = False
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting to put
                try:
                    ready.get_nowait()
                except queue.Empty:
                    worker.join(0.05)

    def _decide(self, intervals: list[float]) -> None:
        times = self._cpu_times[-len(intervals):]
        cpu_rate = sum(n for n, _ in times) / max(sum(t for _, t in times), 1e-9)
        train_rate = self.batch_size / max(statistics.median(intervals), 1e-9)
        share = choose_share(cpu_rate, train_rate)
        self.split.share = share
        self.split.decision = {"cpu_rate": cpu_rate, "train_rate": train_rate, "share": share}
        log.info("data.gpu_decode=%s", self.split.describe())

    def _produce(self, batches, epoch, res, ready: queue.Queue, stop: threading.Event) -> None:
        try:
            numba.set_num_threads(min(self.num_workers, numba.config.NUMBA_NUM_THREADS))  # per thread in numba
            stream = None
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # the current device is per thread (DDP: this rank's GPU)
                stream = torch.cuda.Stream(self.device)
            for batch in batches:
                if stop.is_set():
                    return
                if stream is not None:
                    with torch.cuda.stream(stream):
                        images, labels = self.decode(batch, epoch, res, self.split.share)
                        event = torch.cuda.Event()
                        event.record(stream)
                else:
                    (images, labels), event = self.decode(batch, epoch, res, self.split.share), None
                while not stop.is_set():
                    try:
                        ready.put((images, labels, event), timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as e:  # raised in the training thread
            ready.put(e)


def decode_device(dm) -> torch.device:
    """Where a DataModule's batches are decoded: its trainer's device, else the current CUDA device
    (``backend.decode_device`` overrides: tests run the device path on the CPU with it)."""
    override = getattr(dm.backend, "decode_device", None)
    if override is not None:
        return torch.device(override)
    trainer = getattr(dm, "trainer", None)
    if trainer is not None:
        return trainer.strategy.root_device
    return torch.device("cuda", torch.cuda.current_device())


__all__ = ["GPUDecodeLoader", "Split", "check_device", "choose_share", "crop_table", "parse_gpu_decode", "plan_resample",
           "resample"]
