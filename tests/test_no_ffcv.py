"""The torchvision fallback on a machine without ffcv and OpenCV (no `[ffcv]` extra installed).

A ``sitecustomize`` on PYTHONPATH sets ``sys.modules['ffcv'] = sys.modules['cv2'] = None``: then
``import ffcv`` raises ModuleNotFoundError and ``importlib.util.find_spec('ffcv')`` returns
None, exactly as when the packages are not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, ZOO, run

BLOCKER = "import sys\nfor _m in ('ffcv', 'cv2'):\n    sys.modules[_m] = None  # as if not installed\n"


def _env(tmp_path: Path) -> dict:
    block = tmp_path / "block"
    block.mkdir(exist_ok=True)
    (block / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": os.pathsep.join([str(block), str(REPO)]), "ZOO_DATA_DIR": str(tmp_path / "zoo-data")}


def _run(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return run(args, cwd=tmp_path, timeout=timeout, env=_env(tmp_path))


def test_blocker_hides_ffcv_and_cv2(tmp_path):
    r = _run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('ffcv'), u.find_spec('cv2'))"], tmp_path)
    assert r.stdout.split() == ["None", "None"], r.stderr


def test_synthetic_dataset_without_opencv(tmp_path):
    code = (
        "from datamodules import synthetic; import json, sys; from PIL import Image\n"
        "root = synthetic.make_synthetic_imagenet(sys.argv[1], num_classes=3, train_per_class=2, val_per_class=1,"
        " size_range=(64, 80), num_workers=0)\n"
        "files = sorted(root.rglob('*.JPEG')); [Image.open(f).convert('RGB') for f in files]\n"
        "print(json.dumps([len(files), synthetic.manifest(root)['renderer'], 'cv2' in sys.modules and sys.modules['cv2'] is not None]))"
    )
    r = _run([sys.executable, "-c", code, str(tmp_path / "synth")], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == '[9, "pil", false]'


@pytest.mark.slow
def test_zoo_fit_torchvision_without_ffcv_and_ffcv_says_how_to_install(tiny_imagenet, tmp_path):
    common = ["--data.root", str(tiny_imagenet), "--data.batch_size", "4", "--data.num_workers", "0",
              "--data.train_res", "32", "--data.val_res", "32", "--run.root", str(tmp_path / "runs"), "--run.logger", "none"]
    r = _run([ZOO, "fit", "--data.backend", "torchvision", "--trainer.fast_dev_run", "1", *common], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "run directory:" in r.stdout
    r = _run([ZOO, "fit", "--data.backend", "ffcv", "--trainer.fast_dev_run", "1", *common], tmp_path)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data.backend='ffcv' needs 'ffcv'") and "pip install 'lightning-zoo[ffcv]'" in last
