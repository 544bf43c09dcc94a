"""FFCV Loaders: built checked, reused across DataModules, closed when an epoch is abandoned,
resumed at a batch.

Facts about ffcv 1.0.2's ``Loader`` this module relies on (read in its source):

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

import gc
import hashlib
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from ..folder import DataError
from ._compat import EpochSetter, close_epoch, import_ffcv, run_epoch_from
from .pipelines import assert_pipeline_safe

OrderName = Literal["random", "quasi_random", "sequential"]

_ORDERS = {"random": "RANDOM", "quasi_random": "QUASI_RANDOM", "sequential": "SEQUENTIAL"}


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
        self.sampler = EpochSetter(loader)
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
        it = run_epoch_from(self.loader, skip)
        self._position = {"epoch": int(epoch), "batches": skip}
        try:
            for batch in it:
                self._position["batches"] += 1
                yield batch
        finally:
            close_epoch(it)

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
    import_ffcv()
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
    import_ffcv()
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
