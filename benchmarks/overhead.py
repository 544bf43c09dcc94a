"""Framework overhead and data- vs compute-bound: `zoo fit`'s training loop against a bare loop.

    python benchmarks/overhead.py [--archs convnet resnet18] [--res 64] [--batch 32] [--steps 30] [--repeats 3]

1. Overhead: the same ImageClassifier network, optimizer (SGD, same parameter groups), precision
   (fp32), loss and uint8 batches already in memory, trained (a) by a minimal hand-written PyTorch
   loop and (b) by a Lightning Trainer configured as `zoo fit` runs (progress bar, a logger every
   `log_every_n_steps`, metrics, the LR scheduler, the loss check, the callbacks the CLI adds).
   Timed after warm-up steps by CPU time (less sensitive to other jobs) and wall clock, interleaved
   (bare, Trainer, bare, Trainer, ...), median of ``--repeats``.
2. Data-bound or compute-bound: the Trainer fed by the real loader (ImageNetDataModule, FFCV,
   embedded synthetic dataset at ``--res``) vs by tensors in memory. A ratio near 1: the model is
   the bottleneck (buy GPUs); well below 1: decoding is (buy CPU cores / raise num_workers).

Writes benchmarks/results/overhead.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import machine_line, write_result  # noqa: E402

NUM_CLASSES = 10  # the embedded synthetic dataset's
LOADER_WORKERS = 2  # the data-bound comparison's ffcv threads: this machine's 2 cores


def make_model(arch: str):
    from zoo.base import ImageClassifier

    torch.manual_seed(0)
    return ImageClassifier(arch=arch, num_classes=NUM_CLASSES, lr=0.1, lr_reference_batch=None, schedule="constant",
                           momentum=0.9, weight_decay=5e-5)


def make_batches(n: int, batch: int, res: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, generator=g),
         torch.randint(0, NUM_CLASSES, (batch,), generator=g))
        for _ in range(n)
    ]


def _clocks() -> tuple[float, float]:
    """(wall, CPU) seconds. CPU time of this process (torch runs one intra-op thread here) counts
    the work done, not the time other jobs on a shared machine hold the cores: the ratio of two
    loops' CPU times stays put under load where wall-clock ratios swing by 10-40%."""
    return time.perf_counter(), time.process_time()


def _rates(images: int, t0: tuple[float, float]) -> tuple[float, float]:
    t1 = _clocks()
    return images / (t1[0] - t0[0]), images / (t1[1] - t0[1])


