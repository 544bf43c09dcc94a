"""Input standardisation on a small real dataset: ImageNet's mean/std vs the train split's own.

Trains a logistic regression (``logreg``) and an MLP (``mlp``, no normalisation layers) on
scikit-learn's digits as a 32 px ImageFolder (benchmarks/digits_folder.py) with
``--data.normalize imagenet`` and ``--data.normalize dataset``, each as a whole ``zoo fit``
process, and prints the mean/std of the inputs the network sees (the train split's eval crops
after the checkpoint's recorded normalisation) and the val top-1.

    python benchmarks/standardisation.py --root /tmp/digits32 --epochs 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def input_stats(ckpt: str, root: str) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the train split's eval crops as the checkpoint's model normalises them."""
    import zoo
    from datamodules.imagenet import ImageNetDataModule
    from datamodules.torchvision_backend import val_transform
    from datamodules.folder import load_rgb

    model = zoo.load(weights=ckpt)
    dc = model.data_config
    dm = ImageNetDataModule(root=root, backend="torchvision")
    tf = val_transform(int(dc["input_size"]), float(dc["crop_pct"]), str(dc["interpolation"]))
    x = torch.stack([tf(load_rgb(p)) for p, _ in dm.samples("train")])
    with torch.no_grad():
        z = model.preprocess(x)
    return z.mean(dim=(0, 2, 3)).tolist(), z.std(dim=(0, 2, 3)).tolist()


def fit(arch: str, arch_args: str, normalize: str, args, run_root: Path) -> tuple[float, str, float]:
    cmd = [sys.executable, "-m", "launch.cli", "fit", "--data.root", args.root, "--data.backend", "torchvision",
           "--data.train_res", "32", "--data.val_res", "32", "--data.val_crop_ratio", "1.0",
           "--data.scale", "[1.0, 1.0]", "--data.ratio", "[1.0, 1.0]", "--data.flip", "0",
           "--data.normalize", normalize, "--data.num_workers", "1",
           "--model.arch", arch, "--model.arch_args", arch_args, "--model.label_smoothing", "0",
           "--model.warmup_epochs", "0", "--model.lr", str(args.lr), "--seed_everything", str(args.seed),
           "--trainer.max_epochs", str(args.epochs), "--trainer.enable_progress_bar", "false",
           "--run.root", str(run_root), "--run.logger", "csv", "--run.dashboard", "false"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    acc = float(out.stdout.split("val/acc1: ")[1].split()[0])
    ckpt = out.stdout.split("last checkpoint: ")[1].split()[0]
    return acc, ckpt, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="digits as an ImageFolder (benchmarks/digits_folder.py)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.1, help="SGD at batch 64 (the demo recipe's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-root", default="runs/standardisation")
    ap.add_argument("--models", default="logreg,mlp", help="comma-separated: logreg, mlp")
    args = ap.parse_args()
    known = {"logreg": '{"input_size": 32}', "mlp": '{"input_size": 32, "depth": 2, "width": 256}'}
    models = [(m, known[m]) for m in args.models.split(",")]
    rows = []
    for arch, arch_args in models:
        for normalize in ("imagenet", "dataset"):
            acc, ckpt, dt = fit(arch, arch_args, normalize, args, Path(args.run_root))
            mean, std = input_stats(ckpt, args.root)
            rows.append((arch, normalize, mean, std, acc, dt))
            print(f"{arch:7s} {normalize:9s} input mean {[round(v, 3) for v in mean]} std {[round(v, 3) for v in std]} "
                  f"val top-1 {acc:.4f} ({dt:.0f} s)", flush=True)
    print("\n| model | data.normalize | input mean (R, G, B) | input std (R, G, B) | val top-1 |")
    print("|---|---|---|---|---:|")
    for arch, normalize, mean, std, acc, _ in rows:
        print(f"| {arch} | {normalize} | {', '.join(f'{x:+.2f}' for x in mean)} | {', '.join(f'{x:.2f}' for x in std)} | {acc:.3f} |")


if __name__ == "__main__":
    main()
