"""What the Dashboard callback costs a fit: CPU time inside its hooks (and ThroughputMonitor's)
against the whole fit's, ConvNeXt-T on scikit-learn's digits at 32 px (peers.py's data and
recipe), in memory, one process, on the CPU.

    python benchmarks/dashboard_cost.py [--epochs 2] [--arch convnext_tiny] [--fit-epochs 15]

Two fits of ``--epochs`` epochs with the Dashboard drawing at every validation
(``every_n_epochs=1``), so each epoch yields one sample of every cost:

- "logits returned": the module as it is (``validation_step`` returns its logits; the
  Dashboard's per-batch work is a softmax, a confusion-matrix update and a top-k merge);
- "loss only": a module whose ``validation_step`` returns only the loss, so the Dashboard runs
  its own forward pass per validation batch (the callback's behaviour before it read logits).

CPU time is ``time.process_time`` (all threads of this process; the data comes from memory, no
loader threads), so other work on a shared machine changes it little. The table projects the
costs onto a ``--fit-epochs`` fit: per-validation work at every epoch for the old behaviour, at
``every_n_epochs`` (default 5) and the last epoch for the new one, the FLOP count once.
W&B's own process (wandb-core) is not counted: the fits log to CSV.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import machine_line, write_result  # noqa: E402


def digits_tensors(res: int = 32):
    """The digits as uint8 NCHW tensors, split as peers.py's folder (1,500 / 297)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.images))
    x = torch.from_numpy(d.images[order] * (255 / 16)).float()[:, None]
    x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False).round().clamp(0, 255)
    x = x.to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target[order]).long()
    return (x[:1500], y[:1500]), (x[1500:], y[1500:])


class Timed:
    """Wraps a callback's hooks: process CPU seconds per hook name."""

    def __init__(self, cb, sink: dict) -> None:
        self.cb, self.sink = cb, sink
        for name in ("on_train_batch_start", "on_train_batch_end", "on_validation_epoch_start",
                     "on_validation_batch_end", "on_validation_epoch_end", "on_validation_start", "on_validation_end",
                     "on_train_start", "setup"):
            fn = getattr(cb, name, None)
            if fn is not None:
                setattr(cb, name, self._wrap(f"{type(cb).__name__}.{name}", fn))

    def _wrap(self, key, fn):
        def run(*a, **k):
            t = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.sink[key] += time.process_time() - t
        return run


