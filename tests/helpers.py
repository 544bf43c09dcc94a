"""What many test modules share: the checkout's paths, the tiny-run CLI arguments, one runner for
`zoo` and python subprocesses. Data fixtures (tiny ImageNet folders) are in tests/conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "launch" / "recipes" / "demo.yaml")
ZOO = str(Path(sys.executable).with_name("zoo"))  # the venv's console script

# Small, fast overrides that keep everything else a recipe says.
CPU_TINY = [
    "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
    "--trainer.strategy", "auto", "--trainer.num_nodes", "1",
]


def tiny_data(root: Path, backend: str = "torchvision", res: int = 32, batch: int = 4) -> list[str]:
    """`--data.*` arguments for a tiny folder: small batches and resolution, no worker processes
    for torchvision (FFCV needs one)."""
    return [
        "--data.root", str(root), "--data.backend", backend, "--data.batch_size", str(batch),
        "--data.num_workers", "0" if backend == "torchvision" else "1",
        "--data.train_res", str(res), "--data.val_res", str(res),
    ]


def pythonpath() -> str:
    """PYTHONPATH with this checkout first, for a subprocess that must import its modules."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def run(
    argv: Sequence[str | Path],
    cwd: Path | str = REPO,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a `zoo` or python subprocess on this checkout's code and capture its text output.

    The environment is the test's own plus ``WANDB_SILENT=true``, with the checkout first on
    PYTHONPATH (so a worktree's `zoo` runs the worktree's modules); ``env`` overrides any of it,
    PYTHONPATH included.
    """
    full = {**os.environ, "PYTHONPATH": pythonpath(), "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)


def run_zoo(
    args: Sequence[str | Path],
    cwd: Path | str = REPO,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`zoo ARGS` through the console script (see `run`)."""
    return run([ZOO, *args], cwd=cwd, timeout=timeout, env=env)
