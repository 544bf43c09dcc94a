"""Crop-only JPEG decoding for the FFCV loader: ``jpeg_region.c``, built on first use.

A RandomResizedCrop reads on average about half of an image, yet a full decode runs the IDCT
and colour conversion over all of it. ``zoo_jpeg_decode_region`` (libjpeg-turbo's
``jpeg_skip_scanlines``/``jpeg_crop_scanline``) decodes only the rows and iMCU columns that
cover the crop, with the same pixels as the full decode, so a crop of half the image costs
about half the IDCT and colour conversion (decode rates with and without it: docs/benchmarks.md,
"Loader throughput").

The library is compiled once per source version with the C compiler and libjpeg headers
that ffcv's own build needed (``cc``, ``pkg-config libjpeg``) into the zoo's cache directory
(``$ZOO_DATA_DIR`` or ``~/.cache/lightning-zoo``), or taken from ``$ZOO_JPEG_REGION_LIB``.
Where neither works the loader decodes whole images as before, after one warning line.
``ZOO_CROP_DECODE=0`` turns it off (benchmarks compare both).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional

SOURCE = Path(__file__).with_name("jpeg_region.c")
SYMBOL = "zoo_jpeg_decode_region"
# int64 (uint8* src, uint64 size, uint8* dst, uint64 dst_size, int64 r0, r1, c0, c1, k, int64* x0)
_PROTO = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint64,
                          *([ctypes.c_int64] * 5), ctypes.c_void_p)
_lib: list = []  # (library, address) once loaded; [None] once it failed
_fallback: list = []  # the callback that stands in for it, alive as long as the process


def enabled() -> bool:
    return os.environ.get("ZOO_CROP_DECODE", "1") != "0"


def _compile(out: Path) -> None:
    flags = ["-ljpeg"]
    try:
        flags = shlex.split(subprocess.run(["pkg-config", "--cflags", "--libs", "libjpeg"], capture_output=True,
                                           text=True, check=True, timeout=30).stdout) or flags
    except (OSError, subprocess.SubprocessError):
        pass  # no pkg-config: the system's default paths
    cc = os.environ.get("CC", "cc")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        res = subprocess.run([cc, "-O2", "-shared", "-fPIC", str(SOURCE), "-o", tmp, *flags], capture_output=True,
                             text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(res.stderr.strip().splitlines() or ['?'])[0][:200]}")
        os.replace(tmp, out)  # atomic: concurrent builders (DDP ranks) each write their own file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library_path() -> Path:
    """Where the built library lives: one file per version of the C source."""
    from datamodules.folder import cache_root

    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    return cache_root() / "build" / f"jpeg_region-{digest}.so"


def address() -> Optional[int]:
    """The C function's address, building the library if needed; None if it cannot be had
    (one warning says why, and the loader decodes whole images)."""
    if not _lib:
        given = os.environ.get("ZOO_JPEG_REGION_LIB")
        try:
            path = Path(given) if given else library_path()
            if given and not path.is_file():
                raise FileNotFoundError(f"ZOO_JPEG_REGION_LIB={given} is not a file")
            if not path.exists():
                _compile(path)
            lib = ctypes.CDLL(str(path))
            _lib.append((lib, ctypes.cast(getattr(lib, SYMBOL), ctypes.c_void_p).value))
        except Exception as e:
            _lib.append(None)
            warnings.warn(f"crop-only JPEG decoding unavailable ({type(e).__name__}: {e}); the FFCV loader decodes "
                          "whole images (it needs a C compiler and libjpeg-turbo's headers, as ffcv's build did)",
                          RuntimeWarning)
    return _lib[0][1] if _lib[0] else None


def fallback_address() -> int:
    """A function of the same signature that answers -1 (decode the whole image): linked in
    place of the library where it is unavailable (the loop then never calls it)."""
    if not _fallback:
        cb = _PROTO(lambda *args: -1)
        _fallback.append((cb, ctypes.cast(cb, ctypes.c_void_p).value))
    return _fallback[0][1]
