"""FFCV train ops whose randomness depends only on (seed, epoch, sample index).

ffcv 1.0.2's ``RandomResizedCropRGBImageDecoder`` and ``RandomHorizontalFlip`` draw from numba's
``np.random``, whose state is per thread and seeded from the OS: which thread decodes which
sample changes from run to run, so ``seed_everything`` does not make crops and flips
reproducible. The ops here re-seed the decoding thread's generator for every sample from a hash
of (seed, epoch, sample index) and then draw exactly as ffcv does (the crop is ffcv's own
``get_random_crop``), so a run is reproducible whatever the thread scheduling, and the
distribution of crops is unchanged.

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


def make_seeded_decoder(output_size, scale, ratio, epoch_seed: EpochSeed, distinct_repeats: bool = False):
    """ffcv's RandomResizedCropRGBImageDecoder, drawing each crop from (seed, epoch, index).

    ``distinct_repeats``: also from the position in the batch, so that the copies of a sample
    that repeated-augmentation sampling puts in one batch get different crops.
    """
    from ffcv.fields.rgb_image import IMAGE_MODES, get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.compiler import Compiler

    class SeededRandomResizedCropRGBImageDecoder(_ffcv_types()):
        def __init__(self) -> None:
            super().__init__(output_size, scale=tuple(scale), ratio=tuple(ratio))
            self.epoch_seed = epoch_seed

        def generate_code(self) -> Callable:
            # ffcv's ResizedCropRGBImageDecoder.generate_code with one change: the generator of the
            # decoding thread is seeded per sample before get_random_crop draws.
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            get_crop_c = Compiler.compile(get_random_crop)
            seed_c = Compiler.compile(_sample_seed)
            read_state = Compiler.compile(_state_reader(self.epoch_seed.address))
            scale_a, ratio_a = np.array(self.scale), np.array(self.ratio)
            distinct = distinct_repeats

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                state = read_state()
                seed, epoch = state[0], state[1]
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        selected_size = 3 * height * width
                        temp_buffer = temp_buffer.reshape(-1)[:selected_size]
                        temp_buffer = temp_buffer.reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    stream = 2 * (dst_ix + 1) if distinct else 0  # CROP_STREAM (+ position)
                    np.random.seed(seed_c(seed, epoch, source_ix, stream))
                    i, j, h, w = get_crop_c(height, width, scale_a, ratio_a)
                    resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
                return destination[: len(batch_indices)]

            decode.is_parallel = True
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
