"""Device augmentation: batched RandAugment/TrivialAugment vs the per-image loop it replaced.

    python benchmarks/augment.py [--repeats 7] [--device cpu]

Per configuration (policy x image size x batch), uint8 NCHW random images, the two
implementations are timed interleaved (loop, batched, loop, batched, ...) in one process so
that other load on the machine hits both alike; the table gives the median of ``--repeats``
calls each and the speed-up. The "per-image loop" is the code before the batched version:
``torch.stack([t(img) for img in images])`` with torchvision's v2 RandAugment / TrivialAugmentWide
(note: that RandAugment is torchvision's, stronger than timm's variant the batched one follows).
Writes benchmarks/results/augment.md.
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
from zoo.augment import BatchedAutoAugment  # noqa: E402

CONFIGS = [  # (policy, size, batch): issue 9's two regimes
    ("rand-m9-mstd0.5-inc1", 32, 256),
    ("ta_wide", 32, 256),
    ("rand-m9-mstd0.5-inc1", 224, 64),
    ("ta_wide", 224, 64),
]


def per_image_loop(policy: str):
    from torchvision.transforms import InterpolationMode, v2

    if policy == "ta_wide":
        t = v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR)
    else:
        t = v2.RandAugment(num_ops=2, magnitude=9, num_magnitude_bins=11)
    return lambda images: torch.stack([t(img) for img in images])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, x, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn(x)
    sync(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    # One intra-op thread: on a shared 2-core machine OpenMP's spinning threads turn other jobs'
    # load into 10-40x swings (measured: 23 ms vs 1055 ms for the same call, 1 vs 2 threads).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "augment.md"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    load0 = os.getloadavg()[0]
    for policy, size, batch in CONFIGS:
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
        batched = BatchedAutoAugment(policy).to(device)
        fns = {
            "loop": per_image_loop(policy),
            # the same kernels and semantics, one image per call: what batching itself buys
            "same_loop": lambda images: torch.cat([batched(images[i : i + 1]) for i in range(len(images))]),
            "batched": batched,
            # every op on the whole batch (the GPU's default path, eager here): the extra arithmetic
            "masked": BatchedAutoAugment(policy, impl="masked").to(device),
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        for f in fns.values():
            f(x)  # warm-up
        for _ in range(args.repeats):
            for k, f in fns.items():
                times[k].append(timed(f, x, device))
        ml, ms, mb, mm = (statistics.median(times[k]) for k in fns)
        rows.append((policy, size, batch, ml * 1e3, ms * 1e3, mb * 1e3, ml / mb, ms / mb, mm * 1e3))
        print(f"{policy:22s} {size:4d} px x {batch:4d}: loop {ml * 1e3:8.1f} ms  same-kernel loop {ms * 1e3:8.1f} ms  "
              f"batched {mb * 1e3:7.1f} ms  {ml / mb:5.1f}x / {ms / mb:5.1f}x  masked {mm * 1e3:7.1f} ms", flush=True)
    lines = [
        "# Device augmentation: batched vs per-image loop (uint8 NCHW)",
        "",
        machine_line(device, load0, f"median of {args.repeats} interleaved calls each, torch threads {torch.get_num_threads()}"),
        f"Command: `python benchmarks/augment.py --device {args.device} --threads {args.threads}`",
        "",
        "| policy | px | batch | before: torchvision per image (ms) | same kernels per image (ms) | batched (ms) | speed-up vs before | vs same kernels | masked, eager (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {p} | {s} | {b} | {l:.1f} | {sl:.1f} | {bt:.1f} | {r:.1f}x | {r2:.1f}x | {mm:.1f} |" for p, s, b, l, sl, bt, r, r2, mm in rows],
        "",
        "Before: the code this replaced, torchvision v2 `RandAugment(2, 9, 11 bins)` (nearest, always both ops: not "
        "timm's semantics) / `TrivialAugmentWide(bilinear)` called once per image. Same kernels per image: "
        "`BatchedAutoAugment` called with one image at a time (the recipe's semantics, incl. timm's bicubic warps). "
        "Batched: `zoo.augment.BatchedAutoAugment` on the whole batch, grouped by op (the CPU's path). Masked: "
        "`impl='masked'`, the pointwise ops on every image, each keeping its own op's result, warps, Equalize, "
        "Contrast and AutoContrast on their slots' members (the GPU's path, where it is compiled; here eager, "
        "to show the extra arithmetic it trades for fixed shapes).",
    ]
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
