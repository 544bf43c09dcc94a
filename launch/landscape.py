"""`zoo landscape CKPT`: the loss surface around a trained model (Li et al., NeurIPS 2018).

    zoo landscape runs/convnet/<id>/checkpoints/last.ckpt               # embedded data
    zoo landscape last.ckpt --data.root /data/imagenet --images 512 --span 1 --grid 21

Two random directions d1, d2 in weight space, **filter-normalised** (Li et al. 2018, "Visualizing
the Loss Landscape of Neural Nets", Sec. 4): each filter of a direction (a conv's output channel,
a Linear's row) is rescaled to the norm of the matching filter of the weights, so a step of 1
moves every filter by its own size and surfaces of different nets compare; biases and
BatchNorm parameters (every tensor with ndim <= 1) are zeroed in the direction. The loss
L(theta + a d1 + b d2) is computed on a fixed subset of the *train* images (seeded choice,
centre crop at the model's input size, no augmentation) with BN in eval mode (its running
statistics: the surface of the function the model computes at test time). Outputs, in the
checkpoint's run directory under landscape/: landscape_1d.png (loss along d1 and d2),
landscape_2d.png (contours over the plane), landscape.npz and landscape_1d.csv, and a W&B run
(offline unless WANDB_MODE=online) in the run's directory when the run logged to W&B.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def filter_normalized_direction(net: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random direction shaped like ``net``'s parameters, filter-normalised (Li et al. 2018)."""
    d = {}
    for name, p in net.named_parameters():
        if p.ndim <= 1:  # biases, BN/LN weights and biases: zero (Li et al., Sec. 4)
            d[name] = torch.zeros_like(p)
            continue
        r = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)
        # per filter (first dim: conv output channel / Linear row): ||d_i|| = ||theta_i||
        w_norm = p.detach().flatten(1).norm(dim=1)
        r_norm = r.flatten(1).norm(dim=1).clamp_min(1e-12)
        d[name] = r * (w_norm / r_norm).view(-1, *([1] * (p.ndim - 1)))
    return d


