"""scikit-learn's handwritten digits (1,797 8x8 images, bundled with the package: no download) as a
32 px ImageNet-format folder: ``root/{train,val}/<digit>/<i>.png``, a small real dataset for the
course's examples and for checkpoint round trips.

    python benchmarks/digits_folder.py /tmp/digits32            # 1,500 train / 297 val, seed 0
    python benchmarks/digits_folder.py /tmp/digits32 --flat /tmp/digits_flat --flat-count 20
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def make_digits_folder(root: Path, size: int = 32, n_train: int = 1500, seed: int = 0) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0 * 255.0).round().astype(np.uint8)  # 0..16 grey levels -> 0..255
    order = np.random.default_rng(seed).permutation(len(x))
    for rank, i in enumerate(order):
        split = "train" if rank < n_train else "val"
        folder = root / split / str(int(d.target[i]))
        folder.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(x[i], "L").resize((size, size), Image.BICUBIC).convert("RGB")
        im.save(folder / f"{i:04d}.png")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--flat", default=None, help="also copy val images of every class into this flat folder")
    ap.add_argument("--flat-count", type=int, default=20)
    args = ap.parse_args()
    root = make_digits_folder(Path(args.root), args.size)
    if args.flat:
        flat = Path(args.flat)
        flat.mkdir(parents=True, exist_ok=True)
        files = sorted((root / "val").glob("*/*.png"))
        for p in files[:: max(1, len(files) // args.flat_count)][: args.flat_count]:  # every class
            (flat / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    print(root)


if __name__ == "__main__":
    main()
