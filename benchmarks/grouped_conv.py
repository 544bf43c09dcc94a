"""Can stacking members beat a loop on this CPU at all? One grouped conv (what a stacked
ensemble runs per layer: 4 members' 3x3 convs side by side) vs the 4 convs one after another,
same FLOPs, NCHW and channels_last.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/grouped_conv.py

Prints the median of 20 timed calls after 3 warm-up calls per cell (ms) and the loop/grouped
ratio: above 1 means stacking can win for that layer shape. Shapes: ResNet-18's 3x3 convs at
64 px input (the ensemble benchmark's), batch 1, 16 and 64.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_line  # noqa: E402

MEMBERS = 4


def median_ms(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    rows = []
    for n, c, h in [(1, 64, 16), (16, 64, 16), (16, 128, 8), (16, 256, 4), (64, 64, 16), (64, 256, 4)]:
        convs = [torch.nn.Conv2d(c, c, 3, padding=1) for _ in range(MEMBERS)]
        xs = [torch.randn(n, c, h, h) for _ in range(MEMBERS)]
        grouped = torch.nn.Conv2d(MEMBERS * c, MEMBERS * c, 3, padding=1, groups=MEMBERS)
        xg = torch.cat(xs, 1)
        row = []
        for fmt in (torch.contiguous_format, torch.channels_last):
            cs = [m.to(memory_format=fmt) for m in convs]
            xf = [x.contiguous(memory_format=fmt) for x in xs]
            g, xgf = grouped.to(memory_format=fmt), xg.contiguous(memory_format=fmt)
            loop = median_ms(lambda: [m(x) for m, x in zip(cs, xf)])
            one = median_ms(lambda: g(xgf))
            row += [loop, one, loop / one]
        rows.append(f"| {n} | {c} | {h} | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.2f}x | {row[3]:.2f} | {row[4]:.2f} | {row[5]:.2f}x |")
    print(machine_line("cpu", load, f"{torch.get_num_threads()} torch threads"))
    print("| batch | channels | size | 4 convs (ms) | grouped (ms) | loop / grouped | 4 convs, channels_last | grouped, channels_last | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