def bare_loop(arch: str, batches, warmup: int) -> tuple[float, float]:
    """Images/s (wall, CPU time) of a minimal loop: preprocess, forward, loss, backward, step."""
    model = make_model(arch)
    net = model.net.train()
    opt = torch.optim.SGD(model.param_groups(0.1), lr=0.1, momentum=0.9)
    t0 = None
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            t0 = _clocks()
        loss = F.cross_entropy(net(model.preprocess(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _rates((len(batches) - warmup) * batches[0][0].shape[0], t0)


class _Clock:
    """Lightning callback: images/s from the ``warmup``-th batch to the end of training."""

    def __new__(cls, warmup: int):
        import lightning as L

        class Clock(L.Callback):
            def __init__(self):
                self.t0, self.images = None, 0

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == warmup and self.t0 is None:
                    self.t0 = _clocks()
                if self.t0 is not None:
                    self.images += batch[0].shape[0]

            def on_train_end(self, trainer, pl_module):
                self.rate = _rates(self.images, self.t0)

        return Clock()


def zoo_fit_callbacks(log_dir: str) -> list:
    """The callbacks `zoo fit` adds by default (callbacks/defaults.py, the source the CLI builds
    from), less the checkpoints (this loop saves none), the model summary (printed once, before the
    timed steps) and the run report's HTML (written after them; its metric log stays); the
    dashboard's plots go to ``log_dir``."""
    from callbacks.defaults import default_callbacks

    return default_callbacks("fit", exclude=("best_checkpoint", "last_checkpoint", "model_summary"),
                             init_args={"dashboard": {"plots_dir": log_dir}, "run_report": {"report": False}})


def trainer_loop(arch: str, data, warmup: int, steps: int, log_dir: str) -> tuple[float, float]:
    """Images/s (wall, CPU time) of a Trainer with the callbacks `zoo fit` adds (zoo_fit_callbacks;
    demo recipe's logging interval), a CSV logger in place of W&B, no checkpoints or validation."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    clock = _Clock(warmup)
    zoo_fit = zoo_fit_callbacks(log_dir)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, precision="32-true", logger=CSVLogger(log_dir),
        default_root_dir=log_dir,  # the run report's metric log (metrics.jsonl) goes here
        log_every_n_steps=10,  # demo recipe
        callbacks=[clock, *zoo_fit], enable_checkpointing=False,
        limit_val_batches=0, num_sanity_val_steps=0, enable_model_summary=False, enable_progress_bar=True,
    )
    model = make_model(arch)
    if isinstance(data, list):
        trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None, shuffle=False))
    else:
        trainer.fit(model, datamodule=data)
    return clock.rate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["convnet", "resnet18"])
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared machine)")
    ap.add_argument("--no-loader", action="store_true", help="skip the real-loader (data-bound) comparison")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "overhead.md"))
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_MININTERVAL", "0.1")
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    n = args.steps + args.warmup
    batches = make_batches(n, args.batch, args.res)
    log_dir = tempfile.mkdtemp(prefix="zoo-bench-")
    rows, data_rows = [], []
    for arch in args.archs:
        bare, lit = [], []
        for _ in range(args.repeats):
            bare.append(bare_loop(arch, batches, args.warmup))
            lit.append(trainer_loop(arch, batches, args.warmup, n, log_dir))
            torch.set_num_threads(args.threads)
        (bw, bc), (tw, tc) = ([statistics.median(r[i] for r in runs) for i in (0, 1)] for runs in (bare, lit))
        rows.append((arch, bc, tc, tc / bc, tw / bw))
        print(f"{arch}: CPU time: bare {bc:.1f} img/s, Trainer {tc:.1f} img/s, ratio {tc / bc:.3f}; "
              f"wall clock ratio {tw / bw:.3f}", flush=True)
    if not args.no_loader:
        from datamodules.imagenet import ImageNetDataModule

        for arch in args.archs:
            loader, mem = [], []
            for _ in range(args.repeats):
                dm = ImageNetDataModule(root=None, backend="ffcv", batch_size=args.batch, num_workers=LOADER_WORKERS,
                                        train_res=args.res, val_res=args.res, max_resolution=96, compress_probability=1.0,
                                        progress=False)
                loader.append(trainer_loop(arch, dm, args.warmup, n, log_dir)[0])  # wall clock: decoding threads count
                # ffcv sets torch's threads to its num_workers at every epoch: the loader run trained
                # with LOADER_WORKERS threads, so the in-memory run does too
                torch.set_num_threads(LOADER_WORKERS)
                mem.append(trainer_loop(arch, batches, args.warmup, n, log_dir)[0])
                torch.set_num_threads(args.threads)
            lo, me = statistics.median(loader), statistics.median(mem)
            data_rows.append((arch, lo, me, lo / me))
            print(f"{arch}: real loader {lo:.1f} img/s, in memory {me:.1f} img/s, ratio {lo / me:.3f}", flush=True)
    cmd = "python benchmarks/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"# Framework overhead: `zoo fit`'s Trainer vs a bare PyTorch loop ({args.res} px, batch {args.batch}, fp32, CPU)",
        "",
        machine_line("cpu", load0, f"{args.steps} timed steps after {args.warmup} warm-up, median of {args.repeats} interleaved runs, torch threads {args.threads}"),
        f"Command: `{cmd.strip()}`",
        "",
        "| model | bare loop (img/s, CPU time) | Trainer (img/s, CPU time) | Trainer / bare (CPU time) | Trainer / bare (wall clock) |",
        "| --- | ---: | ---: | ---: | ---: |",
        *[f"| {a} | {b:.1f} | {t:.1f} | {r:.3f} | {rw:.3f} |" for a, b, t, r, rw in rows],
        "",
        "CPU time: images per second of this process's CPU time (one torch thread), far less sensitive to other jobs "
        "on the machine than the wall clock (yet still a few % apart between runs at load 12); wall clock: the same runs.",
    ]
    if data_rows:
        lines += [
            "",
            f"## Data-bound or compute-bound (Trainer; FFCV loader with {LOADER_WORKERS} threads on the embedded dataset vs tensors in memory; torch threads {LOADER_WORKERS} in both, as ffcv sets them)",
            "",
            "| model | real loader (img/s) | in memory (img/s) | loader / memory |",
            "| --- | ---: | ---: | ---: |",
            *[f"| {a} | {lo:.1f} | {me:.1f} | {r:.3f} |" for a, lo, me, r in data_rows],
            "",
            "A ratio near 1: compute-bound (a faster device helps); well below 1: data-bound (more decoding cores help). "
            "On this CPU-only machine decoding and compute share the same cores.",
        ]
    write_result(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
