"""The embedded default dataset: ImageNet-format JPEG folders generated from a seed (no download).

A class is a (colour, shape) pair: 2 colours x 5 shapes = 10 classes. Each image is one large
shape (its bounding box 55-85% of the short side, near the centre, random rotation and scale)
over a random low-saturation textured background with a few small distractor dots of any hue.
The shape survives RandomResizedCrop(scale >= 0.35) and flips (every such crop contains the
central part of the image), colour alone gives only 2 of 10 classes, shape alone 5.

``make_synthetic_imagenet(default_root())`` writes ~3,500 JPEGs, once per seed (seconds on a
CPU; docs/benchmarks.md, "Demo").

Drawn with OpenCV (anti-aliased, installed with the ``[ffcv]`` extra) when it can be imported,
else with PIL (same shapes, sizes and colours from the same random draws; edges not
anti-aliased), so that the torchvision fallback works on a machine without OpenCV. The
manifest records which one drew a dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .folder import DataError, atomic_write_json, cache_root, read_json, umask_mode

NAME = "synthetic-v1"  # bump the version when the drawing code changes what a seed produces
MANIFEST = "synthetic.json"
COLOURS = {"red": 0.0, "blue": 220.0}  # hue in degrees; 220 deg is far from red on both sides
SHAPES = ("circle", "cross", "ring", "square", "triangle")
CLASSES = sorted(f"{c}_{s}" for c in COLOURS for s in SHAPES)  # sorted = ImageFolder label order
NUM_CLASSES = len(CLASSES)  # 10
JPEG_QUALITY = 90  # the quality ffcv-imagenet re-encodes ImageNet JPEGs at (write_imagenet.sh ... 90)
SIZE_RANGE = (300, 500)  # image width in px; typical ImageNet photos are 500x375 or 500x333
ASPECT_RANGE = (3 / 4, 4 / 3)  # width/height, the aspect range of most ImageNet photos


def default_root() -> Path:
    """``$ZOO_DATA_DIR/synthetic-v1`` (or ``~/.cache/lightning-zoo/synthetic-v1``)."""
    return cache_root() / NAME


def renderer() -> str:
    """``cv2`` when OpenCV can be imported, else ``pil``."""
    import importlib.util

    return "cv2" if importlib.util.find_spec("cv2") is not None else "pil"


def _hsv_to_bgr(h_deg: float, s: float, v: float) -> np.ndarray:
    """One colour as a uint8 BGR triple (cv2 HSV: H in [0, 180), S and V in [0, 255])."""
    import cv2

    hsv = np.array([[[(h_deg % 360) / 2, s * 255, v * 255]]], dtype=np.float32).clip(0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random low-saturation colour field with blotches, lines and pixel noise (BGR uint8)."""
    import cv2

    gh, gw = rng.integers(2, 6, size=2)
    hsv = np.stack(
        [
            rng.uniform(0, 180, (gh, gw)),  # any hue ...
            rng.uniform(0, 0.25 * 255, (gh, gw)),  # ... but desaturated, so shapes stand out
            rng.uniform(0.25 * 255, 0.95 * 255, (gh, gw)),
        ],
        axis=-1,
    ).astype(np.uint8)
    img = cv2.resize(cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR), (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(rng.integers(2, 6)):  # thin grey-ish lines: edges that are not the object
        p1 = tuple(int(v) for v in rng.integers(0, (w, h)))
        p2 = tuple(int(v) for v in rng.integers(0, (w, h)))
        cv2.line(img, p1, p2, tuple(int(v) for v in _hsv_to_bgr(rng.uniform(0, 360), 0.2, rng.uniform(0.2, 0.9))),
                 int(rng.integers(1, 4)), cv2.LINE_AA)
    return img


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    if shape == "square":
        pts = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        pts = [(x * 0.8, y * 0.8) for x, y in pts]  # bounding circle radius r -> side 1.6 r
    elif shape == "triangle":
        pts = [(np.cos(a), np.sin(a)) for a in np.deg2rad([90, 210, 330])]
    else:  # cross (plus sign), arm half-width 0.3 r
        t = 0.3
        pts = [(t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t), (-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t)]
    c, s = np.cos(angle), np.sin(angle)
    return np.array([(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts], dtype=np.float32)


def draw_image(class_index: int, rng: np.random.Generator, size_range: tuple[int, int] = SIZE_RANGE) -> np.ndarray:
    """One synthetic image of class ``CLASSES[class_index]`` as an RGB uint8 array."""
    if renderer() == "pil":
        return _draw_image_pil(class_index, rng, size_range)
    import cv2

    colour, shape = CLASSES[class_index].split("_")
    w = int(rng.integers(size_range[0], size_range[1] + 1))
    h = int(round(w / np.exp(rng.uniform(*np.log(ASPECT_RANGE)))))
    img = _background(rng, h, w)
    short = min(h, w)
    for _ in range(rng.integers(0, 4)):  # small distractor dots of any hue, 3-6% of the short side
        centre = tuple(int(v) for v in rng.integers(0, (w, h)))
        cv2.circle(img, centre, int(rng.uniform(0.03, 0.06) * short),
                   tuple(int(v) for v in _hsv_to_bgr(rng.uniform(0, 360), rng.uniform(0.5, 1), rng.uniform(0.5, 1))),
                   -1, cv2.LINE_AA)
    r = rng.uniform(0.55, 0.85) * short / 2  # bounding-box side 55-85% of the short side
    cx = w / 2 + rng.uniform(-0.1, 0.1) * w
    cy = h / 2 + rng.uniform(-0.1, 0.1) * h
    fill = tuple(int(v) for v in _hsv_to_bgr(COLOURS[colour] + rng.uniform(-15, 15), rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0)))
    sh = 4  # cv2 sub-pixel bits: anti-aliased edges at fractional coordinates
    if shape in ("circle", "ring"):
        centre, rad = (int(cx * 2**sh), int(cy * 2**sh)), int(r * 2**sh)
        if shape == "circle":
            cv2.circle(img, centre, rad, fill, -1, cv2.LINE_AA, sh)
        else:  # ring: line width 35-50% of the radius, so the hole stays visible at 64 px
            width = rng.uniform(0.35, 0.5) * r
            cv2.circle(img, centre, int((r - width / 2) * 2**sh), fill, max(1, int(width)), cv2.LINE_AA, sh)
    else:
        poly = _polygon(shape, cx, cy, r, rng.uniform(0, 2 * np.pi))
        cv2.fillPoly(img, [np.round(poly * 2**sh).astype(np.int32)], fill, cv2.LINE_AA, sh)
    noise = rng.integers(-12, 13, size=img.shape, dtype=np.int16)  # +-12 grey levels of sensor-like noise
    img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _draw_image_pil(class_index: int, rng: np.random.Generator, size_range: tuple[int, int]) -> np.ndarray:
    """:func:`draw_image` with PIL: the same random draws in the same order, so the same geometry."""
    import colorsys

    from PIL import Image, ImageDraw

    def rgb(h_deg: float, s: float, v: float) -> tuple[int, int, int]:
        r, g, b = colorsys.hsv_to_rgb((h_deg % 360) / 360, min(max(s, 0), 1), min(max(v, 0), 1))
        return int(r * 255), int(g * 255), int(b * 255)

    colour, shape = CLASSES[class_index].split("_")
    w = int(rng.integers(size_range[0], size_range[1] + 1))
    h = int(round(w / np.exp(rng.uniform(*np.log(ASPECT_RANGE)))))
    gh, gw = rng.integers(2, 6, size=2)
    hsv = np.stack([rng.uniform(0, 180, (gh, gw)) * 255 / 180, rng.uniform(0, 0.25 * 255, (gh, gw)),
                    rng.uniform(0.25 * 255, 0.95 * 255, (gh, gw))], axis=-1).astype(np.uint8)
    img = Image.fromarray(hsv, "HSV").convert("RGB").resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(2, 6)):
        p1 = tuple(int(v) for v in rng.integers(0, (w, h)))
        p2 = tuple(int(v) for v in rng.integers(0, (w, h)))
        fill = rgb(rng.uniform(0, 360), 0.2, rng.uniform(0.2, 0.9))
        draw.line([p1, p2], fill=fill, width=int(rng.integers(1, 4)))
    short = min(h, w)
    for _ in range(rng.integers(0, 4)):
        cx0, cy0 = (int(v) for v in rng.integers(0, (w, h)))
        rad = int(rng.uniform(0.03, 0.06) * short)
        draw.ellipse([cx0 - rad, cy0 - rad, cx0 + rad, cy0 + rad],
                     fill=rgb(rng.uniform(0, 360), rng.uniform(0.5, 1), rng.uniform(0.5, 1)))
    r = rng.uniform(0.55, 0.85) * short / 2
    cx = w / 2 + rng.uniform(-0.1, 0.1) * w
    cy = h / 2 + rng.uniform(-0.1, 0.1) * h
    fill = rgb(COLOURS[colour] + rng.uniform(-15, 15), rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
    if shape in ("circle", "ring"):
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            width = rng.uniform(0.35, 0.5) * r  # PIL strokes inward from the box: outer radius r, as cv2's
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(1, int(width)))
    else:
        poly = _polygon(shape, cx, cy, r, rng.uniform(0, 2 * np.pi))
        draw.polygon([tuple(map(float, p)) for p in poly], fill=fill)
    noise = rng.integers(-12, 13, size=(h, w, 3), dtype=np.int16)
    return np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)


