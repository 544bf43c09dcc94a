"""DataLoader worker processes: how they start, which job signals they ignore, how they end.

Process lifecycle, not data: the torchvision backend's loaders use these (``make_dataloader``),
and nothing here knows about images. :mod:`.exit_hooks` (what a training process does at
interpreter exit) and :mod:`.forkserver_preload` (the forkserver's one import) sit beside it.
"""

from __future__ import annotations

import atexit
import os
import sys
import weakref

from torch.utils.data import DataLoader

from ..folder import DataError
from . import exit_hooks  # noqa: F401 - registers the SIGKILL of workers still alive at exit (before the hook below)


class WorkerLoader(DataLoader):
    """A DataLoader whose worker processes end when this process exits.

    Its workers ignore SIGTERM (:func:`worker_ignores_job_signals`), and at exit
    ``multiprocessing`` ends daemonic children with SIGTERM and then joins them: a persistent
    worker still alive then (a loader referenced until exit: a notebook's DataModule, a trainer
    in a reference cycle) made the process wait forever after its work was done. Each
    iterator with workers is remembered (weakly) and :func:`_end_workers_at_exit` shuts them
    down the way a finished iterator does, before ``multiprocessing``'s exit hook runs; any
    worker still alive then (one whose iterator was collected earlier and whose SIGTERM was
    ignored) gets SIGKILL from :func:`.exit_hooks.end_deaf_children`.
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
        except Exception:  # noqa: BLE001 - exiting anyway; exit_hooks.end_deaf_children ends the rest
            pass


# Registered after torch.utils.data's and multiprocessing's own exit hooks (at import of torch),
# and after exit_hooks.py's SIGKILL of deaf children, so it runs before all three (atexit is last
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
    to destroy each finished collective's Work object (see :mod:`.exit_hooks`), creating a
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


def worker_context(method: str | None):
    import multiprocessing

    if method is None:
        return None
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # imported once by the server, so each worker forks with torch and the datasets' code loaded;
        # the server ignores Slurm's job signals as the workers do (it would die of SIGUSR1)
        ctx.set_forkserver_preload(["datamodules.processes.forkserver_preload"])
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
