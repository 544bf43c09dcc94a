"""Soak: repeated fit-and-resume cycles in ONE process, with the FFCV loader and the torchvision
backend in turn, for a given number of minutes; RSS and open file descriptors after every cycle.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/soak.py --minutes 30

A leak (loaders, numba threads, W&B or logger handles, memory-mapped .beton files that are never
closed) shows as a rising column. Prints one table: the first and last cycle of each backend and
the change. Not part of `make test` (it runs for minutes by design).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def live_objects() -> dict[str, int]:
    """Objects that should not outlive a fit: a rising count names what holds the memory."""
    import gc
    import threading

    gc.collect()
    names = ("Trainer", "ImageClassifier", "ImageNetDataModule", "ClosingLoader", "Loader", "DataLoader")
    counts = dict.fromkeys(names, 0)
    for o in gc.get_objects():
        n = type(o).__name__
        if n in counts:
            counts[n] += 1
    counts["threads"] = threading.active_count()
    return counts


def cycle(backend: str, data: Path, runs: Path, i: int) -> None:
    """fit one epoch, then resume from its last.ckpt for a second epoch (same run id)."""
    from launch.cli import main

    os.environ["ZOO_RUN_ID"] = f"{backend}-{i}"
    base = [
        "--config", str(REPO / "launch/recipes/demo.yaml"), "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false", "--data.root", str(data), "--data.backend", backend,
        "--data.batch_size", "8", "--data.num_workers", "0" if backend == "torchvision" else "1",
        "--data.train_res", "32", "--data.val_res", "32", "--run.root", str(runs), "--run.name", "soak",
        "--run.logger", "csv",
    ]
    assert main(["fit", *base, "--trainer.max_epochs", "1"]) == 0
    last = runs / "soak" / f"{backend}-{i}" / "checkpoints" / "last.ckpt"
    assert main(["fit", *base, "--trainer.max_epochs", "2", "--ckpt_path", str(last)]) == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--backends", default="ffcv,torchvision")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_image_folder

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="zoo-soak-"))
    os.environ.setdefault("ZOO_DATA_DIR", str(tmp / "cache"))
    data = make_image_folder(tmp / "data", classes=("a", "b", "c", "d"), per_class=(16, 4), size_range=(40, 64))
    backends = args.backends.split(",")
    samples: dict[str, list[tuple[int, float, float, int]]] = {b: [] for b in backends}
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < args.minutes * 60:
        b = backends[i % len(backends)]
        cycle(b, data, tmp / "runs", i)
        samples[b].append((i, time.monotonic() - start, rss_mib(), open_fds()))
        live = " ".join(f"{k}={v}" for k, v in live_objects().items())
        print(f"cycle {i:3d} {b:12s} t={samples[b][-1][1]:7.0f}s rss={samples[b][-1][2]:8.1f} MiB fds={samples[b][-1][3]} {live}", flush=True)
        i += 1
    print(f"\nsoak: {args.minutes:g} min, {i} fit+resume cycles in one process, load {os.getloadavg()[0]:.1f}")
    print("| backend | cycles | RSS first (MiB) | RSS last (MiB) | change | fds first | fds last |")
    print("|---|---|---|---|---|---|---|")
    for b, s in samples.items():
        if s:
            print(f"| {b} | {len(s)} | {s[0][2]:.0f} | {s[-1][2]:.0f} | {s[-1][2] - s[0][2]:+.0f} | {s[0][3]} | {s[-1][3]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
