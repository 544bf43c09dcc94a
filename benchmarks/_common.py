"""What every benchmark table states: the machine, its load, and where the table was written."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line(device: torch.device | str, load_before: float, extra: str = "") -> str:
    device = torch.device(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cores} CPUs ({cpu_name()}), no GPU used"
    load = f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    return f"Machine: {dev}; torch {torch.__version__}; {load}" + (f"; {extra}" if extra else "") + "."


def write_result(path: str | os.PathLike, lines: list[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")
