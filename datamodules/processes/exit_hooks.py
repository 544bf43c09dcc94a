"""What a training process needs at interpreter exit so that it neither aborts nor hangs.

Daemonic children that ignore SIGTERM (DataLoader workers: :func:`.workers.worker_ignores_job_signals`,
or any child forked after something set SIGTERM to SIG_IGN):
at exit ``multiprocessing`` ends daemonic children with SIGTERM and then joins them, forever for
one that ignores it. :func:`end_deaf_children` (registered at import, so before
``multiprocessing``'s own hook) ends those with SIGKILL first, which is what "daemonic" promises.
In CI, a worker left alive by a DataLoader iterator that was collected mid-run (its shutdown
joins for 5 s, then sends the SIGTERM the worker ignores) held `make test` after its summary.

Gloo (CPU DDP): each collective's Work object is destroyed by gloo's worker thread once done,
and its destructor takes the GIL (it releases a Python object torch keeps in its thread-local
state). If that happens after the main thread has started finalising the interpreter, CPython
(3.11-3.13) ends the thread with pthread_exit, whose unwinding crosses a noexcept C++ destructor:
``terminate called without an active exception`` and SIGABRT, after a run that finished fine.
Seen in CI on a 2-process ``ddp_spawn`` fit; a core dump put the abort in the thread
``pt_gloo_runloop`` at ``ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> ~ThreadLocalState
-> gil_scoped_acquire -> PyThread_exit_thread``. ``destroy_process_group()`` does not help
(the threads outlive it); releasing the GIL for a moment at exit, before finalisation, lets
those threads finish. Measured with benchmarks/gloo_exit.py (2 ranks, 20 DDP steps and 50
all-reduces, then exit): a rank aborted in 6 and in 7 of 16 runs (two measurements) without
this, in 0 of 16 with a 50 ms grace and in 0 of 16 with 0.25 s.
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal
import time

# 0.25 s: 5x the 50 ms that measured 0 aborts in 16 runs, for a loaded machine; paid once per
# process exit, by gloo processes only.
GLOO_EXIT_GRACE_S = 0.25
_registered = False


def _let_gloo_threads_finish() -> None:
    time.sleep(GLOO_EXIT_GRACE_S)  # the GIL is free: gloo's threads destroy their finished Work objects


def settle_gloo_at_exit() -> bool:
    """Once per process, if a gloo process group is up: give its threads the GIL at exit (see above)."""
    global _registered
    if _registered:
        return True
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "gloo":
        return False
    atexit.register(_let_gloo_threads_finish)  # atexit runs before finalisation, LIFO: after later hooks
    _registered = True
    return True


def ignores_sigterm(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGTERM (Linux: its SigIgn mask in /proc; elsewhere: False)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def end_deaf_children() -> list[int]:
    """SIGKILL this process's daemonic children that ignore SIGTERM; return their pids."""
    ended = []
    for child in multiprocessing.active_children():
        if child.daemon and child.pid is not None and ignores_sigterm(child.pid):
            child.kill()
            child.join(5)
            ended.append(child.pid)
    return ended


atexit.register(end_deaf_children)  # after multiprocessing's hook (imported with torch), so it runs first
