"""Every place this package reaches into ffcv 1.0.2's internals, and the ffcv issue each answers.

ffcv's public API (``DatasetWriter``, ``Loader``, the pipeline ops) is used as documented in the
other modules of this package; what is here depends on code inside ffcv that may change in a
release. Each entry names what it touches, why, and the upstream issue (libffcv/ffcv#N) where
there is one; "no issue" means none was found in ffcv's tracker.

| here | ffcv internal it touches | why | upstream |
|---|---|---|---|
| :func:`writer_patched` | ``ffcv.writer.tqdm``, ``ffcv.writer.sleep`` | the writer has no switch for its progress bar; its progress loop waits forever once a worker died (killed for memory, a bug in a Field) | no issue (the bar: #387 asks why it shows late) |
| :func:`pipeline_jit_modes` | ``Graph``'s jit rule (``declare_state_and_memory``, ``State.jit_mode``, ``ModuleWrapper``) | ``Graph.group_operations`` loops forever on jitted -> not jitted -> jitted | #396 |
| :func:`run_epoch_from` | ``Loader.next_traversal_order`` (read once by ``Loader.__iter__``) | no API starts an epoch at a batch (a resumed job) | no issue |
| :func:`close_epoch` | ``EpochIterator.close`` | ``iter(loader)`` starts a thread that lives until its epoch ends: an abandoned epoch leaks it and its buffers | #345, #393 (also #234) |
| :class:`EpochSetter` | ``Loader.next_epoch`` | Lightning sets the epoch through ``loader.sampler.set_epoch``; ffcv counts epochs itself | no issue |
| :func:`ffcv_version` | package metadata | ``ffcv.__version__`` says 0.0.3rc1 in 1.0.2 | #371 |
| :func:`import_ffcv` | ``ffcv.fields.rgb_image.IMAGE_MODES`` | a numba typed ``Dict`` filled at import: numba compiles its dict code, ~4.4 s of every process that imports ffcv; every reader of it runs in Python | no issue |

Elsewhere: the loader thread count is capped at the process's CPU affinity in
``datamodules/cpus.py`` (ffcv's default ``cpu_count()`` and an explicit count above the
affinity both fail in ``Compiler.set_num_threads``: #357, #382); the train and validation
decoders of ``datamodules/ffcv_ops.py`` re-implement ffcv's ops on public classes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from importlib.metadata import version
from typing import Any
from unittest import mock

import numpy as np

from ..folder import DataError


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


@contextlib.contextmanager
def writer_patched(bar: Any) -> Iterator[None]:
    """While writing: ffcv's writer draws ``bar`` (a tqdm factory) and its progress loop sleeps
    through a :class:`_Watchdog` (it polls every 0.1 s)."""
    import_ffcv()
    import ffcv.writer

    with mock.patch.object(ffcv.writer, "tqdm", bar), mock.patch.object(ffcv.writer, "sleep", _Watchdog()):
        yield


def _dummy_image_metadata() -> np.ndarray:
    import_ffcv()
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
    import_ffcv()
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


def run_epoch_from(loader: Any, skip_batches: int):
    """``iter(loader)`` for an epoch that starts at batch ``skip_batches`` of its order.

    The epoch's order (a function of seed and epoch) is sliced, so the skipped batches are not
    decoded. ``Loader.__iter__`` reads ``next_traversal_order()`` once: an instance attribute
    shadows the method for that one call.
    """
    if skip_batches:
        keep = len(loader) * loader.batch_size  # what ffcv's __iter__ keeps (drop_last)
        order = loader.next_traversal_order()[:keep][skip_batches * loader.batch_size:]
        loader.next_traversal_order = lambda: order
    try:
        return iter(loader)
    finally:
        loader.__dict__.pop("next_traversal_order", None)


def close_epoch(it: Any) -> None:
    """End an epoch's decoding thread (idempotent in ffcv 1.0.2: sets ``terminate_event``, exits
    the memory context)."""
    it.close()


class EpochSetter:
    """A loader's ``sampler``: Lightning calls ``loader.sampler.set_epoch(epoch)`` before every
    train epoch (``lightning.fabric.utilities.data._set_sampler_epoch``), also after a resume,
    when the loader was built before the checkpoint's epoch was restored."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader  # the ffcv Loader (not its wrapper: no reference cycle)

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = int(epoch)


def ffcv_version() -> str:
    """The installed ffcv's version, from its package metadata."""
    return version("ffcv")


# the ffcv release whose rgb_image.py reads IMAGE_MODES only from Python (generate_code, encode)
_PLAIN_IMAGE_MODES_FOR = "1.0.2"


def import_ffcv() -> None:
    """Import ffcv, with ``ffcv.fields.rgb_image.IMAGE_MODES`` as a plain dict.

    ffcv 1.0.2 builds ``IMAGE_MODES`` as a ``numba.typed.Dict`` at import (``{'jpg': 0, 'raw': 1}``);
    its first item assignment compiles numba's dict implementation, which numba does not cache:
    about 4.4 s of CPU in every process that imports ffcv (each ``zoo fit``, each DDP rank). Every
    reader of it (the decoders' ``generate_code``, ``RGBImageField.encode``, ``ffcv_ops``) runs in
    Python and only indexes it, so a plain dict behaves the same. Other ffcv versions are imported
    as they are. Call it before the first ``import ffcv``; afterwards it does nothing.
    """
    if "ffcv.fields.rgb_image" in sys.modules:
        return
    import importlib

    if ffcv_version() != _PLAIN_IMAGE_MODES_FOR:
        importlib.import_module("ffcv.fields.rgb_image")
        return
    import numba.typed

    with mock.patch.object(numba.typed, "Dict", dict):  # read by ``from numba.typed import Dict`` at import
        importlib.import_module("ffcv.fields.rgb_image")
