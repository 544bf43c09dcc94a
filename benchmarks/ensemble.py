"""Stacked (torch.func vmap) vs looped inference of a same-architecture ensemble, images/s.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/ensemble.py [--members 4] [--arch convnet] [--res 64]

Interleaved (looped, stacked, looped, stacked, ...) in one process so that other jobs on a
shared machine load both alike; prints the median of ``--repeats`` timings per batch size.
Every member is in eval mode, under ``torch.no_grad()``; outputs are checked equal first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from callbacks.ensemble import MemberRunner  # noqa: E402
from zoo.registry import create_network  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--arch", default="convnet")
    ap.add_argument("--res", type=int, default=64)  # the demo's resolution
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    nets = []
    for s in range(args.members):
        torch.manual_seed(s)
        nets.append(create_network(args.arch, num_classes=args.classes).eval())
    looped = MemberRunner(nets, [0] * args.members, stack=False)
    stacked = MemberRunner(nets, [0] * args.members, stack=True)
    print(f"{args.members} x {args.arch} at {args.res} px, {args.classes} classes, {args.threads} threads, "
          f"torch {torch.__version__}, load {os.getloadavg()[0]:.1f}")
    print(f"| batch | looped img/s | stacked img/s | speed-up |")
    print(f"|---|---|---|---|")
    for bs in args.batch:
        x = torch.randn(bs, 3, args.res, args.res)
        with torch.no_grad():
            torch.testing.assert_close(stacked(x), looped(x), rtol=1e-3, atol=1e-4)
            times = {"looped": [], "stacked": []}
            for _ in range(args.repeats):
                for name, fn in (("looped", looped), ("stacked", stacked)):
                    fn(x)  # warm
                    t0 = time.perf_counter()
                    for _ in range(args.iters):
                        fn(x)
                    times[name].append((time.perf_counter() - t0) / args.iters)
        lo, st = statistics.median(times["looped"]), statistics.median(times["stacked"])
        print(f"| {bs} | {bs / lo:.0f} | {bs / st:.0f} | {lo / st:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
