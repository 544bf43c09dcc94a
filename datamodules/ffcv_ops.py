"""FFCV train ops whose randomness depends only on (seed, epoch, sample index).

ffcv 1.0.2's ``RandomResizedCropRGBImageDecoder`` and ``RandomHorizontalFlip`` draw from numba's
``np.random``, whose state is per thread and seeded from the OS: which thread decodes which
sample changes from run to run, so ``seed_everything`` does not make crops and flips
reproducible. The ops here re-seed the decoding thread's generator for every sample from a hash
of (seed, epoch, sample index) and then draw exactly as ffcv does (the crop is ffcv's own
``get_random_crop``), so a run is reproducible whatever the thread scheduling, and the
distribution of crops is unchanged.

The decode loop itself (crop, resize, flip; also the validation center crop) is one numba
function kept in numba's on-disk cache, so a Loader's first batch does not wait ~10 s for a
compile when nothing changed since the last run (see ``_decode_batch``).

The epoch reaches the compiled code through a two-int64 array (``EpochSeed``) read by address:
numba freezes global arrays as constants, and recompiling per epoch costs seconds. The array
lives as long as the ops that hold it. :class:`datamodules.ffcv_io.ClosingLoader` sets the epoch
before each epoch starts.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Tuple

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_MASK64 = (1 << 64) - 1


@intrinsic
def _as_void_pointer(typingctx, address):
    """An integer address as a ``void*`` inside numba code (to build a ``numba.carray``)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(address), codegen


@numba.njit(cache=True)
def _splitmix64(x):
    # Steele, Lea & Flood 2014 (SplitMix64) finaliser; uint64 arithmetic wraps in numba
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _sample_seed(seed, epoch, index, stream):
    """A 31-bit seed from (seed, epoch, sample index, stream); numba-compilable."""
    h = _splitmix64(np.uint64(seed) + np.uint64(0x9E3779B97F4A7C15))
    h = _splitmix64(h ^ np.uint64(epoch))
    h = _splitmix64(h ^ np.uint64(index))
    h = _splitmix64(h ^ np.uint64(stream))
    return np.int64(h >> np.uint64(33))


def sample_seed(seed: int, epoch: int, index: int, stream: int) -> int:
    """The same hash in Python (the torchvision backend seeds its transforms with it)."""

    def mix(x: int) -> int:
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        return x ^ (x >> 31)

    h = mix((seed + 0x9E3779B97F4A7C15) & _MASK64)
    for v in (epoch, index, stream):
        h = mix(h ^ (v & _MASK64))
    return h >> 33


CROP_STREAM, FLIP_STREAM = 0, 1  # independent draws for the crop and the flip of a sample


class EpochSeed:
    """The (seed, epoch) pair the seeded ops read at run time."""

    def __init__(self, seed: int) -> None:
        self.state = np.array([int(seed), 0], dtype=np.int64)

    @property
    def address(self) -> int:
        return int(self.state.ctypes.data)

    @property
    def seed(self) -> int:
        return int(self.state[0])

    def set_epoch(self, epoch: int) -> None:
        self.state[1] = int(epoch)


def _state_reader(address: int) -> Callable:
    def read_state():
        return numba.carray(_as_void_pointer(address), (2,), np.int64)

    return read_state


def _ffcv_types():
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder

    return RandomResizedCropRGBImageDecoder


# ---------------------------------------------------------------- cached decode
# numba's on-disk cache (``cache=True``) skips the ~10 s compile of the decode loop when nothing
# changed since the last run. It cannot cache code that calls ctypes function pointers (their
# addresses are frozen into the machine code and differ per process), which is how ffcv calls
# libffcv. So the cached loop below calls libffcv's ``imdecode``/``resize`` as named external
# symbols, registered with LLVM before each compile or cache load (:func:`_register_symbols`).
# Only the thin per-Loader wrapper that ffcv compiles (``generate_code``) is compiled per run.

_SYMBOLS = {"zoo_ffcv_imdecode": "imdecode", "zoo_ffcv_resize": "resize"}
_registered = False


def _register_symbols() -> None:
    global _registered
    if _registered:
        return
    import ctypes

    import ffcv.libffcv
    from llvmlite import binding

    from datamodules import jpeg_region

    for name, c_name in _SYMBOLS.items():
        binding.add_symbol(name, ctypes.cast(getattr(ffcv.libffcv.lib, c_name), ctypes.c_void_p).value)
    # crop-only decoding (datamodules/jpeg_region.c); where it cannot be built a stand-in is
    # linked and the loop is told not to call it (crop_decode_available)
    binding.add_symbol(jpeg_region.SYMBOL, jpeg_region.address() or jpeg_region.fallback_address())
    _registered = True


