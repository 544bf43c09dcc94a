"""The GPU path measured: loader vs on-device ceiling (ResNet-50), augmentation and EMA cost (ConvNeXt-T).

    python benchmarks/gpu.py --rounds 3      # on a GPU machine: ~6 min (JPEG generation, compiles)
    python benchmarks/gpu.py --smoke         # tiny CPU run of every code path (checks the script)

1. ResNet-50, bf16-mixed, channels_last, torch.compile, batch ``--batch`` (256), 1 device, through
   ``lightning.Trainer`` as `zoo fit` runs it (cudnn.benchmark on, as the recipes):
   a. ceiling: uint8 batches already on the device (no loader, no transfer);
   b. the real FFCV loader (ImageNetDataModule, ``--workers`` decoding threads) on ImageNet-like
      JPEGs generated on the machine (~500x375, q90, written once under $ZOO_DATA_DIR).
   c. the same loader alone, no model: the cores' decode capacity, with and without decode-time
      DCT scaling (``dct_scaling``).
   Images/s of each (after warm-up steps that include the compile), their ratio, peak device
   memory, and MFU (model FLOPs counted with torch.utils.flop_counter on the eager network,
   forward + backward, against the device's dense bf16 peak from ``--peak-tflops`` or a table).
   d. ``--gpu-decode``: JPEG decoding on the device (``data.gpu_decode``, datamodules/gpu_decode.py):
      every JPEG on the device, and ``auto`` (the split it chooses from the measured rates), with
      all cores; then the FFCV loader and the GPU decode again in a child process limited to
      ``--taskset-cores`` (``taskset -c 0-3``: 4 cores); and ConvNeXt-T's step time (224 px,
      ``--convnext-batch``) fed by the FFCV loader vs by the GPU decode, beside on-device batches:
      at a data rate both loaders sustain, the difference is what decoding costs the SMs.
2. ConvNeXt-T at 224 px, batch ``--convnext-batch`` (128 per GPU in the recipe): step time with
   nothing, with the recipe's device augmentation (timm RandAugment, random erasing, mixup/cutmix)
   in its previous form (RandAugment grouped by op, eager) and its current one (masked, compiled
   with the model), and with EMA (callbacks.ema.WeightEMA, every step), with and without the
   augmentation; ``--rounds`` fits of each (median; the order rotates between rounds); then the
   augmentation alone per variant and the EMA update alone: synchronised wall time as a fraction
   of the plain step, host time to return, kernels and GPU-busy time per call, and the costliest
   kernels and host ops (torch.profiler).

Writes benchmarks/results/gpu.md (or gpu-smoke.md).
"""

from __future__ import annotations

