"""Does a gloo DDP process abort at interpreter exit? (datamodules/processes/exit_hooks.py)

    PYTHONPATH=$PWD .venv/bin/python benchmarks/gloo_exit.py --runs 16            # with the exit grace
    PYTHONPATH=$PWD .venv/bin/python benchmarks/gloo_exit.py --runs 16 --no-grace

Each run starts 2 spawned ranks that train a linear layer with DDP for 20 steps, issue
``--pending`` asynchronous all-reduces and wait for them, then exit at once. Prints how many runs
had a rank die (SIGABRT: "terminate called without an active exception").
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rank_main(rank: int, port: int, grace: bool, pending: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if grace:
        from datamodules.processes.exit_hooks import settle_gloo_at_exit

        settle_gloo_at_exit()
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 64))
    for _ in range(20):
        model(torch.randn(8, 64)).sum().backward()
    for work in [dist.all_reduce(torch.ones(1000), async_op=True) for _ in range(pending)]:
        work.wait()


def count_aborts(runs: int, grace: bool, pending: int = 50) -> list[list[int]]:
    """Exit codes of the runs in which a rank did not exit with 0."""
    import torch.multiprocessing as mp
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    bad = []
    for _ in range(runs):
        port = find_free_network_port()
        ctx = mp.start_processes(rank_main, args=(port, grace, pending), nprocs=2, join=False, start_method="spawn")
        for p in ctx.processes:
            p.join(120)
        codes = [p.exitcode for p in ctx.processes]
        if any(c != 0 for c in codes):
            bad.append(codes)
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=16)
    ap.add_argument("--pending", type=int, default=50)
    ap.add_argument("--no-grace", action="store_true")
    args = ap.parse_args()
    bad = count_aborts(args.runs, not args.no_grace, args.pending)
    print(f"| exit grace | runs | runs with a rank aborted |\n|---|---:|---:|\n"
          f"| {'off' if args.no_grace else 'on'} | {args.runs} | {len(bad)} |")


if __name__ == "__main__":
    main()