def crop_decode_available() -> bool:
    """Whether the decode loop may decode only a crop's region (``ZOO_CROP_DECODE`` not 0, and
    the library built or found)."""
    from datamodules import jpeg_region

    return jpeg_region.enabled() and jpeg_region.address() is not None


# ffcv 1.0.2 libffcv.cpp: int imdecode(uint8* src, uint64 size, uint32 src_h, uint32 src_w, uint8* dst,
# uint32 crop_h, uint32 crop_w, uint32 off_x, uint32 off_y, uint32 scale_num, uint32 scale_denom,
# bool enable_crop, bool hflip) (the two bools are passed as uint32 0/1: same register, low byte read);
# void resize(int64 x 11) = cv::resize(src[rows, cols], dst, INTER_AREA) (ffcv/libffcv.py declares 11 int64).
_imdecode = types.ExternalFunction(
    "zoo_ffcv_imdecode",
    types.int32(types.uintp, types.uint64, types.uint32, types.uint32, types.uintp, types.uint32, types.uint32,
                types.uint32, types.uint32, types.uint32, types.uint32, types.uint32, types.uint32),
)
_resize = types.ExternalFunction("zoo_ffcv_resize", types.void(*([types.int64] * 11)))
# datamodules/jpeg_region.c: int64 zoo_jpeg_decode_region(uint8* src, uint64 size, uint8* dst, uint64 dst_size,
# int64 r0, int64 r1, int64 c0, int64 c1, int64 k, int64* x0)
_decode_region = types.ExternalFunction(
    "zoo_jpeg_decode_region",
    types.int64(types.uintp, types.uint64, types.uintp, types.uint64, *([types.int64] * 5), types.uintp),
)

_JIT = dict(cache=True, nogil=True, fastmath=True, error_model="numpy")  # ffcv's Compiler flags + cache
_sample_seed_jit = numba.njit(**_JIT)(_sample_seed)