import argparse
from collections import Counter
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import machine_line, write_result  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets (without sparsity).
PEAK_BF16_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, v in PEAK_BF16_TFLOPS.items():
        if key in name:
            return v
    return None


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("lightning", "timm", "ffcv", "numba", "numpy"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            import importlib

            out.append(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
    return ", ".join(out)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write_jpegs(job: tuple[str, str, int, int, int]) -> None:
    from PIL import Image

    root, split, start, stop, seed = job
    shapes = [(500, 375), (500, 333), (375, 500), (500, 400)]  # ImageNet's common (w, h)
    classes = 10
    for i in range(start, stop):
        rng = np.random.default_rng([seed, split == "val", i])  # one stream per image: any chunking, same files
        w, h = shapes[i % len(shapes)]
        low = rng.integers(0, 256, (h // 25 + 2, w // 25 + 2, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
        d = Path(root) / split / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"{i}.JPEG", quality=90)


def make_jpegs(root: Path, n: int, seed: int = 0) -> Path:
    """``root/{train,val}/c<k>/*.JPEG``: ImageNet-like sizes and JPEG quality 90, smooth random content.

    Written once (a marker file says so), by all cores: 12,800 images take ~1 min on one core.
    """
    from multiprocessing import get_context

    marker = root / f".done-{n}"
    if marker.exists():
        return root
    chunk = 256
    jobs = [(str(root), split, a, min(a + chunk, count), seed)
            for split, count in (("train", n), ("val", max(10, n // 50))) for a in range(0, count, chunk)]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with get_context("spawn").Pool(max(1, cores)) as pool:
        pool.map(_write_jpegs, jobs)
    marker.touch()
    return root


class Clock:
    """Lightning callback: images/s and mean step time from the ``warmup``-th step to the end."""

    def __init__(self, warmup: int, device: torch.device):
        import lightning as L

        clock = self

        class _C(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == warmup and clock.t0 is None:
                    sync(device)
                    clock.t0 = time.perf_counter()
                    clock.steps0 = trainer.global_step
                if clock.t0 is not None:
                    clock.images += batch[0].shape[0]

            def on_train_end(self, trainer, pl_module):
                sync(device)
                clock.dt = time.perf_counter() - clock.t0
                clock.steps = trainer.global_step - clock.steps0

        self.callback = _C()
        self.t0, self.images, self.dt, self.steps, self.steps0 = None, 0, 0.0, 0, 0

    @property
    def rate(self) -> float:
        return self.images / self.dt

    @property
    def step_ms(self) -> float:
        return 1e3 * self.dt / max(self.steps, 1)


def device_batches(n: int, batch: int, res: int, classes: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, res, res), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    return [(x, y)] * n  # the same tensors: no host work, no transfer


def loader_rate(path, res: int, batch: int, workers: int, dct: bool, crop: bool = True) -> float:
    """Images/s of the zoo's FFCV train pipeline alone over one epoch, after one warm-up epoch
    (``crop``: crop-only JPEG decoding, the default; False: whole images, as before it)."""
    from datamodules import ffcv_io

    loader = ffcv_io.make_loader(
        path, {"image": ffcv_io.train_image_pipeline(res, (0.08, 1.0), (3 / 4, 4 / 3), seed=0, dct_scaling=dct,
                                                              crop_decode=crop),
               "label": ffcv_io.label_pipeline()},
        batch_size=batch, num_workers=workers, order="random")
    for _ in loader:  # warm-up: numba compile, page cache (each epoch's iterator closes at its end)
        pass
    t, n = time.perf_counter(), 0
    for images, _ in loader:
        n += images.shape[0]
    return n / (time.perf_counter() - t)


def time_augmentation(m, x, y, *, steps: int, warmup: int, device: torch.device):
    """:func:`time_call` of the augmentation (+ the uint8 -> float normalisation) on one batch."""

    def call():
        xx = m.preprocess(m.augment.pre_normalise(x))
        return m.augment.post_normalise(xx, y)

    return time_call(call, steps=steps, warmup=warmup, device=device)


def time_call(call, *, steps: int, warmup: int, device: torch.device):
    """Median synchronised wall ms and host ms to return per ``call()``; on a GPU, kernels and
    GPU-busy ms per call and a table of the costliest kernels and host ops."""
    wall, host = [], []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        sync(device)
        if i >= warmup:
            wall.append(1e3 * (time.perf_counter() - t0))
            host.append(1e3 * (t1 - t0))
    kernels = busy = float("nan")
    top: list[str] = []
    if device.type == "cuda":
        try:
            from torch.autograd import DeviceType
            from torch.profiler import ProfilerActivity, profile

            calls = 5
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    call()
                sync(device)
            ev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
            kernels, busy = len(ev) / calls, sum(e.time_range.elapsed_us() for e in ev) / 1e3 / calls
            gpu_by = Counter()
            for e in ev:
                gpu_by[e.name[:70]] += e.time_range.elapsed_us() / calls
            cpu_by = Counter({a.key[:70]: a.self_cpu_time_total / calls for a in prof.key_averages()
                              if a.self_cpu_time_total > 0})
            top = ["| GPU kernel | us | | host op (self CPU) | us |", "| --- | ---: | --- | --- | ---: |"]
            for (gk, gt), (ck, ct) in zip(gpu_by.most_common(8), cpu_by.most_common(8)):
                top.append(f"| `{gk}` | {gt:.0f} | | `{ck}` | {ct:.0f} |")
        except Exception as e:  # informative only
            print(f"profile failed: {type(e).__name__}: {e}", flush=True)
    return statistics.median(wall), statistics.median(host), kernels, busy, top


def fit(model, data, *, steps: int, warmup: int, device: torch.device, precision: str, callbacks=()) -> Clock:
    import lightning as L

    clock = Clock(warmup, device)
    trainer = L.Trainer(
        max_steps=steps + warmup, accelerator=device.type, devices=1, precision=precision, benchmark=True,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[clock.callback, *callbacks],
    )
    if isinstance(data, list):
        trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    else:
        trainer.fit(model, datamodule=data)
    return clock


def sync_audit(model, data, *, steps: int, warmup: int, device: torch.device, precision: str, callbacks=()):
    """Host-device synchronisations per training step, by source line (CUDA only).

    ``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising CUDA call warn; each
    warning is attributed to the innermost frame of this repository (else of Lightning, else
    torch) on the call stack, so the table says which line of the hot path waits for the GPU.
    """
    import collections
    import traceback
    import warnings

    import lightning as L

    repo = str(Path(__file__).resolve().parent.parent)
    counts: collections.Counter = collections.Counter()

    def where() -> str:
        frames = [f for f in traceback.extract_stack()[:-3] if "warnings" not in f.filename]
        for pred in (lambda f: f.filename.startswith(repo) and "/benchmarks/" not in f.filename and "/.gpu/" not in f.filename,
                     lambda f: "/lightning/" in f.filename, lambda f: True):
            hit = [f for f in frames if pred(f)]
            if hit:
                f = hit[-1]
                name = f.filename[len(repo) + 1:] if f.filename.startswith(repo) else "/".join(Path(f.filename).parts[-3:])
                return f"{name}:{f.lineno} ({f.line.strip()[:60] if f.line else '?'})"
        return "?"

    class _Audit(L.Callback):
        def __init__(self):
            self.on = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warmup and not self.on:
                self.on = True
                torch.cuda.set_sync_debug_mode("warn")

        def on_train_end(self, trainer, pl_module):
            torch.cuda.set_sync_debug_mode(0)

    old = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            counts[where()] += 1
        else:
            old(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        try:
            fit(model, data, steps=steps, warmup=warmup, device=device, precision=precision,
                callbacks=[_Audit(), *callbacks])
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = old
    return counts


def train_flops_per_image(arch: str, res: int, classes: int) -> float:
    """Forward + backward FLOPs of one image (counted on the eager network, CPU, batch 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    from zoo.base import ImageClassifier

    net = ImageClassifier(arch=arch, num_classes=classes).net
    x = torch.randn(2, 3, res, res)
    with FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    return counter.get_total_flops() / 2


def decode_dm(root, mode: str, args, workers: int, device: torch.device, res: int | None = None, batch: int | None = None):
    """An ImageNetDataModule on the generated JPEGs with ``data.gpu_decode=mode`` (off: the FFCV loader).
    On the CPU (``--smoke``) the device path runs with ``device="cpu"``."""
    from datamodules.imagenet import ImageNetDataModule

    res, batch = res or args.res, batch or args.batch
    dm = ImageNetDataModule(root=str(root), backend="ffcv", batch_size=batch, num_workers=workers, train_res=res,
                            val_res=res, progress=False, gpu_decode=mode if device.type == "cuda" else "off")
    if device.type != "cuda" and mode != "off":  # smoke: the same loader with the device path on the CPU
        dm.hparams.gpu_decode = mode if mode != "auto" else 1.0
        dm.backend.decode_device = "cpu"
    return dm


def auto_kw(kw: dict) -> dict:
    """``auto`` decides after gpu_decode.AUTO_WARMUP + AUTO_WINDOW train batches: time the steps after that."""
    from datamodules import gpu_decode

    return {**kw, "warmup": max(kw["warmup"], gpu_decode.AUTO_WARMUP + gpu_decode.AUTO_WINDOW + 2)}


def split_of(dm) -> str:
    split = getattr(dm.backend, "split", None)
    return split.describe() if split is not None else "CPU path (FFCV Loader)"


def gpu_decode_child(args, rn50, device: torch.device, precision: str, workers: int) -> int:
    """1d's limited run (started under taskset): FFCV loader and GPU decode fits; figures to a JSON file."""
    import json

    from datamodules.folder import cache_root

    root = make_jpegs(cache_root() / f"gpu-bench-jpegs-{args.images}", args.images)
    out = {"cores": len(os.sched_getaffinity(0)), "workers": workers}
    kw = dict(steps=args.steps, warmup=args.warmup, device=device, precision=precision)
    for key, mode in (("ffcv", "off"), ("on", "on"), ("auto", "auto")):
        try:
            dm = decode_dm(root, mode, args, workers, device)
            out[key] = fit(rn50(), dm, **(auto_kw(kw) if mode == "auto" else kw)).rate
            out[f"{key}_split"] = split_of(dm)
        except Exception as e:
            out[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(f"limited run, {key}: {out.get(key, out.get(f'{key}_error'))}", flush=True)
        Path(args.taskset_child).write_text(json.dumps(out))
    return 0


def gpu_decode_part(args, argv, root, rn50, ceiling, real, device, precision, workers, cores, failed, show) -> list[str]:
    """1d: JPEG decoding on the device vs the FFCV loader, all cores and ``--taskset-cores``; ConvNeXt-T's step cost."""
    import json
    import subprocess
    import tempfile

    kw = dict(steps=args.steps, warmup=args.warmup, device=device, precision=precision)
    rows = [("FFCV loader (CPU decode)", cores, workers, real.rate, "CPU path (FFCV Loader)")]

    def table(extra: list[str]) -> list[str]:
        return [
            f"## JPEG decoding on the device (`data.gpu_decode`), ResNet-50, batch {args.batch}, {args.res} px",
            "",
            "| loader | cores | threads | img/s | of ceiling | split |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
            f"| uint8 tensors already on the device (ceiling) | {cores} | - | {ceiling.rate:.0f} | 1.00 | - |",
            *[f"| {n} | {c} | {w} | {r:.0f} | {r / ceiling.rate:.2f} | {sp} |" for n, c, w, r, sp in rows],
            "",
            *extra,
        ]

    for name, mode in (("GPU decode, every JPEG (`on`)", "on"), ("GPU decode, `auto`", "auto")):
        try:
            dm = decode_dm(root, mode, args, workers, device)
            rows.append((name, cores, workers, fit(rn50(), dm, **(auto_kw(kw) if mode == "auto" else kw)).rate, split_of(dm)))
            print(f"resnet50 {name}: {rows[-1][3]:.0f} img/s, {rows[-1][4]}", flush=True)
        except Exception as e:
            failed.append(f"ResNet-50 {name} failed: {type(e).__name__}: {str(e)[:300]}")
            print(failed[-1], flush=True)
        show(table([]))
    # the same under taskset, in a child process (affinity must hold for every thread from the start)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "limited.json"
        child = [sys.executable, str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:]),
                 "--taskset-child", str(result)]
        t = time.perf_counter()
        proc = subprocess.run(["taskset", "-c", args.taskset_cores, *child], capture_output=True, text=True)
        print(f"limited run ({args.taskset_cores}) rc={proc.returncode} in {time.perf_counter() - t:.0f} s", flush=True)
        got = json.loads(result.read_text()) if result.exists() else {}
        if proc.returncode or not got:
            failed.append(f"limited run failed (rc {proc.returncode}): {(proc.stderr or proc.stdout)[-300:]}")
        for key, name in (("ffcv", "FFCV loader (CPU decode)"), ("on", "GPU decode, every JPEG (`on`)"), ("auto", "GPU decode, `auto`")):
            if key in got:
                rows.append((f"{name}, `taskset -c {args.taskset_cores}`", got["cores"], got["workers"], got[key], got[f"{key}_split"]))
            elif f"{key}_error" in got:
                failed.append(f"limited run, {name}: {got[f'{key}_error']}")
    show(table([]))
    # ConvNeXt-T: the step with on-device batches, fed by the FFCV loader, fed by the GPU decode
    cres = 32 if args.smoke else 224
    cnx = lambda: __import__("zoo.base", fromlist=["ImageClassifier"]).ImageClassifier(  # noqa: E731
        arch="convnext_tiny", num_classes=10, channels_last=True, compile=device.type == "cuda", optimizer="adamw",
        lr=4e-3, lr_reference_batch=None, schedule="constant", label_smoothing=0.1)
    steps: dict[str, float] = {}
    for name, data in (("on-device batches (no loader)", None), ("FFCV loader", "off"), ("GPU decode (`on`)", "on")):
        try:
            d = (device_batches(args.steps + args.warmup, args.convnext_batch, cres, 10, device) if data is None
                 else decode_dm(root, data, args, workers, device, res=cres, batch=args.convnext_batch))
            steps[name] = fit(cnx(), d, **kw).step_ms
            print(f"convnext-t {name}: {steps[name]:.1f} ms/step", flush=True)
        except Exception as e:
            failed.append(f"ConvNeXt-T {name} failed: {type(e).__name__}: {str(e)[:300]}")
            print(failed[-1], flush=True)
    base = steps.get("FFCV loader", float("nan"))
    cnx_rows = [
        f"ConvNeXt-T, batch {args.convnext_batch}, {cres} px, no augmentation ({cores} cores, {workers} threads): "
        "step time by data source; both loaders sustain the model's rate, so the GPU decode's extra is what "
        "decoding and resampling on the device cost the step.",
        "",
        "| data | step (ms) | vs FFCV loader |",
        "| --- | ---: | ---: |",
        *[f"| {k} | {v:.1f} | {100 * (v / base - 1):+.1f}% |" for k, v in steps.items()],
        "",
    ]
    lines = table(cnx_rows)
    show(lines)
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of every path")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--res", type=int, default=176, help="ResNet-50 train resolution (recipes ramp 160 -> 192)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=15, help="steps before timing (includes torch.compile)")
    ap.add_argument("--images", type=int, default=12800, help="generated train JPEGs")
    ap.add_argument("--workers", type=int, default=None, help="FFCV threads (default: cores - 1)")
    ap.add_argument("--convnext-batch", type=int, default=128)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device's dense bf16 peak, for MFU")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rounds", type=int, default=1, help="fits per ConvNeXt-T configuration (median reported)")
    ap.add_argument("--skip-convnext", action="store_true", help="only the ResNet-50 part")
    ap.add_argument("--configs", default="plain,grouped,masked,ema,masked+ema",
                    help="ConvNeXt-T configurations to fit (of plain, grouped, masked, ema, masked+ema)")
    ap.add_argument("--skip-resnet50", action="store_true", help="only the ConvNeXt-T part and the sync audit")
    ap.add_argument("--skip-dct", action="store_true", help="ResNet-50 part without the DCT-scaled fit and loader")
    ap.add_argument("--gpu-decode", action="store_true", help="ResNet-50 part: also JPEG decoding on the device (1d)")
    ap.add_argument("--taskset-cores", default="0-3", help="--gpu-decode: the cores of the limited run (taskset -c)")
    ap.add_argument("--taskset-child", default=None, help=argparse.SUPPRESS)  # JSON path: the limited run's figures
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.res, args.steps, args.warmup, args.images, args.convnext_batch = 8, 32, 3, 1, 64, 4
        args.taskset_cores = "0"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    compile_ = device.type == "cuda"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = args.workers or max(1, cores - 1)
    load0 = os.getloadavg()[0]
    from zoo.base import ImageClassifier

    classes = 10
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def rn50():
        return ImageClassifier(arch="resnet50", num_classes=classes, channels_last=True, compile=compile_,
                               lr=0.1, lr_reference_batch=None, schedule="constant", label_smoothing=0.1)

    if args.taskset_child:  # 1d's limited run, in its own process under taskset
        return gpu_decode_child(args, rn50, device, precision, workers)

    rn50_lines: list[str] = []
    cnx_lines: list[str] = []
    decode_lines: list[str] = []
    failed: list[str] = []  # informative parts that failed, reported instead of lost
    out = args.out or str(Path(__file__).resolve().parent / "results" / ("gpu-smoke.md" if args.smoke else "gpu.md"))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run: not a GPU figure)"
    cmd = "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def report(final: bool = False) -> None:
        """Write the tables so far (a run stopped by a time limit keeps its finished parts)."""
        lines = [
            f"# GPU path: {dev_name}",
            "",
            machine_line(device, load0, f"{cores} CPU cores; {versions()}; {workers} FFCV threads, {args.steps} "
                         f"timed steps after {args.warmup} warm-up, precision {precision}, compile {compile_}"),
            f"Command: `{cmd.strip()}`",
            "",
            *rn50_lines,
            *decode_lines,
            *cnx_lines,
            *([f"- {f}" for f in failed] + [""] if failed else []),
            *([] if final else ["(partial: the run had not finished when this was written)", ""]),
        ]
        if final:
            write_result(out, lines)
        else:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text("\n".join(lines) + "\n")
    if not args.skip_resnet50:
        # 1a. ceiling: batches already on the device
        ceiling = fit(rn50(), device_batches(args.steps + args.warmup, args.batch, args.res, classes, device),
                      steps=args.steps, warmup=args.warmup, device=device, precision=precision)
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        print(f"resnet50 ceiling: {ceiling.rate:.0f} img/s", flush=True)
        # 1b. the real FFCV loader on generated JPEGs
        from datamodules.folder import cache_root
        from datamodules.imagenet import ImageNetDataModule

        t = time.perf_counter()
        root = make_jpegs(cache_root() / f"gpu-bench-jpegs-{args.images}", args.images)
        print(f"JPEGs ready in {time.perf_counter() - t:.0f} s", flush=True)
        dm = ImageNetDataModule(root=str(root), backend="ffcv", batch_size=args.batch, num_workers=workers,
                                train_res=args.res, val_res=args.res, progress=False)
        t = time.perf_counter()
        real = fit(rn50(), dm, steps=args.steps, warmup=args.warmup, device=device, precision=precision)
        print(f"resnet50 ffcv loader: {real.rate:.0f} img/s (fit incl. .beton write and compile: "
              f"{time.perf_counter() - t:.0f} s)", flush=True)
        # 1b'. the same with decode-time DCT scaling (an opt-in DataModule option); 1c. the loader alone
        # (no model): the decode capacity of these cores, full and DCT-scaled. Informative: a failure
        # here must not lose the figures above.
        real_dct, capacity = None, {}
        try:
            if not args.skip_dct:
                dm_dct = ImageNetDataModule(root=str(root), backend="ffcv", batch_size=args.batch, num_workers=workers,
                                            train_res=args.res, val_res=args.res, progress=False, dct_scaling=True)
                real_dct = fit(rn50(), dm_dct, steps=args.steps, warmup=args.warmup, device=device, precision=precision)
                print(f"resnet50 ffcv loader, DCT-scaled decode: {real_dct.rate:.0f} img/s", flush=True)
            for dct in (False,) if args.skip_dct else (False, True):
                capacity[dct] = loader_rate(dm.beton_path("train"), args.res, args.batch, workers, dct)
            capacity["whole"] = loader_rate(dm.beton_path("train"), args.res, args.batch, workers, False, crop=False)
            print(f"loader alone: {capacity[False]:.0f} img/s, "
                  + (f"DCT-scaled {capacity[True]:.0f} img/s, " if True in capacity else "")
                  + f"whole-image decode {capacity['whole']:.0f} img/s", flush=True)
        except Exception as e:
            failed.append(f"ResNet-50 DCT-scaled fit / loader alone failed: {type(e).__name__}: {str(e)[:300]}")
            print(failed[-1], flush=True)
        flops = train_flops_per_image("resnet50", args.res, classes)
        peak = peak_tflops(device, args.peak_tflops)
        mfu = lambda rate: f"{100 * rate * flops / (peak * 1e12):.1f}%" if peak else "n/a"  # noqa: E731

        rn50_lines = [
            f"## ResNet-50, batch {args.batch}, {args.res} px, channels_last, cudnn.benchmark",
            "",
            "| input | img/s | of ceiling | MFU |",
            "| --- | ---: | ---: | ---: |",
            f"| uint8 tensors already on the device (ceiling) | {ceiling.rate:.0f} | 1.00 | {mfu(ceiling.rate)} |",
            f"| FFCV loader, {args.images} generated JPEGs (~500x375, q90) | {real.rate:.0f} | {real.rate / ceiling.rate:.2f} | {mfu(real.rate)} |",
            *([f"| same, decode-time DCT scaling (`--data.dct_scaling true`) | {real_dct.rate:.0f} | {real_dct.rate / ceiling.rate:.2f} | {mfu(real_dct.rate)} |"]
              if real_dct else []),
            "",
            *([f"The loader alone ({workers} threads, no model, one epoch after a warm-up epoch): "
               f"{capacity[False]:.0f} img/s ({capacity[False] / ceiling.rate:.2f} of the ceiling); "
               + (f"with decode-time DCT scaling {capacity[True]:.0f} img/s ({capacity[True] / ceiling.rate:.2f}); "
                  if True in capacity else "")
               + f"decoding whole JPEGs instead of the crop's region {capacity['whole']:.0f} img/s "
               f"({capacity['whole'] / ceiling.rate:.2f}).", ""]
              if False in capacity and "whole" in capacity else []),
            f"Peak device memory (ceiling run): {peak_mem:.1f} GiB. Training FLOPs per image at {args.res} px: "
            f"{flops / 1e9:.1f} GFLOP (torch.utils.flop_counter, fwd + bwd); peak {peak or 'unknown'} TFLOP/s bf16.",
            "",
        ]
        report()
        if args.gpu_decode:
            try:
                decode_lines = gpu_decode_part(args, argv, root, rn50, ceiling, real, device, precision, workers, cores,
                                               failed, lambda lines: (decode_lines.clear(), decode_lines.extend(lines), report()))
            except Exception as e:
                failed.append(f"GPU decode part failed: {type(e).__name__}: {str(e)[:300]}")
                print(failed[-1], flush=True)
            report()

    if not args.skip_convnext:
        # 2. ConvNeXt-T: plain, + device augmentation (the previous grouped path, the masked compiled one), + EMA
        from callbacks.ema import WeightEMA

        cres = 32 if args.smoke else 224
        aug_kw = dict(auto_augment="rand-m9-mstd0.5-inc1", mixup_alpha=0.8, cutmix_alpha=1.0, random_erasing=0.25)

        def cnx(aug: bool, impl: str = "auto", aug_compile: bool | None = None):
            m = ImageClassifier(arch="convnext_tiny", num_classes=classes, channels_last=True, compile=compile_,
                                optimizer="adamw", lr=4e-3, lr_reference_batch=None, schedule="constant",
                                label_smoothing=0.1, **(aug_kw if aug else {}))
            if aug:  # the augmentation's variants, on the same machine: grouped = the path before the masked one
                m.augment.auto.impl = impl
                m.augment.compile = m.augment.auto.compile = compile_ if aug_compile is None else aug_compile
            return m

        cdata = device_batches(args.steps + args.warmup, args.convnext_batch, cres, classes, device)
        t = time.perf_counter()
        kw = dict(steps=args.steps, warmup=args.warmup, device=device, precision=precision)
        with_ema = lambda: [WeightEMA(decay=0.9999)]  # noqa: E731
        plans = {  # key: (name, model, callbacks of each fit)
            "plain": ("no augmentation, no EMA", lambda: cnx(False), list),
            "grouped": ("device augmentation, grouped RandAugment, eager (before)", lambda: cnx(True, "grouped", False), list),
            "masked": (f"device augmentation, masked{', compiled' if compile_ else ''} (after)", lambda: cnx(True), list),
            "ema": ("no augmentation + EMA", lambda: cnx(False), with_ema),
            "masked+ema": ("device augmentation (after) + EMA", lambda: cnx(True), with_ema),
        }
        chosen = args.configs.split(",")
        unknown = set(chosen) - set(plans)
        if unknown:
            raise SystemExit(f"--configs: unknown {sorted(unknown)}; choose from {', '.join(plans)}")
        plans = {name: (make(), cbs) for key, (name, make, cbs) in plans.items() if key in chosen}
        # --rounds fits of every configuration, each round on the same five models (a model compiles
        # in its first fit's warm-up steps, later fits reuse it); round r starts r places further down
        # the list, so no configuration always runs first or last. Between fits the previous trainer is
        # collected and the allocator's cache emptied; each fit's peak memory is recorded.
        runs: dict[str, list] = {name: [] for name in plans}
        peaks: dict[str, float] = {}
        names = list(plans)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                try:  # one failing variant must not lose the others' figures
                    model, callbacks = plans[name]
                    runs[name].append(fit(model, cdata, **kw, callbacks=callbacks()).step_ms)
                    if device.type == "cuda":
                        peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
                except Exception as e:
                    failed.append(f"{name} (round {r + 1}) failed: {type(e).__name__}: {str(e)[:300]}")
                    print(failed[-1], flush=True)
            print(f"convnext round {r + 1}: {', '.join(f'{k} {v[-1]:.1f} ms' for k, v in runs.items() if v)} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
        runs = {k: v for k, v in runs.items() if v}
        del plans
        step = {k: statistics.median(v) for k, v in runs.items()}
        plain_step = step.get("no augmentation, no EMA", float("nan"))
        step_lines = [
            f"## ConvNeXt-T, batch {args.convnext_batch}, {cres} px (recipe: RandAugment rand-m9-mstd0.5-inc1, erasing 0.25, mixup 0.8 / cutmix 1.0, EMA 0.9999)",
            "",
            f"Step time: mean over {args.steps} timed steps of one fit; median over {args.rounds} fits per configuration "
            "(the same model re-fitted in each round, configurations rotated between rounds).",
            "",
            "| configuration | step (ms), median | vs plain | fits (ms) | img/s | peak memory (GiB) |",
            "| --- | ---: | ---: | --- | ---: | ---: |",
            *[f"| {k} | {step[k]:.1f} | {100 * (step[k] / plain_step - 1):+.1f}% | {', '.join(f'{v:.1f}' for v in vs)} | "
              f"{args.convnext_batch * 1e3 / step[k]:.0f} | {peaks.get(k, float('nan')):.1f} |" for k, vs in runs.items()],
            "",
            *(f"Step cost of the augmentation: {name}: {100 * (step[name] / plain_step - 1):+.1f}% of the plain step "
              "(goal <= 5%)." for name in runs if name.startswith("device augmentation,")),
            "",
        ]
        cnx_lines = step_lines
        report()
        # the augmentation alone on one batch, per variant: wall time synchronised, host time to return
        # (what a step pays when the GPU is ahead), and on a GPU kernels and GPU-busy time per call
        x, y = cdata[0]
        variants = {"grouped, eager (before)": ("grouped", False)}
        if compile_:
            variants["masked, compiled (after)"] = ("masked", True)
        else:
            variants["masked, eager (after)"] = ("masked", False)
        aug_rows = []
        breakdown: list[str] = []
        for name, (impl, comp) in variants.items():
            try:
                *row, top = time_augmentation(cnx(True, impl, comp).to(device), x, y, steps=args.steps,
                                              warmup=args.warmup, device=device)
                aug_rows.append((name, *row))
                if top:
                    breakdown += [f"Where the time goes, {name} (5 profiled calls, per call):", "", *top, ""]
                print(f"augmentation {name}: {aug_rows[-1]}", flush=True)
            except Exception as e:  # one failing variant must not lose the others' figures
                failed.append(f"augmentation alone, {name}, failed: {type(e).__name__}: {str(e)[:300]}")
                print(failed[-1], flush=True)
        # the EMA update alone (every parameter and float buffer of ConvNeXt-T, one _foreach_lerp_)
        try:
            m = cnx(False).to(device)
            ema = WeightEMA(decay=0.9999)
            ema.ema = {k: v.detach().clone() for k, v in ema._tracked(m).items()}
            *row, top = time_call(lambda: ema.update(m), steps=args.steps, warmup=args.warmup, device=device)
            aug_rows.append(("EMA update alone (WeightEMA.update, decay 0.9999)", *row))
            if top:
                breakdown += ["Where the time goes, the EMA update (5 profiled calls, per call):", "", *top, ""]
            print(f"EMA update: {aug_rows[-1]}", flush=True)
            del m, ema
        except Exception as e:
            failed.append(f"EMA update alone failed: {type(e).__name__}: {str(e)[:300]}")
            print(failed[-1], flush=True)
        aug_lines = [
            "Device augmentation alone, one batch (RandAugment + uint8->float normalisation + erasing + mixup/cutmix), "
            f"and the EMA update alone; median of {args.steps} calls:",
            "",
            "| variant | wall, synchronised (ms) | % of plain step | host time to return (ms) | GPU kernels per call | GPU busy (ms) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *[f"| {n} | {w:.2f} | {100 * w / plain_step:.1f}% | {h:.2f} | {k:.0f} | {b:.2f} |" for n, w, h, k, b in aug_rows],
            "",
        ]

        cnx_lines = [*step_lines, *aug_lines, *breakdown]
        report()
        # 3. host-device syncs per step, eager (no compile), the recipe's full hot path
        syncs_lines = []
        if device.type == "cuda":
            audit_steps = 5
            eager = ImageClassifier(arch="convnext_tiny", num_classes=classes, channels_last=True, compile=False,
                                    optimizer="adamw", lr=4e-3, lr_reference_batch=None, schedule="constant",
                                    label_smoothing=0.1, **aug_kw)
            try:
                counts = sync_audit(eager, cdata[: audit_steps + 2], steps=audit_steps, warmup=2, device=device,
                                    precision=precision, callbacks=[WeightEMA(decay=0.9999)])
                total = sum(counts.values())
                syncs_lines = [f"## Host-device synchronisations per training step (ConvNeXt-T eager, augmentation + EMA, "
                               f"{audit_steps} steps, torch.cuda.set_sync_debug_mode)", "",
                               f"{total / audit_steps:.1f} per step in all.", "", "| where | per step |", "| --- | ---: |",
                               *[f"| `{k}` | {v / audit_steps:.1f} |" for k, v in counts.most_common(15)], ""]
            except Exception as e:  # the audit is informative: never lose the tables above to it
                syncs_lines = [f"Sync audit failed: {type(e).__name__}: {e}", ""]
            print("\n".join(syncs_lines), flush=True)

        cnx_lines = [*step_lines, *aug_lines, *breakdown, *syncs_lines]
    report(final=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