def load_subset(root: Optional[str], n: int, size: int, crop_pct: float, seed: int,
                interpolation: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` train images (seeded choice) as uint8 NCHW, as the val images are read
    (``val_transform``: short side to ``int(size / crop_pct)``, centre crop ``size``), and labels."""
    from torchvision import datasets

    from datamodules import synthetic
    from datamodules.folder import to_rgb
    from datamodules.torchvision_backend import val_transform

    if root is None:
        base = synthetic.make_synthetic_imagenet(synthetic.default_root())
    else:
        base = Path(root).expanduser()
    train = base / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"{train} is not a folder; --data.root must hold train/<class>/*.JPEG")
    tf = val_transform(size, crop_pct, interpolation)
    ds = datasets.ImageFolder(str(train), transform=lambda im: tf(to_rgb(im)))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[: min(n, len(ds))]
    xs, ys = zip(*(ds[i] for i in idx.tolist()))
    return torch.stack(xs), torch.tensor(ys)


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy (no label smoothing) and top-1 over the subset."""
    total, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb = model.preprocess(x[i: i + batch_size].to(model.device))
        yb = y[i: i + batch_size].to(model.device)
        logits = model(xb)
        total += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    return total / len(x), correct / len(x)


class Surface:
    """theta + a d1 + b d2, set in place on the model's parameters (restored by ``reset``)."""

    def __init__(self, net: nn.Module, d1: dict, d2: dict) -> None:
        self.params = dict(net.named_parameters())
        self.theta = {k: p.detach().clone() for k, p in self.params.items()}
        self.d1, self.d2 = d1, d2

    @torch.no_grad()
    def set(self, a: float, b: float = 0.0) -> None:
        for k, p in self.params.items():
            p.copy_(self.theta[k] + a * self.d1[k] + b * self.d2[k])

    def reset(self) -> None:
        self.set(0.0, 0.0)


def landscape(model, x, y, *, steps: int, grid: int, span: float, seed: int, batch_size: int, progress=None) -> dict:
    """1-D curves along d1 and d2 and the 2-D grid; ``model`` is restored afterwards."""
    model.eval()  # BN uses its running statistics, dropout off
    g = torch.Generator().manual_seed(seed)
    d1 = filter_normalized_direction(model.net, g)
    d2 = filter_normalized_direction(model.net, g)
    surf = Surface(model.net, d1, d2)
    alphas = torch.linspace(-span, span, steps).tolist()
    gs = torch.linspace(-span, span, grid).tolist()
    jobs = [("1d", 0, i) for i in range(steps)] + [("1d", 1, i) for i in range(steps)]
    jobs += [("2d", i, j) for i in range(grid) for j in range(grid)]
    line = torch.zeros(2, steps, 2)  # direction, step, (loss, acc)
    plane = torch.zeros(grid, grid)
    try:
        for kind, a, b in progress(jobs) if progress else jobs:
            if kind == "1d":
                surf.set(alphas[b], 0.0) if a == 0 else surf.set(0.0, alphas[b])
                line[a, b] = torch.tensor(evaluate(model, x, y, batch_size))
            else:
                surf.set(gs[a], gs[b])
                plane[a, b] = evaluate(model, x, y, batch_size)[0]
    finally:
        surf.reset()
    return {"alphas": torch.tensor(alphas), "line": line, "grid": torch.tensor(gs), "plane": plane, "d1": d1, "d2": d2}


def _plots(res: dict, out: Path, title: str) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    a = res["alphas"].numpy()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.6))
    for k, name in enumerate(("d1", "d2")):
        ax[0].plot(a, res["line"][k, :, 0].numpy(), marker=".", label=f"along {name}")
        ax[1].plot(a, res["line"][k, :, 1].numpy(), marker=".", label=f"along {name}")
    ax[0].set_yscale("log")
    ax[0].set_ylabel("train loss (subset)")
    ax[1].set_ylabel("train top-1 (subset)")
    for x in ax:
        x.set_xlabel("step along the filter-normalised direction")
        x.axvline(0, color="grey", lw=0.7, ls="--")
        x.legend(fontsize=8)
    fig.suptitle(f"{title}: 1-D loss")
    fig.tight_layout()
    p1 = out / "landscape_1d.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    gs = res["grid"].numpy()
    z = np.log10(np.maximum(res["plane"].numpy(), 1e-8))
    fig, ax = plt.subplots(figsize=(5, 4.4))
    cs = ax.contour(gs, gs, z.T, levels=20, cmap="viridis")  # plane[a, b]: a on x, b on y
    ax.clabel(cs, fontsize=6, fmt=lambda v: f"{10 ** v:.2g}")
    ax.plot([0], [0], "r+", ms=12)
    ax.set_xlabel("d1")
    ax.set_ylabel("d2")
    ax.set_title(f"{title}: loss contours (log levels)")
    fig.tight_layout()
    p2 = out / "landscape_2d.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return p1, p2


def _out_dir(ckpt: Path, out: Optional[str]) -> Path:
    if out:
        d = Path(out)
    elif ckpt.parent.name == "checkpoints":
        d = ckpt.parent.parent / "landscape"  # the run directory
    else:
        d = ckpt.parent / "landscape"
    d.mkdir(parents=True, exist_ok=True)
    return d.resolve()


def _to_wandb(run_dir: Path, out: Path, pngs: tuple[Path, Path], title: str) -> Optional[str]:
    if not (run_dir / "wandb").is_dir():
        return None
    import wandb

    mode = "online" if os.environ.get("WANDB_MODE") == "online" else "offline"
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lightning-zoo"), name=f"{title}-landscape",
                     job_type="landscape", dir=str(run_dir), mode=mode, reinit="finish_previous")
    run.log({"landscape/1d": wandb.Image(str(pngs[0])), "landscape/2d": wandb.Image(str(pngs[1]))})
    run.finish()
    return mode


# the spellings before one flag style (launch/flags.py): accepted with a deprecation line
RENAMED = {"--batch-size": ("--data.batch_size",), "--out": ("--out_dir",), "--no-wandb": ("--wandb", "false")}


def main(argv: list[str]) -> int:
    """Plot a checkpoint's loss surface along random filter-normalised directions."""
    from launch.flags import add_bool, deprecated

    argv = deprecated(argv, RENAMED, "zoo landscape")
    p = argparse.ArgumentParser(prog="zoo landscape", description="loss surface along filter-normalised directions")
    p.add_argument("ckpt", help="Lightning checkpoint of a zoo run (checkpoints/last.ckpt)")
    p.add_argument("--data.root", dest="root", default=None, help="ImageNet-format folder (default: the embedded data)")
    p.add_argument("--images", type=int, default=256, help="train images in the fixed subset")
    p.add_argument("--steps", type=int, default=21, help="points along each 1-D direction")
    p.add_argument("--grid", type=int, default=15, help="points per side of the 2-D grid")
    p.add_argument("--span", type=float, default=1.0, help="directions are scanned over [-span, span]")
    p.add_argument("--res", type=int, default=None,
                   help="image side (default: the eval size the checkpoint records, i.e. it was trained and evaluated at)")
    p.add_argument("--data.batch_size", dest="batch_size", type=int, default=128, help="images per loss evaluation")
    p.add_argument("--seed", type=int, default=0, help="seeds the directions and the subset")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--out_dir", default=None, help="output directory (default: <run dir>/landscape)")
    add_bool(p, "--wandb", True, "log the plots to the run's W&B run (offline unless WANDB_MODE=online)")
    args = p.parse_args(argv)
    if args.steps < 3 or args.grid < 2 or args.span <= 0 or args.images < 1:
        print("error: need --steps >= 3, --grid >= 2, --span > 0 and --images >= 1", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from zoo import load
    from zoo.weights import WeightsError

    ckpt = Path(args.ckpt)
    try:
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} not found; pass a run's checkpoints/last.ckpt")
        model = load(weights=str(ckpt)).to(args.device)
        dc = model.data_config  # what the checkpoint records (ImageClassifier.record_data_preprocessing)
        size = args.res or int(dc["input_size"])
        if args.res and args.res != int(dc["input_size"]):
            print(f"zoo: evaluating {ckpt} at --res {args.res} px instead of the recorded eval size {dc['input_size']} px "
                  "(leave --res out to use what the checkpoint was trained and evaluated with)")
        x, y = load_subset(args.root, args.images, size, float(dc.get("crop_pct", 0.875)), args.seed,
                           str(dc.get("interpolation", "bilinear")))
    except (FileNotFoundError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(x)
    print(f"landscape of {ckpt}: {model.hparams.arch}, {n} train images at {size} px, "
          f"{args.steps} steps x 2 directions + {args.grid}x{args.grid} grid over [-{args.span}, {args.span}]")
    res = landscape(model, x, y, steps=args.steps, grid=args.grid, span=args.span, seed=args.seed,
                    batch_size=args.batch_size, progress=lambda j: tqdm(j, desc="loss evaluations", file=sys.stderr))
    out = _out_dir(ckpt, args.out_dir)
    title = f"{model.hparams.arch}" + ("+skip" if (model.hparams.arch_args or {}).get("skip") else "")
    with open(out / "landscape_1d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss_d1", "acc1_d1", "loss_d2", "acc1_d2"])
        for i, a in enumerate(res["alphas"].tolist()):
            w.writerow([a, *res["line"][0, i].tolist(), *res["line"][1, i].tolist()])
    import numpy as np

    np.savez(out / "landscape.npz", alphas=res["alphas"].numpy(), line=res["line"].numpy(), grid=res["grid"].numpy(),
             plane=res["plane"].numpy())
    pngs = _plots(res, out, title)
    i0 = args.steps // 2
    for k in (0, 1):
        losses = res["line"][k, :, 0]
        print(f"d{k + 1}: loss {losses[i0]:.4f} at 0, {losses[0]:.4f} at -{args.span:g}, {losses[-1]:.4f} at "
              f"+{args.span:g}; lowest {losses.min():.4f} at {res['alphas'][int(losses.argmin())]:+.2f}")
    run_dir = out.parent if ckpt.parent.name == "checkpoints" and not args.out_dir else out
    mode = _to_wandb(run_dir, out, pngs, title) if args.wandb else None
    print(f"table: {out / 'landscape_1d.csv'} (2-D grid: {out / 'landscape.npz'})")
    print(f"plots: {pngs[0]} {pngs[1]}")
    if mode:
        print(f"W&B ({mode}): job_type landscape in {run_dir / 'wandb'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