@numba.njit(**_JIT)
def _random_crop(height, width, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, drawing as ffcv 1.0.2's ``get_random_crop`` does."""
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(10):
        target_area = area * np.random.uniform(scale[0], scale[1])
        aspect_ratio = np.exp(np.random.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(np.sqrt(target_area * aspect_ratio)))
        h = int(round(np.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(np.random.uniform(0, height - h + 1))
            j = int(np.random.uniform(0, width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


def _read(address, storage_state, page_shift):
    """ffcv's memory-manager reader (``compile_reader``), chosen by the state's layout."""


@numba.extending.overload(_read)
def _read_impl(address, storage_state, page_shift):
    if len(storage_state) == 3:  # OSCacheManager: (mmap, ptrs, sizes)
        def read(address, storage_state, page_shift):
            size = storage_state[2][np.searchsorted(storage_state[1], address)]
            return storage_state[0][address:address + size]
    else:  # ProcessCacheManager: (pages, ptrs, sizes, page slots)
        def read(address, storage_state, page_shift):
            size = storage_state[2][np.searchsorted(storage_state[1], address)]
            page = address >> page_shift
            offset = address - (page << page_shift)
            return storage_state[0][storage_state[3][page], offset:offset + size]
    return read


# libjpeg-turbo decodes at 1/2, 1/4 and 1/8 scale with reduced-size IDCTs (fast); the other
# n/8 factors measured slower than a full decode here (benchmarks/loader.py notes).
_DCT_SCALES = (1, 2, 4)  # scale_denom / ... as 1/8 steps: 8/8 -> 4/8 -> 2/8 -> 1/8


@numba.njit(parallel=True, **_JIT)
def _decode_batch(batch_indices, destination, temp_storage, metadata, storage_state, page_shift, state,
                  scale, ratio, distinct, flip_p, dct, jpg_mode, center, crop_decode):
    """Decode, crop, resize (and flip) a batch. ``center`` > 0: the center crop of ffcv's
    CenterCropRGBImageDecoder (``center`` x the short side), no randomness; else a random crop.
    ``crop_decode``: decode only the rows and iMCU columns of a JPEG that the crop reads
    (datamodules/jpeg_region.c: the same pixels; the whole image if it answers -1)."""
    seed, epoch = state[0], state[1]
    out_h, out_w = destination.shape[1], destination.shape[2]
    x0s = np.zeros(len(batch_indices), dtype=np.int64)  # per image: the region's first decoded column
    for dst_ix in numba.prange(len(batch_indices)):
        source_ix = batch_indices[dst_ix]
        field = metadata[source_ix]
        image_data = _read(field["data_ptr"], storage_state, page_shift)
        height = np.uint32(field["height"])
        width = np.uint32(field["width"])
        if center > 0:  # ffcv 1.0.2 get_center_crop
            c = int(center * min(height, width))
            i, j, h, w = (height - c) // 2, (width - c) // 2, c, c
        else:
            stream = 2 * (dst_ix + 1) if distinct else 0  # CROP_STREAM (+ position)
            np.random.seed(_sample_seed_jit(seed, epoch, source_ix, stream))
            i, j, h, w = _random_crop(height, width, scale, ratio)
        dst = destination[dst_ix]
        if field["mode"] == jpg_mode:
            # decode-time DCT scaling: the largest 1/2^k reduction that keeps the crop at least
            # the output size, so the resize stays a downscale (antialiased by INTER_AREA)
            k = 1
            if dct:
                while k < 8 and h >= 2 * k * out_h and w >= 2 * k * out_w:
                    k *= 2
            sh = (height + k - 1) // k  # TJSCALED: ceil(dim * 1/k)
            sw = (width + k - 1) // k
            buf = temp_storage[dst_ix]
            i0 = min(int(np.round(i / k)), sh - 1)
            j0 = min(int(np.round(j / k)), sw - 1)
            i1 = max(min(int(np.round((i + h) / k)), sh), i0 + 1)
            j1 = max(min(int(np.round((j + w) / k)), sw), j0 + 1)
            cw = -1
            if crop_decode:  # rows i0..i1 of the region, stride cw, its first column x0s[dst_ix]
                cw = _decode_region(image_data.ctypes.data, len(image_data), buf.ctypes.data, buf.size,
                                    i0, i1, j0, j1, k, x0s[dst_ix:].ctypes.data)
            if cw > 0:
                x0 = x0s[dst_ix]
                _resize(0, buf.ctypes.data, i1 - i0, cw, 0, i1 - i0, j0 - x0, j1 - x0, dst.ctypes.data, out_h, out_w)
            else:
                _imdecode(image_data.ctypes.data, len(image_data), height, width, buf.ctypes.data,
                          height, width, 0, 0, 1, k, 0, 0)
                _resize(0, buf.ctypes.data, sh, sw, i0, i1, j0, j1, dst.ctypes.data, out_h, out_w)
        else:
            _resize(0, image_data.ctypes.data, height, width, i, i + h, j, j + w, dst.ctypes.data, out_h, out_w)
        if flip_p > 0:
            # the flip of the seeded flip op (make_seeded_flip), fused: one pass in place, no batch copy
            fstream = 2 * (dst_ix + 1) + 1 if distinct else 1  # FLIP_STREAM (+ position)
            np.random.seed(_sample_seed_jit(seed, epoch, source_ix, fstream))
            if np.random.rand() < flip_p:
                for r in range(out_h):
                    for c in range(out_w // 2):
                        for ch in range(3):
                            t = dst[r, c, ch]
                            dst[r, c, ch] = dst[r, out_w - 1 - c, ch]
                            dst[r, out_w - 1 - c, ch] = t
    return destination[: len(batch_indices)]


def _page_shift(memory_read) -> np.uint64:
    """log2 of the page size that ffcv's ProcessCacheManager reader closes over (0 for OSCacheManager)."""
    func = getattr(memory_read, "py_func", memory_read)
    cells = dict(zip(func.__code__.co_freevars, func.__closure__ or ()))
    return np.uint64(cells["page_size_log2"].cell_contents) if "page_size_log2" in cells else np.uint64(0)


def make_seeded_decoder(output_size, scale, ratio, epoch_seed: EpochSeed, distinct_repeats: bool = False,
                        flip: float = 0.0, dct_scaling: bool = False, crop_decode: Optional[bool] = None):
    """ffcv's RandomResizedCropRGBImageDecoder, drawing each crop from (seed, epoch, index).

    ``distinct_repeats``: also from the position in the batch, so that the copies of a sample
    that repeated-augmentation sampling puts in one batch get different crops.
    ``flip``: also flip horizontally with this probability, with the draws of
    :func:`make_seeded_flip` (same images, one copy of the batch less).
    ``dct_scaling``: decode JPEGs at 1/2, 1/4 or 1/8 size when the crop stays at least the
    output size (libjpeg-turbo's scaled IDCT), then resize (INTER_AREA) as usual.
    ``crop_decode``: decode only the rows and iMCU columns of a JPEG that the crop reads (the
    same pixels); None: where available (:func:`crop_decode_available`).
    The decode loop is compiled once into numba's on-disk cache (see ``_decode_batch``).
    """
    from ffcv.fields.rgb_image import IMAGE_MODES

    if not 0.0 <= flip <= 1.0:
        raise ValueError(f"flip={flip} is a probability: use 0..1")

    class SeededRandomResizedCropRGBImageDecoder(_ffcv_types()):
        def __init__(self) -> None:
            super().__init__(output_size, scale=tuple(scale), ratio=tuple(ratio))
            self.epoch_seed = epoch_seed
            self.flip = float(flip)
            self.dct_scaling = bool(dct_scaling)

        def generate_code(self) -> Callable:
            _register_symbols()
            from ffcv.pipeline.compiler import Compiler

            read_state = Compiler.compile(_state_reader(self.epoch_seed.address))
            scale_a, ratio_a = np.array(self.scale, dtype=np.float64), np.array(self.ratio, dtype=np.float64)
            distinct, flip_p, dct = bool(distinct_repeats), self.flip, self.dct_scaling
            jpg, crop = IMAGE_MODES["jpg"], crop_decode_available() and crop_decode is not False
            page_shift = _page_shift(self.memory_read)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                return _decode_batch(batch_indices, destination, temp_storage, metadata, storage_state, page_shift,
                                     read_state(), scale_a, ratio_a, distinct, flip_p, dct, jpg, 0.0, crop)

            return decode

    return SeededRandomResizedCropRGBImageDecoder()


def make_seeded_flip(flip_prob: float, epoch_seed: EpochSeed, distinct_repeats: bool = False):
    """ffcv's RandomHorizontalFlip, flipping sample ``i`` iff its (seed, epoch, i) draw < ``flip_prob``."""
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation
    from ffcv.pipeline.state import State

    class SeededRandomHorizontalFlip(Operation):
        def __init__(self) -> None:
            super().__init__()
            self.flip_prob = float(flip_prob)
            self.epoch_seed = epoch_seed

        def generate_code(self) -> Callable:
            my_range = Compiler.get_iterator()
            p = self.flip_prob
            seed_c = Compiler.compile(_sample_seed)
            read_state = Compiler.compile(_state_reader(self.epoch_seed.address))
            distinct = distinct_repeats

            def flip(images, dst, indices):
                state = read_state()
                seed, epoch = state[0], state[1]
                for i in my_range(images.shape[0]):
                    stream = 2 * (i + 1) + 1 if distinct else 1  # FLIP_STREAM (+ position)
                    np.random.seed(seed_c(seed, epoch, indices[i], stream))
                    if np.random.rand() < p:
                        dst[i] = images[i, :, ::-1]
                    else:
                        dst[i] = images[i]
                return dst

            flip.is_parallel = True
            flip.with_indices = True  # ffcv passes the batch's sample indices (graph.py)
            return flip

        def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
            return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)

    return SeededRandomHorizontalFlip()


def make_center_crop_decoder(output_size, ratio: float):
    """ffcv's CenterCropRGBImageDecoder (same pixels), decoded by the cached loop above: a
    validation Loader's first batch then skips numba's compile too."""
    from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder

    class CachedCenterCropRGBImageDecoder(CenterCropRGBImageDecoder):
        def generate_code(self) -> Callable:
            _register_symbols()
            jpg, page_shift, center = IMAGE_MODES["jpg"], _page_shift(self.memory_read), float(self.ratio)
            crop_decode = crop_decode_available()
            state, unused = np.zeros(2, dtype=np.int64), np.ones(2, dtype=np.float64)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                return _decode_batch(batch_indices, destination, temp_storage, metadata, storage_state, page_shift,
                                     state, unused, unused, False, 0.0, False, jpg, center, crop_decode)

            return decode

    return CachedCenterCropRGBImageDecoder(output_size, ratio)
