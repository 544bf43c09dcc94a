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


def _args(root: Path, runs: Path, backend: str, accumulate: int = 1, devices: int = 1) -> list[str]:
    ddp = ["--trainer.strategy", "ddp"] if devices > 1 else []
    return [
        "fit", "--config", str(REPO / "launch/recipes/demo.yaml"), "--trainer.accelerator", "cpu", *ddp,
        "--trainer.devices", str(devices), "--trainer.deterministic", "true", "--trainer.max_epochs", "3",
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
    # (point, step, accumulate): kill in epoch 1 (4 batches of 4 of 18 images per epoch, drop_last)
    ("mid_epoch", 6, 1),
    ("validation", 6, 1),
    ("checkpoint_save", 6, 1),
    ("accumulating", 7, 2),  # micro-batch 7: the 4th optimizer step's gradients half accumulated
    ("mid_epoch_checkpoint", 6, 1),  # resumed from a checkpoint saved after step 6 (batch 2 of epoch 1)
]
BETON_POINTS = [("beton_write", 0), ("beton_write", 1)]  # ffcv only: see tests/kill_at.py


def _killer(point: str, step: int) -> list[str]:
    return ["--trainer.callbacks+=tests.kill_at.KillAt", "--trainer.callbacks.point", point,
            "--trainer.callbacks.step", str(step)]


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
        r = _zoo([*_args(root, runs, backend, acc), *_killer(point, step)], rid)
        assert r.returncode == -9, (point, r.returncode, r.stderr[-3000:])
        ckpts = runs / "r" / rid / "checkpoints"
        last = ckpts / "last.ckpt"
        torch.load(last, weights_only=True)  # never a broken file, also when killed inside a save
        assert not [p for p in ckpts.iterdir() if p.name.endswith(".tmp")] or point == "checkpoint_save"
        resume_from = ckpts / "mid.ckpt" if point == "mid_epoch_checkpoint" else last
        r = _zoo([*_args(root, runs, backend, acc), "--ckpt_path", str(resume_from)], rid)
        assert r.returncode == 0, r.stderr[-3000:]
        diff = _max_diff(_weights(last), reference[acc])
        table.append((point, diff))
    if backend == "ffcv":
        from datamodules import ffcv_io

        for point, step in BETON_POINTS:
            betons = tmp_path / f"betons{step}"  # a cache of its own: the .beton is written in this run
            rid = f"{point}{step}"
            r = _zoo([*_args(root, runs, backend), "--data.beton_dir", str(betons), *_killer(point, step)], rid)
            assert r.returncode == -9, (point, step, r.returncode, r.stderr[-3000:])
            left = sorted(p.name for p in betons.iterdir())
            if step == 0:  # only the half-written temporary file
                assert not [n for n in left if n.endswith(".beton")] and [n for n in left if n.endswith(".tmp")], left
            else:  # a half-sized .beton in place, without its sidecar
                beton = next(p for p in betons.iterdir() if p.name.endswith(".beton"))
                assert ffcv_io.read_sidecar(beton) is None, left
            r = _zoo([*_args(root, runs, backend), "--data.beton_dir", str(betons)], rid + "b")
            assert r.returncode == 0, r.stderr[-3000:]
            for beton in betons.glob("*.beton"):
                assert ffcv_io.check_beton(beton, ffcv_io.read_sidecar(beton)["params"]) is not None
            diff = _max_diff(_weights(runs / "r" / (rid + "b") / "checkpoints" / "last.ckpt"), reference[1])
            table.append((f"{point} {step}", diff))
    print("\n".join(f"{backend} {p}: max |w - w_ref| = {d:.3g}" for p, d in table))
    assert all(d == 0.0 for _, d in table), table


@pytest.mark.slow
@pytest.mark.ddp
def test_killed_2_process_ddp_resumed_exactly(tmp_path):
    """2 processes (gloo, CPU, Lightning's subprocess launcher), ffcv: both ranks SIGKILLed after
    step 6 (inside epoch 1), resumed from the epoch-end last.ckpt and from a checkpoint saved at
    that step; the weights equal an uninterrupted 2-process run's. Each rank reads its share of
    ffcv's DistributedSampler order (seed, epoch) with crops drawn from (seed, epoch, index)."""
    pytest.importorskip("ffcv")
    from tests.conftest import make_image_folder

    root = make_image_folder(tmp_path / "data", per_class=(6, 2), size_range=(20, 28))
    runs = tmp_path / "runs"
    args = _args(root, runs, "ffcv", devices=2)  # global batch 4: 2 per rank, 4 steps per epoch
    r = _zoo(args, "ref")
    assert r.returncode == 0, r.stderr[-3000:]
    reference = _weights(runs / "r" / "ref" / "checkpoints" / "last.ckpt")
    table = []
    for point in ("mid_epoch", "mid_epoch_checkpoint"):
        r = _zoo([*args, *_killer(point, 6)], point)
        assert r.returncode == -9, (point, r.returncode, r.stderr[-3000:])
        ckpts = runs / "r" / point / "checkpoints"
        resume_from = ckpts / ("mid.ckpt" if point == "mid_epoch_checkpoint" else "last.ckpt")
        r = _zoo([*args, "--ckpt_path", str(resume_from)], point)
        assert r.returncode == 0, r.stderr[-3000:]
        table.append((point, _max_diff(_weights(ckpts / "last.ckpt"), reference)))
    print("\n".join(f"ffcv 2-process DDP {p}: max |w - w_ref| = {d:.3g}" for p, d in table))
    assert all(d == 0.0 for _, d in table), table
