"""Where a loader's milliseconds per image go on all-JPEG storage: the stages of the zoo's FFCV
decode (whole-image decode, crop-only decode, DCT-scaled crop decode, the entropy-decoding
floor, the resize, the batch copy) against torchvision's PIL path, same images, same crops.

    python benchmarks/loader_profile.py [--images 600] [--res 160] [--rounds 3]

One thread, CPU time per stage (``time.thread_time``: what the stage costs a core, so that other
work on a shared machine changes it little), median over ``--rounds`` interleaved rounds. The
images are loader.py's (~500x375 q90 JPEGs cut from scikit-image's photos), the crops
RandomResizedCrop(res, scale (0.08, 1), ratio (3/4, 4/3)) drawn once from a seeded generator.

The entropy floor decodes, per crop, one pixel of the crop's last row: libjpeg must still
Huffman-decode every row above it (``jpeg_skip_scanlines`` skips only IDCT and colour
conversion), which no decoder of a baseline JPEG can avoid. Its sum with the resize bounds
what any crop decode on the same storage can reach. Writes results/loader_profile.md.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks._common import machine_line, write_result  # noqa: E402


def crops(shapes: list[tuple[int, int]], scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed: int = 0):
    """torchvision's RandomResizedCrop.get_params, per image (10 tries, then the center crop)."""
    import math

    rng = np.random.default_rng(seed)
    out = []
    for h, w in shapes:
        area = h * w
        for _ in range(10):
            t = area * rng.uniform(*scale)
            ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            cw, ch = int(round(math.sqrt(t * ar))), int(round(math.sqrt(t / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                out.append((int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw))
                break
        else:
            s = min(h, w)
            out.append(((h - s) // 2, (w - s) // 2, s, s))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--res", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "loader_profile.md"))
    args = ap.parse_args(argv)

    import torch
    import torchvision.transforms.functional as F
    from PIL import Image

    from benchmarks.loader import build_folder
    from datamodules import jpeg_region
    from datamodules.folder import cache_root

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    load0 = os.getloadavg()[0]
    root = build_folder(cache_root() / "bench-skimage-v1", 2000)
    files = sorted((root / "train").rglob("*.JPEG"))[: args.images]
    blobs = [np.frombuffer(f.read_bytes(), np.uint8) for f in files]
    shapes = [Image.open(io.BytesIO(b.tobytes())).size[::-1] for b in blobs]  # (h, w)
    boxes = crops(shapes)
    addr = jpeg_region.address()
    if addr is None:
        print("error: crop-only decoding is unavailable (datamodules/jpeg_region.py)", file=sys.stderr)
        return 2
    region = jpeg_region._PROTO(addr)
    res = args.res
    buf = np.empty(600 * 600 * 3, np.uint8)
    x0 = ctypes.c_int64(0)
    batch = np.empty((args.batch_size, res, res, 3), np.uint8)

    def dec(b, r0, r1, c0, c1, k=1):
        w = region(b.ctypes.data, b.size, buf.ctypes.data, buf.size, r0, r1, c0, c1, k, ctypes.byref(x0))
        assert w > 0
        return w

    def dct_k(h, w):
        k = 1
        while k < 8 and h >= 2 * k * res and w >= 2 * k * res:
            k *= 2
        return k

    def stage_full():
        for b, (h, w) in zip(blobs, shapes):
            dec(b, 0, h, 0, w)

    def stage_region():
        for b, (i, j, h, w) in zip(blobs, boxes):
            dec(b, i, i + h, j, j + w)

    def stage_region_dct():
        for b, (H, W), (i, j, h, w) in zip(blobs, shapes, boxes):
            k = dct_k(h, w)
            sh, sw = -(-H // k), -(-W // k)
            i0, j0 = min(round(i / k), sh - 1), min(round(j / k), sw - 1)
            dec(b, i0, max(min(round((i + h) / k), sh), i0 + 1), j0, max(min(round((j + w) / k), sw), j0 + 1), k)

    def stage_floor():
        for b, (i, j, h, w) in zip(blobs, boxes):
            dec(b, i + h - 1, i + h, j, j + 1)

    # the resize input: each crop decoded once beforehand (not timed), as the loop hands it over
    regions = []
    for b, (i, j, h, w) in zip(blobs, boxes):
        cw = dec(b, i, i + h, j, j + w)
        a = buf[: h * cw * 3].reshape(h, cw, 3)
        regions.append(np.ascontiguousarray(a[:, j - x0.value: j - x0.value + w]))

    def stage_resize():
        for a in regions:
            cv2.resize(a, (res, res), interpolation=cv2.INTER_AREA)

    def stage_resize_dct():
        for a in regions:  # what a 1/k decode leaves to the resize: a crop k x smaller per side
            k = dct_k(*a.shape[:2])
            if k > 1:
                a = a[::k, ::k]
            cv2.resize(a, (res, res), interpolation=cv2.INTER_AREA)

    def stage_linear_dct():
        for a in regions:  # the same, bilinear (no antialiasing beyond the 1/k decode): not the pipeline's kernel
            k = dct_k(*a.shape[:2])
            if k > 1:
                a = a[::k, ::k]
            cv2.resize(a, (res, res), interpolation=cv2.INTER_LINEAR)

    small = [cv2.resize(a, (res, res), interpolation=cv2.INTER_AREA) for a in regions]

    def stage_copy():
        for n, a in enumerate(small):
            batch[n % len(batch)] = a

    # torchvision's path (ImageFolder + RandomResizedCrop + PILToTensor + default_collate)
    def stage_pil_decode():
        for b in blobs:
            Image.open(io.BytesIO(b.tobytes())).convert("RGB")

    pil = [Image.open(io.BytesIO(b.tobytes())).convert("RGB") for b in blobs]

    def stage_pil_crop_resize():
        for im, (i, j, h, w) in zip(pil, boxes):
            F.resized_crop(im, i, j, h, w, [res, res], antialias=True)

    pil_small = [F.resized_crop(im, i, j, h, w, [res, res], antialias=True) for im, (i, j, h, w) in zip(pil, boxes)]

    def stage_pil_tensor_collate():
        ts = [F.pil_to_tensor(im) for im in pil_small]
        for s in range(0, len(ts), args.batch_size):
            torch.stack(ts[s: s + args.batch_size])

    stages = {
        "zoo: whole-image decode": stage_full,
        "zoo: crop-only decode": stage_region,
        "zoo: crop-only DCT-scaled decode": stage_region_dct,
        "entropy floor (Huffman decode up to the crop's last row)": stage_floor,
        "zoo: resize crop -> 160 (cv2 INTER_AREA)": stage_resize,
        "zoo: resize after a DCT-scaled decode": stage_resize_dct,
        "alternative: bilinear resize after a DCT-scaled decode": stage_linear_dct,
        "zoo: write into the batch": stage_copy,
        "torchvision: PIL decode": stage_pil_decode,
        "torchvision: PIL crop + resize (antialias)": stage_pil_crop_resize,
        "torchvision: to tensor + collate": stage_pil_tensor_collate,
    }
    times = {k: [] for k in stages}
    for _ in range(args.rounds):
        for name, fn in stages.items():
            t = time.thread_time()
            fn()
            times[name].append((time.thread_time() - t) * 1e3 / len(blobs))
    ms = {k: statistics.median(v) for k, v in times.items()}
    tv = ms["torchvision: PIL decode"] + ms["torchvision: PIL crop + resize (antialias)"] + \
        ms["torchvision: to tensor + collate"]
    totals = {
        "zoo, crop-only decode": ms["zoo: crop-only decode"] + ms["zoo: resize crop -> 160 (cv2 INTER_AREA)"]
        + ms["zoo: write into the batch"],
        "zoo, whole-image decode": ms["zoo: whole-image decode"] + ms["zoo: resize crop -> 160 (cv2 INTER_AREA)"]
        + ms["zoo: write into the batch"],
        "zoo, crop-only DCT-scaled decode": ms["zoo: crop-only DCT-scaled decode"]
        + ms["zoo: resize after a DCT-scaled decode"] + ms["zoo: write into the batch"],
        "alternative: crop-only DCT-scaled decode + bilinear resize": ms["zoo: crop-only DCT-scaled decode"]
        + ms["alternative: bilinear resize after a DCT-scaled decode"] + ms["zoo: write into the batch"],
        "bound: entropy floor + resize (no IDCT, no colour conversion)": ms[
            "entropy floor (Huffman decode up to the crop's last row)"] + ms["zoo: resize after a DCT-scaled decode"],
        "torchvision (PIL)": tv,
    }
    lines = [
        f"# Loader stages per image on all-JPEG storage ({len(blobs)} JPEGs ~500x375 q90, RandomResizedCrop {res})",
        "",
        machine_line("cpu", load0, f"one thread, CPU time (thread_time), median of {args.rounds} interleaved rounds"),
        f"Command: `python benchmarks/loader_profile.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| stage | ms per image (one core) |",
        "|---|---:|",
        *[f"| {k} | {v:.3f} |" for k, v in ms.items()],
        "",
        "| pipeline (sum of its stages) | ms per image | x torchvision |",
        "|---|---:|---:|",
        *[f"| {k} | {v:.3f} | {tv / v:.2f} |" for k, v in totals.items()],
    ]
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
