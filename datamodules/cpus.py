"""How many loader threads (ffcv) or worker processes (torchvision) a process should use.

The CPUs a process may run on are its affinity (``os.sched_getaffinity``): Slurm binds each
task to its ``--cpus-per-task`` CPUs, ``taskset``/``numactl`` and torchrun's NUMA binding do
the same. numba (which runs ffcv's decoding threads) allows no more threads than that
(``numba.set_num_threads`` raises "The number of threads must be between 1 and N"), and more
torchvision workers than CPUs only time-share them. So:

- the default (``num_workers=None``) is the number of CPUs in the affinity; when the affinity
  is the whole machine (nothing bound this process) and several processes of this node train
  together (DDP started by Lightning), each takes its share, ``cpus // local_processes``;
- an explicit value above the affinity is lowered to it, with one line saying so.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity; ``os.cpu_count()`` where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _bound() -> bool:
    """True if something (Slurm, taskset, numactl) restricted this process to part of the machine."""
    return usable_cpus() < (os.cpu_count() or 1)


def loader_workers(requested: int | None, *, local_processes: int = 1, what: str = "data.num_workers") -> int:
    """The loader's thread/worker count: ``requested`` capped at the usable CPUs, or the default."""
    cpus = usable_cpus()
    if requested is None:
        share = cpus if _bound() else cpus // max(1, local_processes)
        return max(1, share)
    if requested > cpus:
        from lightning.pytorch.utilities import rank_zero_only

        rank_zero_only(log.info)(
            f"{what}={requested} lowered to {cpus}: this process may use {cpus} CPU(s) (its affinity, e.g. "
            f"Slurm's --cpus-per-task); ask for more CPUs or set {what} <= {cpus}"
        )
        return cpus
    return int(requested)


def numba_layer_for_one_cpu() -> bool:
    """With one usable CPU, put numba's OpenMP layer before TBB (ffcv's decoding runs in numba).

    numba's TBB layer hangs the process at interpreter exit when it may use one CPU: TBB starts
    no worker thread there, and ``unload_tbb`` waits on a task no thread runs (numba/numba#10556,
    uxlfoundation/oneTBB#2056): a Slurm task with ``--cpus-per-task=1`` trains, prints its
    results and never exits. Only the priority changes (OpenMP, numba's workqueue, then TBB),
    before numba starts its threads: importing ffcv does (its Compiler sets numba's thread
    count), so this runs when ``datamodules`` is imported. ``NUMBA_THREADING_LAYER`` or
    ``NUMBA_THREADING_LAYER_PRIORITY`` set by the user are left alone. Returns whether it changed.
    """
    if usable_cpus() > 1 or os.environ.get("NUMBA_THREADING_LAYER") or os.environ.get("NUMBA_THREADING_LAYER_PRIORITY"):
        return False
    priority = ["omp", "workqueue", "tbb"]
    if "numba" not in sys.modules:  # numba reads it when imported (numba.core.config)
        os.environ["NUMBA_THREADING_LAYER_PRIORITY"] = " ".join(priority)
        return True
    import numba
    from numba.np.ufunc import parallel

    if parallel._is_initialized:  # the layer is chosen once, when numba starts its threads
        return False
    numba.config.THREADING_LAYER_PRIORITY = priority
    return True
