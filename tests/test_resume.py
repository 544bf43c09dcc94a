"""Killed anywhere, resumed exactly: SIGKILL at several points, resume from the newest
checkpoint, compare the final weights with an uninterrupted run (same seed, CPU, deterministic).

Checkpoints are written at every epoch end (last.ckpt); a run killed inside epoch e resumes
from the end of epoch e-1 and trains epoch e again from its first batch, which is exact when
the epoch's sample order and augmentation depend only on (seed, epoch): see README "Killed
anywhere, resumed exactly" for what Lightning and FFCV allow mid-epoch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ZOO = str(Path(sys.executable).with_name("zoo"))


def _args(root: Path, runs: Path, backend: str, accumulate: int = 1) -> list[str]:
    return [
        "fit", "--config", str(REPO / "launch/recipes/demo.yaml"), "--trainer.accelerator", "cpu",
        "--trainer.devices", "1", "--trainer.deterministic", "true", "--trainer.max_epochs", "3",
        "--trainer.accumulate_grad_batches", str(accumulate), "--trainer.enable_progress_bar", "false",
        "--data.root", str(root), "--data.backend", backend, "--data.batch_size", "4",
        "--data.num_workers", "0" if backend == "torchvision" else "1", "--data.train_res", "16", "--data.val_res", "16",
        "--run.root", str(runs), "--run.name", "r", "--run.logger", "csv",
    ]


def _zoo(args: list[str], run_id: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ZOO_RUN_ID": run_id, "WANDB_SILENT": "true"}
    return subprocess.run([ZOO, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a)


KILL_POINTS = [
    # (point, step, accumulate): kill in epoch 1 (5 batches of 4 of 18 images per epoch, drop_last)
    ("mid_epoch", 6, 1),
    ("validation", 6, 1),
    ("checkpoint_save", 6, 1),
    ("accumulating", 7, 2),  # micro-batch 7: the 4th optimizer step's gradients half accumulated
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchvision", "ffcv"])
def test_killed_anywhere_resumed_exactly(backend, tmp_path):
    if backend == "ffcv":
        pytest.importorskip("ffcv")
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "data", per_class=(6, 2), size_range=(20, 28))
    runs = tmp_path / "runs"
    reference: dict[int, dict] = {}
    table = []
    for point, step, acc in KILL_POINTS:
        if acc not in reference:
            r = _zoo(_args(root, runs, backend, acc), f"ref{acc}")
            assert r.returncode == 0, r.stderr[-3000:]
            reference[acc] = _weights(runs / "r" / f"ref{acc}" / "checkpoints" / "last.ckpt")
        rid = f"{point}"
        killer = ["--trainer.callbacks+=tests.kill_at.KillAt", "--trainer.callbacks.point", point,
                  "--trainer.callbacks.step", str(step)]
        r = _zoo([*_args(root, runs, backend, acc), *killer], rid)
        assert r.returncode == -9, (point, r.returncode, r.stderr[-3000:])
        last = runs / "r" / rid / "checkpoints" / "last.ckpt"
        torch.load(last, weights_only=True)  # never a broken file, also when killed inside a save
        assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")] or point == "checkpoint_save"
        r = _zoo([*_args(root, runs, backend, acc), "--ckpt_path", str(last)], rid)
        assert r.returncode == 0, r.stderr[-3000:]
        diff = _max_diff(_weights(last), reference[acc])
        table.append((point, diff))
    print("\n".join(f"{backend} {p}: max |w - w_ref| = {d:.3g}" for p, d in table))
    assert all(d == 0.0 for _, d in table), table
