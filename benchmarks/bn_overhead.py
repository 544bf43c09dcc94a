"""BNStatsCheck overhead: (a) measured on the demo, (b) projected to an ImageNet epoch.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bn_overhead.py [--epochs 20] [--repeats 5] [--skip-demo]

(a) `zoo fit` with the demo recipe and ``BNStatsCheck`` at its defaults (``every_n_epochs=None``:
    the check's own budget) and, for the cost of one check, with ``every_n_epochs=1``. A clock
    callback takes the wall time of every epoch (train start to validation end); the check times
    itself (``bn/check_seconds``). Overhead = check seconds / (wall time - check seconds).
(b) Per-image costs of ResNet-50 at 224 px, interleaved, median of ``--repeats``: a training step
    (forward + backward + SGD), the check's estimator pass (BN layers in train mode, hooks on
    every BN input) and an eval forward. Projected for ImageNet (1,281,167 train and 50,000 val
    images) at the defaults, K = 8,192 estimator images + 2 x 8,192 val images + 2 x 64 held-out:
    (K t_est + (2 x 8,192 + 128) t_eval) / (1,281,167 t_train + 50,000 t_eval).
    The same three costs of the demo convnet at 64 px give its train/forward cost ratio.

Writes benchmarks/results/bn_overhead.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks._common import machine_line, write_result  # noqa: E402

IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000  # ILSVRC-2012
K = 8192  # BNStatsCheck defaults (pycls NUM_SAMPLES_PRECISE), num_samples and val_samples


class EpochClock(L.Callback):
    """Wall time of each epoch (train start to validation end) and BNStatsCheck's seconds,
    written to ``out`` as JSON at the end of fit."""

    def __init__(self, out: str) -> None:
        self.out, self.rows, self.t0, self.fit0 = out, [], None, None

    def on_fit_start(self, trainer, pl_module):
        self.fit0 = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.t0 is None:
            return
        from callbacks.bn import BNStatsCheck

        check = next(c for c in trainer.callbacks if isinstance(c, BNStatsCheck))
        ran = check.last_summary.get("bn/check_seconds") if check._ran_epoch == trainer.current_epoch else None
        self.rows.append({"epoch": trainer.current_epoch, "wall": time.perf_counter() - self.t0,
                          "check": ran or 0.0, "every": check.auto_every or check.every_n_epochs,
                          "acc1": float(trainer.callback_metrics.get("val/acc1", float("nan")))})
        self.t0 = None

    def on_fit_end(self, trainer, pl_module):
        Path(self.out).write_text(json.dumps({"rows": self.rows, "fit": time.perf_counter() - self.fit0}))


def demo_run(epochs: int, every: int | None, out: Path, data_dir: str) -> dict:
    cfg = out.with_suffix(".yaml")
    cfg.write_text(
        f"trainer:\n  max_epochs: {epochs}\n  enable_progress_bar: false\n  callbacks:\n"
        f"    - class_path: callbacks.bn.BNStatsCheck\n      init_args: {{every_n_epochs: {json.dumps(every)}}}\n"
        f"    - class_path: benchmarks.bn_overhead.EpochClock\n      init_args: {{out: {str(out)!r}}}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), ZOO_DATA_DIR=data_dir)
    cmd = [sys.executable, "-m", "launch.cli", "fit", "--config", str(ROOT / "launch/recipes/demo.yaml"),
           "--config", str(cfg), "--trainer.default_root_dir", str(out.parent / "runs"), "--run.root",
           str(out.parent / "runs"), "--run.logger", "csv"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"demo fit failed ({proc.returncode})")
    res = json.loads(out.read_text())
    res["said"] = [ln for ln in proc.stdout.splitlines() if "one check costs" in ln]
    return res


def per_image_costs(arch: str, res: int, batch: int, classes: int, repeats: int, device: str,
                    amp: bool) -> dict[str, float]:
    """Median seconds per image: train step, estimator pass, eval forward (interleaved)."""
    from callbacks.bn import estimate_population_stats
    from zoo.registry import create_network

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as the GPU recipes train
    net = create_network(arch, num_classes=classes).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, res, res, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    ctx = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if amp else (lambda: torch.autocast(device, enabled=False))

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def train():
        net.train()
        with ctx():
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def estimate():
        with ctx():
            estimate_population_stats(net, [x], num_samples=batch, reduce_ranks=False)

    @torch.no_grad()
    def forward():
        net.eval()
        with ctx():
            net(x)

    fns = {"train": train, "estimate": estimate, "eval": forward}
    for fn in fns.values():  # warm-up (allocator, cudnn autotune)
        fn(), fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    iters = 10 if device == "cuda" else 1
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            times[k].append((time.perf_counter() - t0) / (iters * batch))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20, help="the demo recipe's 20")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16, help="ResNet-50 batch for the per-image costs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast (GPU recipes' precision)")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--each", action="store_true",
                    help="only a fit with every_n_epochs=1 (one check per epoch: the cost of one check, quickly)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bn_overhead.md"))
    args = ap.parse_args(argv)
    load0 = os.getloadavg()[0]
    lines = []
    cmd = "python benchmarks/bn_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if not args.skip_demo:
        tmp = Path(tempfile.mkdtemp(prefix="zoo-bn-overhead-"))
        data_dir = str(tmp / "data")
        auto = None if args.each else demo_run(args.epochs, None, tmp / "auto.json", data_dir)
        each = demo_run(args.epochs, 1, tmp / "each.json", data_dir) if args.each else None
        lines += [f"# BNStatsCheck overhead on the demo (`zoo fit`, demo recipe, {args.epochs} epochs, CPU)", "",
                  machine_line("cpu", load0), f"Command: `{cmd.strip()}`", ""]
        lines += ["| BNStatsCheck | checks | check seconds (total) | fit wall s without checks | overhead | val/acc1 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, r in (("defaults (every_n_epochs=None)", auto), ("every_n_epochs=1", each)):
            if r is None:
                continue
            checks = [x["check"] for x in r["rows"] if x["check"]]
            total = sum(checks)
            rest = r["fit"] - total
            lines.append(f"| {name} | {len(checks)} | {total:.1f} | {rest:.1f} | {100 * total / rest:.2f}% | "
                         f"{r['rows'][-1]['acc1']:.3f} |")
        per = [x["check"] / (x["wall"] - x["check"]) for r in (auto, each) if r for x in r["rows"] if x["check"]]
        walls = [x["wall"] - x["check"] for x in (auto or each)["rows"]]
        lines += ["", f"One check = {100 * statistics.median(per):.1f}% of its epoch (median of {len(per)}); "
                      f"epoch wall time without a check: median {statistics.median(walls):.1f} s. "
                      f"The default's choice: {' '.join((auto or each)['said']) or '(not printed: explicit every_n_epochs)'}"]
    dev_costs = []
    for arch, res, batch, classes in (("convnet", 64, 64, 10), ("resnet50", 224, args.batch, 1000)):
        c = per_image_costs(arch, res, batch, classes, args.repeats, args.device, args.amp)
        dev_costs.append((arch, res, batch, c))
        print(f"{arch}: {c}", flush=True)
    lines += ["", f"# Per-image costs ({args.device}{', bf16 autocast' if args.amp else ', fp32'}, channels_last, "
                  f"interleaved, median of {args.repeats})", "",
              machine_line(args.device, load0), "",
              "| model | px | batch | train step ms/img | estimator ms/img | eval fwd ms/img | train / eval |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for arch, res, batch, c in dev_costs:
        lines.append(f"| {arch} | {res} | {batch} | {1e3 * c['train']:.3f} | {1e3 * c['estimate']:.3f} | "
                     f"{1e3 * c['eval']:.3f} | {c['train'] / c['eval']:.2f} |")
    c = dev_costs[-1][3]
    check = K * c["estimate"] + (2 * K + 128) * c["eval"]
    epoch = IMAGENET_TRAIN * c["train"] + IMAGENET_VAL * c["eval"]
    lines += ["", f"Projected ImageNet epoch (ResNet-50, {args.device}): one check at the defaults "
                  f"{check:.0f} s vs an epoch's {epoch:.0f} s of compute = **{100 * check / epoch:.2f}%** "
                  f"(data loading not counted on either side)."]
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
