"""Stacked (torch.func vmap) vs looped inference of a same-architecture ensemble, images/s.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/ensemble.py [--members 4] [--archs convnet resnet18 mlp] [--res 64]

Interleaved (looped, stacked, looped, stacked, ...) in one process so that other jobs on a
shared machine load both alike; prints the median of ``--repeats`` timings per batch size and
the 1-minute load average before and after. Every member is in eval mode, under
``torch.no_grad()``, conv+BN folded on both paths (MemberRunner); outputs are checked equal
first. Writes benchmarks/results/ensemble.md.
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

from benchmarks._common import machine_line, write_result  # noqa: E402
from callbacks.ensemble import MemberRunner  # noqa: E402
from zoo.registry import create_network  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--archs", nargs="+", default=["convnet", "resnet18", "mlp"])
    ap.add_argument("--res", type=int, default=64)  # the demo's resolution
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ensemble.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for arch in args.archs:
        nets = []
        for s in range(args.members):
            torch.manual_seed(s)
            net = create_network(arch, num_classes=args.classes)
            if getattr(net, "input_shape", (3, args.res, args.res))[1:] != (args.res, args.res):  # mlp, logreg
                net = create_network(arch, num_classes=args.classes, input_size=args.res)
            nets.append(net.eval().to(dev))
        looped = MemberRunner(nets, [0] * args.members, stack=False)
        stacked = MemberRunner(nets, [0] * args.members, stack=True)
        for bs in args.batch:
            x = torch.randn(bs, 3, args.res, args.res, device=dev)
            with torch.no_grad():
                torch.testing.assert_close(stacked(x), looped(x), rtol=1e-3, atol=1e-3)
                times = {"looped": [], "stacked": []}
                for _ in range(args.repeats):
                    for name, fn in (("looped", looped), ("stacked", stacked)):
                        fn(x)  # warm
                        sync()
                        t0 = time.perf_counter()
                        for _ in range(args.iters):
                            fn(x)
                        sync()
                        times[name].append((time.perf_counter() - t0) / args.iters)
            lo, st = statistics.median(times["looped"]), statistics.median(times["stacked"])
            spread = max(times["looped"]) / min(times["looped"])
            rows.append((arch, bs, bs / lo, bs / st, lo / st, spread))
            print(f"{arch} batch {bs}: looped {bs / lo:.1f} img/s, stacked {bs / st:.1f} img/s, {lo / st:.2f}x "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    cmd = "python benchmarks/ensemble.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# Stacked (torch.func vmap) vs looped inference, {args.members} members, {args.res} px, {args.classes} classes",
        "",
        machine_line(dev, load0, f"{args.threads} torch threads; median of {args.repeats} interleaved repeats "
                                  f"of {args.iters} calls"),
        f"Command: `{cmd.strip()}`",
        "",
        "| model | batch | looped img/s | stacked img/s | stacked / looped | looped max/min over repeats |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {a} | {b} | {lo:.1f} | {st:.1f} | {r:.2f}x | {sp:.2f} |" for a, b, lo, st, r, sp in rows],
    ]
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