def fit(arch: str, epochs: int, loss_only: bool, data, out: Path) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ThroughputMonitor
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from callbacks._batches import batch_size_of
    from callbacks.dashboard import Dashboard
    from zoo.base import ImageClassifier

    class LossOnly(ImageClassifier):
        def validation_step(self, batch, batch_idx):
            return super().validation_step(batch, batch_idx)["loss"]

    (xt, yt), (xv, yv) = data
    torch.manual_seed(0)
    cls = LossOnly if loss_only else ImageClassifier
    m = cls(arch=arch, num_classes=10, optimizer="adamw", lr=1e-3, lr_reference_batch=None, weight_decay=0.05,
            schedule="cosine", label_smoothing=0.0)
    sink: dict = defaultdict(float)
    dash = Dashboard(every_n_epochs=1, plots_dir=str(out / "plots"))
    Timed(dash, sink)
    tm = ThroughputMonitor(batch_size_fn=batch_size_of, window_size=50)
    Timed(tm, sink)
    draws = []
    orig = dash._log_confusion
    dash._log_confusion = lambda *a: (draws.append(time.process_time()), orig(*a))
    t = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=CSVLogger(str(out)), callbacks=[dash, tm],
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0)
    train = DataLoader(TensorDataset(xt, yt), batch_size=64, shuffle=True, drop_last=True)
    val = DataLoader(TensorDataset(xv, yv), batch_size=64)
    c0, w0 = time.process_time(), time.perf_counter()
    t.fit(m, train, val)
    return {"fit_cpu": time.process_time() - c0, "fit_wall": time.perf_counter() - w0, "hooks": dict(sink),
            "val_batches": len(val), "epochs": epochs}


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="convnext_tiny")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--fit-epochs", type=int, default=15, help="the fit the costs are projected onto")
    ap.add_argument("--every", type=int, default=5, help="the Dashboard's every_n_epochs default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dashboard_cost.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    data = digits_tensors()
    res = {}
    with tempfile.TemporaryDirectory(prefix="zoo-dash-") as tmp:
        for loss_only in (False, True):
            res[loss_only] = fit(args.arch, args.epochs, loss_only, data, Path(tmp) / str(loss_only))
    E, F_ = args.epochs, args.fit_epochs
    new, old = res[False], res[True]

    def per_epoch(r, key):
        return r["hooks"].get(key, 0.0) / E

    flops = {r: res[r]["hooks"].get("Dashboard.on_train_batch_start", 0.0) for r in res}  # FLOPs once + grid once
    tm_cost = {r: sum(v for k, v in res[r]["hooks"].items() if k.startswith("ThroughputMonitor")) for r in res}
    dash_val_new = per_epoch(new, "Dashboard.on_validation_batch_end") + per_epoch(new, "Dashboard.on_validation_epoch_end") \
        + per_epoch(new, "Dashboard.on_validation_epoch_start")
    dash_val_old = per_epoch(old, "Dashboard.on_validation_batch_end") + per_epoch(old, "Dashboard.on_validation_epoch_end") \
        + per_epoch(old, "Dashboard.on_validation_epoch_start")
    dash_all_new = sum(v for k, v in new["hooks"].items() if k.startswith("Dashboard"))
    # the fit without any dashboard work, per epoch (the logits-returning run minus all hook time)
    base_epoch = (new["fit_cpu"] - dash_all_new - tm_cost[False]) / E
    draws_new = len({e for e in range(1, F_ + 1) if e % args.every == 0 or e == F_})
    fit_base = F_ * base_epoch
    old_cost = flops[True] + F_ * dash_val_old + tm_cost[True] * F_ / E
    new_cost = flops[False] + draws_new * dash_val_new + tm_cost[False] * F_ / E
    lines = [
        f"# Dashboard cost on a CPU fit ({args.arch}, digits 32 px, 1,500 train / 297 val, batch 64)",
        "",
        machine_line("cpu", load0, f"torch threads {args.threads}; process CPU time, in-memory data"),
        f"Command: `python benchmarks/dashboard_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        f"Measured over {E}-epoch fits, Dashboard drawing at every validation (CPU s):",
        "",
        "| | logits returned (now) | loss only (Dashboard's own forward, before) |",
        "|---|---:|---:|",
        f"| whole fit | {new['fit_cpu']:.1f} | {old['fit_cpu']:.1f} |",
        f"| FLOP count + first-batch grid (once) | {flops[False]:.2f} | {flops[True]:.2f} |",
        f"| Dashboard per validation (batches + draw) | {dash_val_new:.2f} | {dash_val_old:.2f} |",
        f"| ThroughputMonitor, whole fit | {tm_cost[False]:.2f} | {tm_cost[True]:.2f} |",
        f"| fit without Dashboard/ThroughputMonitor, per epoch | {base_epoch:.2f} | |",
        "",
        f"Projected onto a {F_}-epoch fit ({fit_base:.0f} CPU s without them):",
        "",
        "| Dashboard + ThroughputMonitor | CPU s | share of the fit |",
        "|---|---:|---:|",
        f"| before: own forward, drawn at every validation | {old_cost:.1f} | {100 * old_cost / fit_base:.1f}% |",
        f"| now: logits reused, drawn every {args.every} epochs and at the last ({draws_new} draws) | {new_cost:.1f} | "
        f"{100 * new_cost / fit_base:.1f}% |",
        "",
        "Hook CPU seconds (now / before): "
        + ", ".join(f"{k} {new['hooks'].get(k, 0):.2f}/{old['hooks'].get(k, 0):.2f}"
                    for k in sorted(set(new["hooks"]) | set(old["hooks"]))),
    ]
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