def _encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    if renderer() == "pil":
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()
    import cv2

    ok, buf = cv2.imencode(".JPEG", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok, "cv2.imencode failed"
    return buf.tobytes()


_SPLIT_IDS = {"train": 0, "val": 1}


def _write_one(job: tuple[str, str, int, int, int, tuple[int, int], int]) -> None:
    out_dir, split, class_index, i, seed, size_range, quality = job
    # One generator per image, keyed by (seed, split, class, index): the output does not depend
    # on the number of worker processes or their scheduling.
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], class_index, i])
    rgb = draw_image(class_index, rng, size_range)
    name = CLASSES[class_index]
    Path(out_dir, split, name, f"{name}_{i:05d}.JPEG").write_bytes(_encode_jpeg(rgb, quality))


def make_synthetic_imagenet(
    root: str | os.PathLike | None = None,
    *,
    num_classes: int = NUM_CLASSES,
    train_per_class: int = 300,
    val_per_class: int = 50,
    seed: int = 0,
    size_range: tuple[int, int] = SIZE_RANGE,
    num_workers: int | None = None,
) -> Path:
    """Write the synthetic dataset to ``root`` (default :func:`default_root`) once; return ``root``.

    The folder appears atomically (written under a temporary name, then renamed); a manifest
    records the parameters, so a second call with the same ones returns at once, and one with
    different ones raises DataError.
    """
    root = Path(root).expanduser() if root is not None else default_root()
    if not 1 <= num_classes <= NUM_CLASSES:
        raise DataError(f"num_classes={num_classes} is out of range: the synthetic dataset has 1..{NUM_CLASSES} classes")
    if train_per_class < 1 or val_per_class < 1:
        raise DataError("train_per_class and val_per_class must be >= 1: every class folder needs images")
    params = {
        "name": NAME, "num_classes": num_classes, "train_per_class": train_per_class,
        "val_per_class": val_per_class, "seed": seed, "size_range": list(size_range), "jpeg_quality": JPEG_QUALITY,
    }
    if _existing(root, params):
        return root

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        jobs = []
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            for c in range(num_classes):
                (tmp / split / CLASSES[c]).mkdir(parents=True)
                jobs += [(str(tmp), split, c, i, seed, tuple(size_range), JPEG_QUALITY) for i in range(n)]
        t0 = time.perf_counter()
        workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:  # no cv2.setNumThreads in forked children: it can deadlock
                list(pool.map(_write_one, jobs, chunksize=32))
        else:
            for job in jobs:
                _write_one(job)
        manifest = {"params": params, "classes": CLASSES[:num_classes], "num_images": len(jobs), "renderer": renderer(),
                    "seconds": round(time.perf_counter() - t0, 1)}
        atomic_write_json(tmp / MANIFEST, manifest)
        os.chmod(tmp, umask_mode(directory=True))
        try:
            os.rename(tmp, root)  # atomic; fails if another process finished first
        except OSError:
            if not _existing(root, params):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _existing(root: Path, params: dict) -> bool:
    """True if ``root`` holds a finished dataset with ``params``; DataError if it holds another one."""
    if not root.exists():
        return False
    manifest = read_json(root / MANIFEST)
    if manifest is None:
        raise DataError(f"{root} exists but is not a synthetic dataset (no {MANIFEST}): choose another root or remove it")
    if manifest["params"] != params:
        diff = ", ".join(f"{k}={manifest['params'].get(k)!r} (asked {v!r})" for k, v in params.items()
                         if manifest["params"].get(k) != v)
        raise DataError(f"{root} holds a synthetic dataset made with {diff}: choose another root or remove it")
    return True


def manifest(root: str | os.PathLike) -> dict | None:
    """The manifest of a generated dataset, or None."""
    return read_json(Path(root) / MANIFEST)


__all__ = ["CLASSES", "NUM_CLASSES", "default_root", "draw_image", "make_synthetic_imagenet", "manifest"]

if __name__ == "__main__":  # python -m datamodules.synthetic [root]
    import sys

    t = time.perf_counter()
    out = make_synthetic_imagenet(sys.argv[1] if len(sys.argv) > 1 else None)
    print(json.dumps({"root": str(out), "seconds": round(time.perf_counter() - t, 1)}))
