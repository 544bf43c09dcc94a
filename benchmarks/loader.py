"""Loader throughput: FFCV vs torchvision on the same ImageNet-like JPEGs, same crop and threads.

    python benchmarks/loader.py [--workers 2] [--epochs 5] [--images 2000] [--res 160]

Builds (once, cached under $ZOO_DATA_DIR) ~2,000 JPEGs of 500x375-ish, quality 90, cut from
the photos scikit-image ships (random crops and rescales, one class per photo), writes .beton
files (timed), then for each loader: one warm-up epoch, then the median of ``--epochs`` epochs,
interleaved (one epoch per loader per round).
Train pipeline on both: RandomResizedCrop(res) + flip -> uint8 NCHW batches. Writes the table to
benchmarks/results/loader.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from datamodules.folder import atomic_write_json, cache_root, find_classes, read_json, scan_split

# skimage.data photos stored inside the package (no download): (name, loader)
PHOTOS = {
    "astronaut": lambda d: d.astronaut(),
    "chelsea": lambda d: d.chelsea(),
    "coffee": lambda d: d.coffee(),
    "hubble": lambda d: d.hubble_deep_field(),
    "ihc": lambda d: d.immunohistochemistry(),
    "motorcycle": lambda d: d.stereo_motorcycle()[0],
    "retina": lambda d: d.retina(),
    "rocket": lambda d: d.rocket(),
}
# ImageNet's common photo shapes (w, h): 500x375 (4:3), 500x333 (3:2) and their portraits
SHAPES = [(500, 375), (500, 333), (375, 500), (333, 500), (500, 400)]
QUALITY = 90  # ImageNet-like JPEG quality; ffcv-imagenet re-encodes at 90
VERSION = "bench-skimage-v1"


def build_folder(root: Path, n_images: int, seed: int = 0) -> Path:
    """Write ``root/{train,val}/<photo>/*.JPEG`` once (manifest-guarded); return ``root``."""
    params = {"version": VERSION, "n_images": n_images, "seed": seed}
    if (read_json(root / "manifest.json") or {}).get("params") == params:
        return root
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = {k: f(skimage.data) for k, f in PHOTOS.items()}
    per_class = max(1, n_images // len(photos))
    tmp = Path(tempfile.mkdtemp(prefix=".bench.", dir=root.parent if root.parent.exists() else None))
    for split, n in (("train", per_class), ("val", max(1, per_class // 20))):
        for name, img in photos.items():
            (tmp / split / name).mkdir(parents=True)
            h0, w0 = img.shape[:2]
            for i in range(n):
                w, h = SHAPES[rng.integers(len(SHAPES))]
                s = rng.uniform(0.5, 1.0)  # crop 50-100% of the photo's side, at the target aspect
                cw = min(w0, int(s * min(w0, h0 * w / h)))
                ch = min(h0, int(cw * h / w))
                y, x = rng.integers(0, h0 - ch + 1), rng.integers(0, w0 - cw + 1)
                crop = cv2.resize(img[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_AREA)
                if rng.random() < 0.5:
                    crop = crop[:, ::-1]
                ok, buf = cv2.imencode(".JPEG", cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
                (tmp / split / name / f"{name}_{i:05d}.JPEG").write_bytes(buf.tobytes())
    atomic_write_json(tmp / "manifest.json", {"params": params})
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, root)
    return root


def gpu_decode_loader(path: Path, args):
    """data.gpu_decode's loader with every JPEG through the device path, on the CPU."""
    from datamodules.gpu_decode import GPUDecodeLoader, Split

    return GPUDecodeLoader(path, batch_size=args.batch_size, res=args.res, train=True, device="cpu",
                           split=Split("on", 1.0), seed=0, num_workers=args.workers, drop_last=False)


def first_batch(make_loader) -> float:
    """Seconds from loader construction to its first batch (ffcv: numba compile or cache load)."""
    t0 = time.perf_counter()
    loader = make_loader()
    it = iter(loader)
    next(it)
    seconds = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    return seconds


def measure_interleaved(makers: dict, epochs: int) -> dict:
    """One warm-up epoch each, then ``epochs`` rounds of one epoch per loader (A, B, C, A, B, C, ...).

    Interleaving spreads the load of other jobs on a shared machine over all loaders alike.
    """
    loaders = {name: make() for name, make in makers.items()}
    for loader in loaders.values():
        for _ in loader:
            pass
    rates: dict = {name: [] for name in loaders}
    for _ in range(epochs):
        for name, loader in loaders.items():
            t = time.perf_counter()
            count = sum(len(x) for x, _ in loader)
            rates[name].append(count / (time.perf_counter() - t))
    return {name: {"img_s": statistics.median(r), "rates": r} for name, r in rates.items()}


def cold_and_warm_first_batch(path: Path, res: int, batch_size: int, workers: int) -> tuple[float, float]:
    """First batch of the zoo's (seeded) train pipeline in a fresh process: with an empty numba
    cache (cold), then again with the cache the first run wrote (warm: nothing changed)."""
    import subprocess

    code = (
        "import time, sys\n"
        "from datamodules import ffcv_io\n"
        "import ffcv.loader, ffcv.fields.rgb_image  # imports are not part of the first batch\n"
        "t = time.perf_counter()\n"
        f"ld = ffcv_io.make_loader({str(path)!r}, {{'image': ffcv_io.train_image_pipeline({res}, (0.08, 1.0), (3 / 4, 4 / 3), seed=0),"
        f" 'label': ffcv_io.label_pipeline()}}, batch_size={batch_size}, num_workers={workers})\n"
        "it = iter(ld); next(it)\n"
        "print(time.perf_counter() - t); it.close()\n"
    )
    with tempfile.TemporaryDirectory(prefix="bench-numba-cache.") as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        out = [float(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                    text=True).stdout.strip().splitlines()[-1]) for _ in range(2)]
    return out[0], out[1]


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2, help="ffcv threads = torchvision worker processes")
    p.add_argument("--epochs", type=int, default=5, help="timed epochs after one warm-up epoch")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--res", type=int, default=160, help="train crop (ffcv-imagenet's starting resolution)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--raw-res", type=int, default=256, help="max side of the all-raw .beton (raw storage at low resolution)")
    p.add_argument("--root", default=None, help="image folder cache (default $ZOO_DATA_DIR/bench-skimage-v1)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "loader.md"))
    args = p.parse_args(argv)

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    from datamodules import ffcv_io
    from datamodules.torchvision_backend import ImageFolderDataset, TrainTransform, make_dataloader

    root = Path(args.root) if args.root else cache_root() / VERSION
    t = time.perf_counter()
    build_folder(root, args.images)
    print(f"image folder {root}: {time.perf_counter() - t:.1f} s")
    classes = find_classes(root / "train")
    samples = scan_split(root / "train", classes)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)  # torchvision / ffcv-imagenet defaults
    storage, makers, first = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-betons.") as tmp:
        # (fraction stored as JPEG, max side): ffcv-imagenet's ResNet-50 files are 50% JPEG at 500 px
        for p_jpeg, max_res in ((1.0, 500), (0.5, 500), (0.0, args.raw_res)):
            path = Path(tmp) / f"train_{p_jpeg}_{max_res}.beton"
            t = time.perf_counter()
            ffcv_io.write_beton(root / "train", path, max_resolution=max_res, jpeg_quality=QUALITY,
                                compress_probability=p_jpeg, num_workers=args.workers, progress=False, classes=classes)
            storage[path] = f"write {time.perf_counter() - t:.1f} s, {path.stat().st_size / 2**20:.0f} MiB"
            kind = f"{int(p_jpeg * 100)}% JPEG" + (f" / {int(round((1 - p_jpeg) * 100))}% raw" if p_jpeg < 1 else "")
            kind += f", max side {max_res}"

            def ffcv_loader(path=path, seed=0, dct=False, crop=None):
                return ffcv_io.make_loader(
                    path, {"image": ffcv_io.train_image_pipeline(args.res, scale, ratio, seed=seed, dct_scaling=dct,
                                                                 crop_decode=crop),
                           "label": ffcv_io.label_pipeline()},
                    batch_size=args.batch_size, num_workers=args.workers, order="random", drop_last=False,
                )

            variants = {"zoo (seeded, flip fused, crop-only decode)": {}}
            if p_jpeg > 0:  # the same, decoding whole JPEGs (before datamodules/jpeg_region.c)
                variants["zoo, whole-image decode"] = {"crop": False}
            if max_res == 500:
                variants["zoo + DCT-scaled decode"] = {"dct": True}
            if p_jpeg == 1.0:
                variants["ffcv's stock ops"] = {"seed": None}
            for vname, kw in variants.items():
                label = f"ffcv, {kind}: {vname}"
                first[label] = first_batch(functools.partial(ffcv_loader, **kw))  # also compiles for the timing below
                makers[label] = functools.partial(ffcv_loader, **kw)
                storage[label] = storage[path]
            if p_jpeg > 0 and max_res == 500:  # data.gpu_decode's path, run here on the CPU (torchvision's decoder)
                label = f"ffcv, {kind}: GPU-decode path on the CPU (`device=\"cpu\"`, every JPEG)"
                makers[label] = functools.partial(gpu_decode_loader, path, args)
                first[label] = first_batch(makers[label])
                storage[label] = storage[path]
            if p_jpeg == 1.0:
                cold_warm = cold_and_warm_first_batch(path, args.res, args.batch_size, args.workers)
                print(f"zoo pipeline first batch in a fresh process: cold numba cache {cold_warm[0]:.1f} s, "
                      f"warm {cold_warm[1]:.1f} s")

        def tv_loader():
            ds = ImageFolderDataset(samples, TrainTransform(args.res, scale, ratio))
            return make_dataloader(ds, batch_size=args.batch_size, num_workers=args.workers, shuffle=True, drop_last=False)

        tv = "torchvision (PIL), JPEG files"
        first[tv] = first_batch(tv_loader)
        makers[tv] = tv_loader
        storage[tv] = f"folder {sum(os.path.getsize(s) for s, _ in samples) / 2**20:.0f} MiB"
        results = measure_interleaved(makers, args.epochs)
    for label, r in results.items():
        print(label, round(r["img_s"]), [round(x) for x in r["rates"]])
    tv_rate = results[tv]["img_s"]

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cores = min(args.workers, os.cpu_count() or 1)
    cmd = "python benchmarks/loader.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [
        f"# Loader throughput ({len(samples)} train JPEGs, ~500x375 q{QUALITY}, {args.res} px RandomResizedCrop + flip)",
        "",
        f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), no GPU; {args.workers} loader threads/processes; "
        f"batch {args.batch_size}; median of {args.epochs} interleaved epochs after 1 warm-up epoch; "
        f"1-min load average {load_before:.1f} before, {load_after:.1f} after (other work on the machine skews results).",
        f"Command: `{cmd.strip()}`",
        "",
        "| loader | img/s | x torchvision | img/s per core | first batch (s) | storage |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, r in results.items():
        lines.append(f"| {label} | {r['img_s']:.0f} | {r['img_s'] / tv_rate:.2f} | {r['img_s'] / cores:.0f} "
                     f"| {first[label]:.1f} | {storage[label]} |")
    lines += [
        "",
        f"Epochs interleaved (one per loader per round). First batch: loader construction to first batch "
        f"in this process (ffcv: numba compile, or numba's on-disk cache when warm; torchvision: worker start). "
        f"The zoo's pipeline in a fresh process: {cold_warm[0]:.1f} s with an empty numba cache, "
        f"{cold_warm[1]:.1f} s with the cache of the previous run (nothing changed). "
        "ffcv threads also run in the training process and ffcv sets torch.set_num_threads(workers).",
        "The GPU-decode path (`data.gpu_decode`, datamodules/gpu_decode.py) is built for a CUDA device (nvJPEG); "
        "its row runs the same code on the CPU, for information. `data.gpu_decode=auto` split chosen here: "
        + ("none, no CUDA device: the CPU path (FFCV Loader)." if not torch.cuda.is_available() else
           "decided while training, from the CPU decode rate against the rate training takes images "
           "(benchmarks/gpu.py --gpu-decode reports it)."),
    ]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    return table


if __name__ == "__main__":
    main()
