"""The same augmentations as the FFCV pipelines with torchvision, where FFCV cannot be installed.

Train: RandomResizedCrop(res, scale, ratio) + RandomHorizontalFlip(flip); val: Resize(res / crop_ratio)
+ CenterCrop(res) (the same region as ffcv's CenterCropRGBImageDecoder). Both give uint8 NCHW
batches; normalisation happens on the device, as with FFCV. Resizing uses PIL with the model's
interpolation (ffcv uses OpenCV INTER_AREA).
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import warnings
import weakref
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

from lightning.pytorch.utilities import rank_zero_warn

from . import process_exit  # noqa: F401 - registers the SIGKILL of workers still alive at exit
from .backends import Backend
from .folder import DataError, atomic_write_json, cache_dir_for, check_headers, corrupt_error, load_rgb, read_json

HEADER_CHECK = "headers-v1"  # marker format for the one-time file check


class TrainTransform:
    """PIL image -> random resized crop + flip -> uint8 CHW tensor, at a resolution that can change.

    The resolution lives in a shared-memory tensor, so DataLoader workers (also persistent
    ones) see :meth:`set_resolution` from the next sample on: call it between epochs.
    """

    def __init__(
        self, res: int, scale: tuple[float, float], ratio: tuple[float, float], interpolation: str = "bilinear",
        flip: float = 0.5,
    ):
        self.res = torch.tensor([res], dtype=torch.int64).share_memory_()
        self.flip = float(flip)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = InterpolationMode(interpolation)
        self._built: tuple[int, Callable] | None = None

    def set_resolution(self, res: int) -> None:
        self.res[0] = res

    def __call__(self, image):
        res = int(self.res[0])
        if self._built is None or self._built[0] != res:
            self._built = (res, v2.Compose([
                v2.RandomResizedCrop(res, scale=self.scale, ratio=self.ratio, interpolation=self.interpolation, antialias=True),
                *([v2.RandomHorizontalFlip(self.flip)] if self.flip > 0 else []),
                v2.PILToTensor(),  # uint8 CHW, no float conversion
            ]))
        return self._built[1](image)


def val_transform(res: int, crop_ratio: float, interpolation: str = "bilinear") -> Callable:
    """Resize the short side to ``int(res / crop_ratio)``, center-crop ``res`` -> uint8 CHW tensor."""
    return v2.Compose([
        v2.Resize(int(res / crop_ratio), interpolation=InterpolationMode(interpolation), antialias=True),
        v2.CenterCrop(res),
        v2.PILToTensor(),
    ])


class PackedSamples:
    """``(path, label)`` samples in three numpy arrays (UTF-8 paths end to end, their offsets,
    the labels) instead of a list of tuples.

    A worker started from a forkserver (:func:`worker_start_method`) receives the dataset
    pickled: 1.28M tuples (ImageNet's train split) pickle to 78 MB in 1.4 s, per worker, on
    the main process; the arrays are a copy of ~70 MB of memory. Forked workers gain too: a
    list of Python objects is copied page by page into each worker as reading it touches the
    reference counts (pytorch/pytorch#13246); arrays stay shared.
    """

    def __init__(self, samples: list[tuple[str, int]]):
        import numpy as np

        encoded = [p.encode("utf-8", "surrogateescape") for p, _ in samples]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[str, int]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.blob[a:b].tobytes().decode("utf-8", "surrogateescape"), int(self.labels[i])


class ImageFolderDataset(Dataset):
    """``(path, label)`` samples -> ``(transform(image), label)``.

    An image that fails to decode raises DataError naming the file, or with ``skip_corrupt``
    is replaced by the next readable sample (and a warning names it).
    """

    def __init__(self, samples: "list[tuple[str, int]] | PackedSamples", transform: Callable, skip_corrupt: bool = False):
        self.samples = samples if isinstance(samples, PackedSamples) else PackedSamples(samples)
        self.transform, self.skip_corrupt = transform, skip_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):  # from EpochSampler: the augmentation's randomness is a function of the key
            i, seed = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self._get(i)
        return self._get(key)

    def _get(self, i: int) -> tuple[torch.Tensor, int]:
        for k in range(min(len(self.samples), 16)):  # give up after 16 unreadable neighbours
            path, label = self.samples[(i + k) % len(self.samples)]
            try:
                image = load_rgb(path)
            except DataError as e:
                if not self.skip_corrupt:
                    raise
                warnings.warn(f"skipping {e}", stacklevel=1)
                continue
            return self.transform(image), label
        raise DataError(f"16 unreadable images in a row from {self.samples[i][0]}: check the dataset")


class EpochSampler(Sampler):
    """One process's train order as a function of (seed, epoch) only, and a seed per sample.

    Yields ``(index, sample_seed)``; ImageFolderDataset seeds the crop/flip of that sample
    with it, so epoch e's batches are the same whether the process ran epochs 0..e-1 or
    resumed from a checkpoint at the end of epoch e-1 (torch's RandomSampler draws from one
    generator across epochs: a resumed run would repeat epoch 0's order). Lightning calls
    :meth:`set_epoch` before each epoch. Under DDP: :class:`DistributedEpochSampler`.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, int(seed), 0
        self.resume_at: tuple[int, int] | None = None  # (epoch, samples already trained)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # a generator: the order is drawn (and resume_at used) at the first next()
        order, seeds = _epoch_draws(self.n, self.seed, self.epoch)
        yield from ((i, seeds[i]) for i in order[_take_resume(self):])


def _epoch_draws(n: int, seed: int, epoch: int) -> tuple[list[int], list[int]]:
    """Epoch ``epoch``'s order of ``n`` samples and each sample's crop seed: a function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist(), torch.randint(0, 2**62, (n,), generator=g).tolist()


def _take_resume(sampler) -> int:
    """Samples of this epoch already trained before a mid-epoch resume (0 otherwise); used once."""
    at, sampler.resume_at = sampler.resume_at, None
    return at[1] if at is not None and at[0] == sampler.epoch else 0


class DistributedEpochSampler(DistributedSampler):
    """:class:`EpochSampler` for one rank of ``num_replicas``: the same (seed, epoch) order and
    per-sample seeds, padded and split the way torch's DistributedSampler does (rank ``r``
    takes positions ``r, r + world, ...``). A DistributedSampler, so Lightning keeps it instead
    of putting in its own, whose crops would come from the workers' RNG (not resumable)."""

    def __init__(self, n: int, seed: int = 0, *, num_replicas: int, rank: int, drop_last: bool = False) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.n = n
        self.resume_at: tuple[int, int] | None = None  # (epoch, samples this rank already trained)

    def __iter__(self):
        order, seeds = _epoch_draws(self.n, self.seed, self.epoch)  # EpochSampler's draws
        if self.drop_last:
            order = order[: self.total_size]
        else:
            order += (order * math.ceil(self.total_size / max(len(order), 1)))[: self.total_size - len(order)]
        mine = order[self.rank : self.total_size : self.num_replicas]
        yield from ((i, seeds[i]) for i in mine[_take_resume(self):])


class WorkerLoader(DataLoader):
    """A DataLoader whose worker processes end when this process exits.

    Its workers ignore SIGTERM (:func:`worker_ignores_job_signals`), and at exit
    ``multiprocessing`` ends daemonic children with SIGTERM and then joins them: a persistent
    worker still alive then (a loader referenced until exit: a notebook's DataModule, a trainer
    in a reference cycle) made the process wait forever after its work was done. Each
    iterator with workers is remembered (weakly) and :func:`_end_workers_at_exit` shuts them
    down the way a finished iterator does, before ``multiprocessing``'s exit hook runs; any
    worker still alive then (one whose iterator was collected earlier and whose SIGTERM was
    ignored) gets SIGKILL from :func:`process_exit.end_deaf_children`.
    """

    def _get_iterator(self):
        it = super()._get_iterator()
        if self.num_workers > 0:
            _WORKER_ITERATORS.add(it)
        return it


_WORKER_ITERATORS: weakref.WeakSet = weakref.WeakSet()


def _end_workers_at_exit() -> None:
    for it in list(_WORKER_ITERATORS):
        try:
            it._shutdown_workers()  # what the iterator's __del__ does: a None to each worker, then join
        except Exception:  # noqa: BLE001 - exiting anyway; process_exit.end_deaf_children ends the rest
            pass


# Registered after torch.utils.data's and multiprocessing's own exit hooks (at import of torch),
# and after process_exit's SIGKILL of deaf children, so it runs before all three (atexit is last
# in, first out): workers are asked to stop first, torch's flag would turn _shutdown_workers into a
# no-op, and multiprocessing's hook is the join that waited forever.
atexit.register(_end_workers_at_exit)


def worker_ignores_job_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGUSR1 and SIGTERM.

    ``scancel --signal=USR1`` (Slurm's preemption warning) and the requeue's SIGTERM reach every
    process of the job step. The training process handles them (Lightning saves an hpc
    checkpoint and requeues); a worker, which does not, would die of them, and the rank would
    end in "DataLoader worker (pid N) is killed by signal" instead of stopping cleanly. The
    training process ends its workers itself (:class:`WorkerLoader`, also at exit), and a
    worker whose parent is gone exits (torch's watchdog; :class:`WorkerInit` for workers whose
    parent is a forkserver).
    """
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class WorkerInit:
    """DataLoader ``worker_init_fn``: :func:`worker_ignores_job_signals`, and a worker started
    from a forkserver exits when the training process that asked for it is gone.

    torch's worker watchdog only checks that the worker's *parent* lives; a forkserver's worker
    has the server as its parent, and the server lives as long as any worker holds its "alive"
    pipe (multiprocessing passes it to each child): after a SIGKILL of the training process the
    server and its workers waited for each other forever (seen here after killing 2-rank runs).
    Such a worker watches the training process (a pidfd, Linux >= 5.3; else a poll each second)
    and ends itself when it exits; the server then exits too.
    """

    def __init__(self, manager_pid: int) -> None:
        self.manager_pid = manager_pid

    def __call__(self, worker_id: int) -> None:
        worker_ignores_job_signals(worker_id)
        if os.getppid() != self.manager_pid:
            import threading

            threading.Thread(target=_exit_when_gone, args=(self.manager_pid,), name="zoo-manager-watch",
                             daemon=True).start()


def _exit_when_gone(pid: int) -> None:
    import select
    import time

    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd here, or the process is already gone
        fd = None
    if fd is not None:
        select.select([fd], [], [])  # readable once the process has exited
        os._exit(0)
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:  # alive, someone else's (not expected)
            pass
        time.sleep(1.0)


# CPython releases whose os.fork() child can deadlock on the runtime's HEAD_LOCK (python/cpython#112275;
# fixed in 3.8.20, 3.9.20, 3.10.15, 3.11.10, and never present in 3.12+)
_FORK_HEAD_LOCK_FIXED = {(3, 8): (3, 8, 20), (3, 9): (3, 9, 20), (3, 10): (3, 10, 15), (3, 11): (3, 11, 10)}
WORKER_START_ENV = "ZOO_WORKER_START"


def fork_may_deadlock(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> bool:
    """Whether this CPython has the fork deadlock of python/cpython#112275 (see :func:`worker_start_method`)."""
    fixed = _FORK_HEAD_LOCK_FIXED.get(tuple(version[:2]))
    return fixed is not None and tuple(version) < fixed


def worker_start_method() -> str | None:
    """How DataLoader workers start: ``None`` (torch's default, fork on Linux) or ``"forkserver"``.

    On CPython before 3.11.10 / 3.10.15 (python/cpython#112275) a forked child can deadlock in
    ``PyOS_AfterFork_Child``, on the runtime lock (HEAD_LOCK) that another thread held at the
    moment of the fork. Under DDP on gloo that thread exists: gloo's worker thread takes the GIL
    to destroy each finished collective's Work object (see :mod:`.process_exit`), creating a
    thread state, which takes HEAD_LOCK; and Lightning all-reduces each loader's length just
    before ``iter()`` forks its workers. Seen here: a 2-rank CPU fit with one worker per loader
    hung with a worker stuck at ``PyOS_AfterFork_Child -> _PyEval_ReInitThreads ->
    _PyThreadState_DeleteExcept`` (gdb), in 1 of ~6 runs of the preempted-job test. On those
    Pythons, in a process with a torch.distributed process group (whose threads are the ones
    that take the GIL from outside Python), workers start from a forkserver instead: a
    single-threaded server process that ``multiprocessing`` starts with fork+exec, preloaded
    with this module (and so torch), which forks each worker. A forkserver, like spawn, imports
    the script being run in each worker, so such a script needs ``if __name__ == "__main__":``
    (``zoo`` has it); a single process (a notebook, a script without the guard) keeps fork.
    ``ZOO_WORKER_START=fork|forkserver|spawn`` overrides the choice.
    """
    import multiprocessing

    choice = os.environ.get(WORKER_START_ENV, "").strip()
    if choice:
        if choice not in multiprocessing.get_all_start_methods():
            raise DataError(f"{WORKER_START_ENV}={choice!r}: use one of {', '.join(multiprocessing.get_all_start_methods())}")
        return choice
    if fork_may_deadlock() and _distributed() and "forkserver" in multiprocessing.get_all_start_methods():
        return "forkserver"
    return None


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _worker_context(method: str | None):
    import multiprocessing

    if method is None:
        return None
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # imported once by the server, so each worker forks with torch and the datasets' code loaded;
        # the server ignores Slurm's job signals as the workers do (it would die of SIGUSR1)
        ctx.set_forkserver_preload(["datamodules._forkserver_preload"])
    if method != "fork":
        _start_helpers_deaf_to_job_signals(method)
    return ctx


def _start_helpers_deaf_to_job_signals(method: str) -> None:
    """Start multiprocessing's helper processes now, with SIGUSR1 and SIGTERM blocked: the
    resource tracker (spawn and forkserver track their semaphores there) and the forkserver.

    ``scancel --signal=USR1`` reaches every process of the job step. The resource tracker ignores
    only SIGINT and SIGTERM: it died of SIGUSR1, its successor printed a ``KeyError`` traceback for
    each semaphore the first one had registered (a failure of the preempted-job test in CI). A
    blocked signal stays blocked across fork and exec, and neither helper unblocks it. The
    caller's mask is restored after: a SIGUSR1 that arrives meanwhile is delivered then, not lost.
    """
    import signal
    from multiprocessing import forkserver, resource_tracker

    if not hasattr(signal, "pthread_sigmask"):
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
    try:
        resource_tracker.ensure_running()
        if method == "forkserver":
            forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def make_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    drop_last: bool,
    seed: int = 0,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A torch DataLoader. Train: Lightning swaps in a DistributedSampler under DDP
    (use_distributed_sampler), unless ``sampler`` is one (samplers.RASampler, or the unpadded
    evaluation sampler), which it keeps."""
    return WorkerLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),  # page-locked host memory for async host->device copies
        persistent_workers=num_workers > 0,  # keep worker processes (and their file handles) across epochs
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed) if shuffle and sampler is None else None,
        worker_init_fn=WorkerInit(os.getpid()),
        multiprocessing_context=_worker_context(worker_start_method()) if num_workers > 0 else None,
    )


class TorchvisionBackend(Backend):
    """PIL decoding in DataLoader worker processes; files are checked once (headers) and remembered.

    Under DDP the train loader gets :class:`DistributedEpochSampler` and evaluation loaders
    Lightning's UnrepeatedDistributedSampler (rank ``r`` reads ``r::world_size``, no padding);
    Lightning keeps both because they are DistributedSamplers.
    """

    name = "torchvision"
    keeps_loaders = False  # dropping them ends their persistent worker processes

    def __init__(self, dm) -> None:
        super().__init__(dm)
        self._train_transform: TrainTransform | None = None
        # per split, packed once per setup (~0.56 s for ImageNet's 1.28M train samples), not per loader
        self._samples: dict[str, PackedSamples] = {}

    def _marker(self, split: str):
        return cache_dir_for(self.dm.root) / f"{split}.{HEADER_CHECK}.json"

    def prepare(self) -> None:
        for split in ("train", "val"):
            samples = self.dm.samples(split)
            marker = read_json(self._marker(split))
            if marker and marker.get("num_files") == len(samples):
                continue
            atomic_write_json(self._marker(split), {"num_files": len(samples), "bad": check_headers(samples)})

    def is_prepared(self) -> bool:
        return all(self._marker(s).is_file() for s in ("train", "val"))

    def setup(self) -> None:
        for split in ("train", "val"):
            samples = self.dm.samples(split)
            bad = (read_json(self._marker(split)) or {}).get("bad") or []
            if bad:
                if not self.dm.hparams.skip_corrupt:
                    raise corrupt_error([tuple(b) for b in bad])
                rank_zero_warn(f"{split}: skipping {len(bad)} unreadable images (e.g. {bad[0][0]})")
                bad_paths = {b[0] for b in bad}
                samples = [s for s in samples if s[0] not in bad_paths]
            self._samples[split] = PackedSamples(samples)

    def loader(self, split: str, *, train: bool, rank: int, world_size: int) -> DataLoader:
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        dm, hp = self.dm, self.dm.hparams
        if split not in self._samples:
            self.setup()
        if train:
            self._train_transform = TrainTransform(dm.train_resolution, hp.scale, hp.ratio, dm.interpolation, flip=hp.flip)
            tf: Callable = self._train_transform
        else:
            tf = val_transform(dm.val_resolution, dm.val_crop, dm.interpolation)
        samples = self._samples[split]
        if train and hp.train_per_class is not None:
            samples = PackedSamples([samples[int(i)] for i in dm.train_subset(samples.labels)])
        dataset = ImageFolderDataset(samples, tf, hp.skip_corrupt)
        sampler = None
        if not train and world_size > 1:
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
        if train and hp.ra_reps > 1:
            from .samplers import RASampler

            sampler = RASampler(dataset, reps=hp.ra_reps, num_replicas=world_size, seed=dm.seed, rank=rank)
        elif train and world_size == 1:
            sampler = EpochSampler(len(dataset), dm.seed)
        elif train:
            # padded to a multiple of world_size like Lightning's own DistributedSampler (drop_last=False)
            sampler = DistributedEpochSampler(len(dataset), dm.seed, num_replicas=world_size, rank=rank)
        return make_dataloader(
            dataset, batch_size=dm.per_device_batch_size, num_workers=dm.num_workers,
            shuffle=train, drop_last=hp.drop_last if train else False, seed=dm.seed, sampler=sampler,
        )

    def set_train_resolution(self, res: int) -> None:
        if self._train_transform is not None:
            self._train_transform.set_resolution(res)

    def teardown(self, stage: str) -> None:
        if stage == "fit":  # the DataModule drops its loaders: their persistent workers end
            self._train_transform = None


def photo_loader(dm, *, rank: int, world_size: int) -> DataLoader:
    """Eval crops of a folder of photos (labels -1), each once across ``world_size`` processes."""
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    tf = val_transform(dm.val_resolution, dm.val_crop, dm.interpolation)
    dataset = ImageFolderDataset(dm.samples("predict"), tf, dm.hparams.skip_corrupt)
    sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False) if world_size > 1 else None
    return make_dataloader(dataset, batch_size=dm.per_device_batch_size, num_workers=dm.num_workers,
                           shuffle=False, drop_last=False, sampler=sampler)
