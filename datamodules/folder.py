"""ImageNet-format folders: ``root/{train,val}/<class>/<image>``; scanning, validation, caching paths.

Shared by both backends. Every problem a user can cause raises :class:`DataError` with one line
that names the bad thing and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

SPLITS = ("train", "val")

# The extensions torchvision.datasets.folder.IMG_EXTENSIONS accepts (ImageNet uses .JPEG).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A problem with the user's data or data options, explained in one line."""


def cache_root() -> Path:
    """Where the zoo keeps generated data: ``$ZOO_DATA_DIR`` or ``~/.cache/lightning-zoo``."""
    env = os.environ.get("ZOO_DATA_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lightning-zoo"


def cache_dir_for(root: str | os.PathLike) -> Path:
    """A cache folder private to the dataset at ``root`` (the dataset itself may be read-only)."""
    root = Path(root).expanduser().resolve()
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:8]
    return cache_root() / "cache" / f"{root.name}-{digest}"


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def find_classes(split_dir: Path) -> list[str]:
    """Sorted class-folder names under ``split_dir`` (as torchvision's ImageFolder orders them)."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _fix_hint(root: Path) -> str:
    return (
        f"{root} must hold train/<class>/*.JPEG and val/<class>/*.JPEG (ImageNet folder format); "
        "leave data.root unset to use the embedded synthetic dataset"
    )


def validate_root(root: str | os.PathLike) -> list[str]:
    """Check the folder layout cheaply (no image is opened) and return the class names."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data root {str(root)!r} does not exist: pass the folder that holds train/ and val/")
    if not root.is_dir():
        raise DataError(f"data root {str(root)!r} is not a folder: pass the folder that holds train/ and val/")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DataError(f"data root {str(root)!r} has no {split}/ folder: {_fix_hint(root)}")
    classes = find_classes(root / "train")
    if not classes:
        raise DataError(f"{root / 'train'} has no class folders: {_fix_hint(root)}")
    val_classes = find_classes(root / "val")
    if val_classes != classes:
        missing, extra = sorted(set(classes) - set(val_classes)), sorted(set(val_classes) - set(classes))
        parts = [f"missing in val/: {_few(missing)}" if missing else "", f"only in val/: {_few(extra)}" if extra else ""]
        raise DataError(
            f"val/ classes differ from train/ classes ({'; '.join(p for p in parts if p)}): "
            "both splits need the same class folders (an empty one is not allowed either)"
        )
    return classes


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def scan_split(split_dir: Path, classes: list[str]) -> list[tuple[str, int]]:
    """``(path, label)`` for every image file, sorted, labels by ``classes`` order.

    Raises DataError for an empty class folder (it would silently shift nothing but break
    the class count a model is built with).
    """
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        files = sorted(e.path for e in os.scandir(folder) if e.is_file() and is_image_file(e.name))
        if not files:
            raise DataError(
                f"class folder {folder} has no image files ({', '.join(IMG_EXTENSIONS[:3])}, ...): "
                "add images or remove the folder from both train/ and val/"
            )
        samples.extend((f, label) for f in files)
    return samples


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: grayscale, palette, CMYK, RGBA (alpha dropped) by PIL's
    ``convert``; 16/32-bit integer images (16-bit PNG/TIFF: modes I;16*, I) scaled to 0..255
    by their bit depth first, since ``convert("RGB")`` clips them to 255 (a white image)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Open and fully decode an image as RGB; raise DataError naming the file if it can't."""
    try:
        with Image.open(path) as im:
            return to_rgb(im)  # converting forces a full decode, so truncated files fail here
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}): {_CORRUPT_HINT}") from e


_CORRUPT_HINT = "delete or replace the file, or set data.skip_corrupt=true to skip unreadable images"


def corrupt_error(bad: list[tuple[str, str]]) -> DataError:
    """DataError for a list of ``(path, reason)`` that could not be decoded."""
    path, reason = bad[0]
    more = f" (and {len(bad) - 1} more unreadable files)" if len(bad) > 1 else ""
    return DataError(f"cannot read image {path} ({reason}){more}: {_CORRUPT_HINT}")


def umask_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give (mkstemp/mkdtemp use 0600/0700: too private for a shared cache)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict | None:
    """The JSON object at ``path``, or None if the file is missing."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def check_headers(samples: Iterable[tuple[str, int]], num_threads: int = 8) -> list[tuple[str, str]]:
    """``(path, reason)`` for every file PIL cannot identify as an image (headers only, fast)."""
    from concurrent.futures import ThreadPoolExecutor

    def check(path: str) -> tuple[str, str] | None:
        try:
            with Image.open(path) as im:
                im.size  # noqa: B018 - parsing the header is the check
            return None
        except Exception as e:
            return path, f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(max(1, num_threads)) as pool:  # file opens are I/O bound
        return [r for r in pool.map(check, (p for p, _ in samples)) if r is not None]


class SampleList:
    """``(path, label)`` samples as an indexable ``(PIL RGB image, label)`` dataset.

    What :func:`~datamodules.ffcv_io.write_beton` writes from, whatever the folder layout was;
    ``source`` names the samples' origin in messages and sidecars.
    """

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], source: str):
        self.samples, self.classes, self.source = samples, classes, source

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        return load_rgb(path), label
