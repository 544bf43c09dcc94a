"""Loader throughput: FFCV vs torchvision on the same ImageNet-like JPEGs, same crop and threads.

    python benchmarks/loader.py [--workers 2] [--epochs 5] [--images 2000] [--res 160]

Builds (once, cached under $ZOO_DATA_DIR) ~2,000 JPEGs of 500x375-ish, quality 90, cut from
the photos scikit-image ships (random crops and rescales, one class per photo), writes .beton
files (timed), then for each loader: one warm-up epoch, then the median of ``--epochs`` epochs.
Train pipeline on both: RandomResizedCrop(res) + flip -> uint8 NCHW batches. Writes the table to
benchmarks/results/loader.md.
"""

from __future__ import annotations

import argparse
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


def measure(make_loader, epochs: int) -> dict:
    """Cold first batch (incl. compile / worker start), warm-up epoch, then per-epoch img/s."""
    t0 = time.perf_counter()
    loader = make_loader()
    it = iter(loader)
    n = len(next(it)[0])
    first = time.perf_counter() - t0
    for x, _ in it:  # rest of the warm-up epoch
        n += len(x)
    rates = []
    for _ in range(epochs):
        t = time.perf_counter()
        count = sum(len(x) for x, _ in loader)
        rates.append(count / (time.perf_counter() - t))
    return {"first_batch_s": first, "img_s": statistics.median(rates), "images": count, "rates": rates}


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
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-betons.") as tmp:
        for p_jpeg in (1.0, 0.5):
            path = Path(tmp) / f"train_{p_jpeg}.beton"
            t = time.perf_counter()
            ffcv_io.write_beton(root / "train", path, max_resolution=500, jpeg_quality=QUALITY,
                                compress_probability=p_jpeg, num_workers=args.workers, progress=False, classes=classes)
            write_s = time.perf_counter() - t
            size_mb = path.stat().st_size / 2**20

            def ffcv_loader(path=path):
                return ffcv_io.make_loader(
                    path, {"image": ffcv_io.train_image_pipeline(args.res, scale, ratio), "label": ffcv_io.label_pipeline()},
                    batch_size=args.batch_size, num_workers=args.workers, order="random", drop_last=False,
                )

            r = measure(ffcv_loader, args.epochs)
            label = f"ffcv, {int(p_jpeg * 100)}% JPEG / {int(round((1 - p_jpeg) * 100))}% raw"
            rows.append((label, r, f"write {write_s:.1f} s, {size_mb:.0f} MiB"))
            print(label, {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items() if k != "rates"})

    def tv_loader():
        ds = ImageFolderDataset(samples, TrainTransform(args.res, scale, ratio))
        return make_dataloader(ds, batch_size=args.batch_size, num_workers=args.workers, shuffle=True, drop_last=False)

    r = measure(tv_loader, args.epochs)
    folder_mb = sum(os.path.getsize(s) for s, _ in samples) / 2**20
    rows.append(("torchvision (PIL), JPEG files", r, f"folder {folder_mb:.0f} MiB"))
    print(rows[-1][0], {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items() if k != "rates"})

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cores = min(args.workers, os.cpu_count() or 1)
    cmd = "python benchmarks/loader.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [
        f"# Loader throughput ({len(samples)} train JPEGs, ~500x375 q{QUALITY}, {args.res} px RandomResizedCrop + flip)",
        "",
        f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), no GPU; {args.workers} loader threads/processes; "
        f"batch {args.batch_size}; median of {args.epochs} epochs after 1 warm-up epoch; "
        f"1-min load average {load_before:.1f} before, {load_after:.1f} after (other work on the machine skews results).",
        f"Command: `{cmd.strip()}`",
        "",
        "| loader | img/s | img/s per core | first batch (s, cold) | storage |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for label, r, storage in rows:
        lines.append(f"| {label} | {r['img_s']:.0f} | {r['img_s'] / cores:.0f} | {r['first_batch_s']:.1f} | {storage} |")
    lines += [
        "",
        "First batch: loader construction to first batch of the first epoch (ffcv: numba compile; "
        "torchvision: worker start). ffcv threads also run in the training process and ffcv sets "
        "torch.set_num_threads(workers).",
    ]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    return table


if __name__ == "__main__":
    main()
