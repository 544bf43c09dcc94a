"""Data fixtures: tiny ImageNet-format JPEG folders built in tmp dirs (no test downloads anything)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# tests/exit_guard.py: a stuck exit cannot hang CI; tests/time_limit.py: an unmarked test over
# 10 s fails (ZOO_TEST_TIME_LIMIT=<seconds> changes the limit, 0 turns it off);
# tests/xdist_units.py: how pytest-xdist workers share the tests.
pytest_plugins = ["tests.exit_guard", "tests.time_limit", "tests.xdist_units", "pytester"]  # pytester: tests/test_time_limit.py


def pytest_sessionstart(session: pytest.Session) -> None:
    """Import the heavy libraries once, before the first test (in each xdist worker): ~10 s on 2
    cores for torch, Lightning, timm and ffcv (numba compiles at its import). Otherwise the first
    test of a process to import them pays it, and tests/time_limit.py, which times each test's
    call, fails whichever unmarked test happens to run first on a worker."""
    if session.config.getoption("numprocesses", None):  # the xdist controller: it runs no test
        return
    import lightning.pytorch  # noqa: F401

    import callbacks  # noqa: F401
    import zoo  # noqa: F401
    from datamodules import imagenet  # noqa: F401
    from datamodules.ffcv_io import import_ffcv

    try:
        import_ffcv()
    except ImportError:  # installed without the [ffcv] extra: its tests skip
        pass


def ramp_image(h: int, w: int, label: int) -> np.ndarray:
    """An asymmetric RGB image: R rises left -> right, G top -> bottom, B encodes the label.

    A horizontal flip turns the R ramp around, so the sign of (right - left) in R tells whether
    an output was flipped, whatever the crop.
    """
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    b = np.full((h, w), 40 + 80 * (label % 3))
    return np.stack([x, y, b], -1).round().astype(np.uint8)


def make_image_folder(
    root: Path,
    classes: Sequence[str] = ("ant", "bee", "cat"),
    per_class: tuple[int, int] = (6, 3),
    size_range: tuple[int, int] = (64, 100),
    seed: int = 0,
) -> Path:
    """Write ``root/{train,val}/<class>/<i>.JPEG`` ramp images of random sizes; return ``root``."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for label, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
                Image.fromarray(ramp_image(h, w, label)).save(d / f"{name}_{i}.JPEG", quality=95)
    return root


@pytest.fixture(scope="session", autouse=True)
def _zoo_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point ZOO_DATA_DIR (synthetic data, .beton caches) to a session tmp dir, never ~/.cache."""
    path = tmp_path_factory.mktemp("zoo-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ZOO_DATA_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x (6 train + 3 val) ramp JPEGs of 64-100 px; read-only by convention."""
    return make_image_folder(tmp_path_factory.mktemp("tiny-imagenet"))


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory for a fresh, mutable tiny folder: ``image_folder(**make_image_folder kwargs)``."""
    counter = iter(range(1000))
    return lambda **kw: make_image_folder(tmp_path / f"data{next(counter)}", **kw)
