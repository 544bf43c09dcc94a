"""`zoo fit` against the training scripts a user would pick instead: timm's ``train.py`` and
torchvision's ``references/classification/train.py``, the same recipe, the same ImageFolder,
whole processes (start-up, data preparation, checkpoints and logging included), on the CPU.

    python benchmarks/peers.py --timm-train PATH/train.py \\
        --torchvision-train PATH/references/classification/train.py [--runs 2] [--models resnet18,convnext_tiny]
    zoo bench peers --timm-train ... --torchvision-train ...

Neither script ships in its pip package: clone the repository at the tag of the installed
version (benchmarks/README.md). The data is scikit-learn's handwritten digits (1,797 8x8
scans, shipped in the package: no download) written once as a 32 px RGB PNG ImageFolder,
1,500 train / 297 val, split by a fixed permutation.

The recipe (one for every tool): batch 64, 15 epochs, cosine to 0 without warm-up, no label
smoothing, no flip, RandomResizedCrop scale (0.35, 1) at 32 px, val crop ratio 1.0 at 32 px,
2 loader workers, seed 0, no weight decay on norms and biases; ResNet-18: SGD nesterov lr 0.1,
momentum 0.9, wd 5e-4; ConvNeXt-T: AdamW lr 1e-3, wd 0.05, no stochastic depth. What a
script's command line cannot say (torchvision's reference has no seed, crop-scale, flip or
stochastic-depth option) is set by a small launcher that patches those defaults and runs the
script unchanged (``_TV_LAUNCHER``). Differences that remain between the tools (schedule
stepped per step in zoo, per epoch in the peers; each tool's own model builder and resize
kernel) are listed under the table.

Runs are interleaved (each round runs every tool once per model, the tool order rotating per
round) and the table gives medians over rounds: the machine is shared with other work. The
final epoch's val top-1 is reported (not the best epoch), as each tool computes it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._common import machine_line, write_result  # noqa: E402

EPOCHS = 15
BATCH = 64
RES = 32
SCALE = (0.35, 1.0)
WORKERS = 2
SEED = 0
# model -> optimizer recipe (lr at batch 64, as given; no scaling)
RECIPES = {
    "resnet18": dict(opt="sgd", lr=0.1, momentum=0.9, wd=5e-4),
    "convnext_tiny": dict(opt="adamw", lr=1e-3, wd=0.05),
}


# ---------------------------------------------------------------------------- data
def digits_folder(root: Path, res: int = RES, n_train: int = 1500) -> Path:
    """scikit-learn's digits as ``root/{train,val}/<digit>/<i>.png`` (RGB, ``res`` px, bilinear
    upscaling of the 8x8 scans, 0..16 mapped to 0..255). Written once; reused when complete."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    done = root / ".complete"
    if done.is_file():
        return root
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    for rank, i in enumerate(order):
        split = "train" if rank < n_train else "val"
        d = root / split / str(int(digits.target[i]))
        d.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray((digits.images[i] * (255 / 16)).round().astype(np.uint8))
        img.resize((res, res), Image.BILINEAR).convert("RGB").save(d / f"{i:04d}.png")
    done.write_text(f"{len(order)} images\n")
    return root


# ---------------------------------------------------------------------------- commands
_TV_LAUNCHER = '''\
"""Runs torchvision's references/classification/train.py unchanged, with the recipe's seed,
RandomResizedCrop scale, flip probability and stochastic depth, which it has no option for."""
import functools, random, runpy, sys
import numpy as np, torch, torchvision
from torchvision import transforms as T1
from torchvision.transforms import v2 as T2

script, scale, hflip, drop_path, seed = sys.argv[1], tuple(map(float, sys.argv[2].split(","))), \\
    float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
sys.argv = [script] + sys.argv[6:]
sys.path.insert(0, script.rsplit("/", 1)[0])
random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)
for mod in (T1, T2):
    mod.RandomResizedCrop = functools.partial(mod.RandomResizedCrop, scale=scale)
import presets
_init = presets.ClassificationPresetTrain.__init__
presets.ClassificationPresetTrain.__init__ = lambda self, *a, **k: _init(self, *a, **{**k, "hflip_prob": hflip})
_get_model = torchvision.models.get_model
def get_model(name, **kw):
    if name.startswith("convnext"):
        kw["stochastic_depth_prob"] = drop_path
    return _get_model(name, **kw)
torchvision.models.get_model = get_model
runpy.run_path(script, run_name="__main__")
'''


def zoo_config(model: str, data: Path, out: Path) -> Path:
    """The recipe as a `zoo fit` config file (every field given, so no default recipe applies)."""
    r = RECIPES[model]
    opt = {"optimizer": r["opt"], "lr": r["lr"], "lr_reference_batch": None, "weight_decay": r["wd"],
           "norm_weight_decay": 0.0, "schedule": "cosine", "warmup_epochs": 0, "label_smoothing": 0.0}
    if r["opt"] == "sgd":
        opt.update(momentum=r["momentum"], nesterov=True)
    cfg = {
        "seed_everything": SEED,
        "trainer": {"max_epochs": EPOCHS, "accelerator": "cpu", "devices": 1, "precision": "32-true"},
        "model": {"arch": model, **opt},
        # 32 px PNGs stored raw (no JPEG round trip, as the peers read the PNGs)
        "data": {"root": str(data), "backend": "ffcv", "batch_size": BATCH, "num_workers": WORKERS,
                 "train_res": RES, "val_res": RES, "val_crop_ratio": 1.0, "scale": list(SCALE), "flip": 0.0,
                 "max_resolution": RES, "compress_probability": 0.0, "beton_dir": str(out / "beton")},
    }
    path = out / "zoo.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return path


def zoo_cmd(model: str, data: Path, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "fit", "--config", str(zoo_config(model, data, out)),
            "--run.root", str(out), "--run.name", "zoo", *extra]


def timm_cmd(script: Path, model: str, data: Path, out: Path) -> list[str]:
    r = RECIPES[model]
    cmd = [sys.executable, str(script), "--data-dir", str(data), "--train-split", "train", "--val-split", "val",
           "--model", model, "--num-classes", "10", "--device", "cpu", "--no-prefetcher",
           "--img-size", str(RES), "--crop-pct", "1.0", "--scale", str(SCALE[0]), str(SCALE[1]),
           "--hflip", "0", "--color-jitter", "0", "--smoothing", "0", "--reprob", "0",
           "--train-interpolation", "bilinear", "--interpolation", "bilinear",
           "--opt", "sgd" if r["opt"] == "sgd" else "adamw",  # timm's "sgd" is nesterov
           "--lr", str(r["lr"]), "--weight-decay", str(r["wd"]), "-b", str(BATCH), "--epochs", str(EPOCHS),
           "--sched", "cosine", "--min-lr", "0", "--warmup-epochs", "0", "--cooldown-epochs", "0",
           "--workers", str(WORKERS), "--seed", str(SEED), "--output", str(out), "--experiment", "timm",
           "--log-interval", "50"]
    if r["opt"] == "sgd":
        cmd += ["--momentum", str(r["momentum"])]
    return cmd


def tv_cmd(launcher: Path, script: Path, model: str, data: Path, out: Path) -> list[str]:
    r = RECIPES[model]
    cmd = [sys.executable, str(launcher), str(script), f"{SCALE[0]},{SCALE[1]}", "0", "0", str(SEED),
           "--data-path", str(data), "--model", model, "--device", "cpu", "-b", str(BATCH),
           "--epochs", str(EPOCHS), "-j", str(WORKERS),
           "--opt", "sgd_nesterov" if r["opt"] == "sgd" else "adamw",
           "--lr", str(r["lr"]), "--wd", str(r["wd"]), "--norm-weight-decay", "0", "--bias-weight-decay", "0",
           "--lr-scheduler", "cosineannealinglr", "--lr-warmup-epochs", "0", "--lr-min", "0",
           "--label-smoothing", "0", "--train-crop-size", str(RES), "--val-resize-size", str(RES),
           "--val-crop-size", str(RES), "--output-dir", str(out), "--print-freq", "50"]
    if r["opt"] == "sgd":
        cmd += ["--momentum", str(r["momentum"])]
    return cmd


# ---------------------------------------------------------------------------- results
def zoo_top1(log: str) -> float | None:
    """The final epoch's val/acc1, as `zoo fit` prints it at the end."""
    found = re.findall(r"^val/acc1: ([0-9.]+)", log, flags=re.M)
    return float(found[-1]) if found else None


def timm_top1(out: Path) -> float | None:
    import csv

    for f in out.rglob("summary.csv"):
        rows = list(csv.DictReader(f.open()))
        if rows:
            return float(rows[-1]["eval_top1"]) / 100
    return None


def tv_top1(log: str) -> float | None:
    found = re.findall(r"Acc@1 ([0-9.]+)", log)
    return float(found[-1]) / 100 if found else None


# Where each tool prints its first training batch and the end of each epoch (validation
# included): the marks that split a run's wall time into start-up, per-epoch loop and tail.
MARKS = {
    "zoo": (r"^epoch 0 .*batch 1/", r"^epoch \d+ .*done in"),  # callbacks/progress.py's plain lines
    "timm": (r"^Train: 0 \[\s*0/", r"^Test: \[\s*(\d+)/\1\]"),  # --log-interval lines; last eval batch
    "torchvision": (r"^Epoch: \[0\]\s+\[\s*0/", r"Acc@1 [0-9.]+ Acc@5"),  # MetricLogger; the epoch's summary
}


def phases(tool: str, stamped: list[tuple[float, str]], wall: float) -> dict[str, float | None]:
    """Seconds from process start to the first training batch's line, the mean seconds per epoch
    after the first (epoch end to epoch end: training and validation), and seconds after the last
    epoch's end (final checkpoint, reports, exit): None where a mark is missing."""
    first_re, end_re = (re.compile(m) for m in MARKS[tool])
    first = next((t for t, line in stamped if first_re.search(line)), None)
    ends = [t for t, line in stamped if end_re.search(line)]
    per_epoch = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else None
    return {"first_batch": first, "per_epoch": per_epoch, "tail": wall - ends[-1] if ends else None}


def run_one(cmd: list[str], out: Path, env: dict, timeout: float) -> tuple[float, float, str, int, list]:
    """Wall seconds, CPU seconds (user + system of the process and the children it waited for:
    loader workers included; what the run cost the machine, less skewed by other work), output,
    rc, and each output line with the seconds since start when it arrived (the tools run with
    PYTHONUNBUFFERED, so a line arrives when it is printed). log.txt keeps the stamped lines."""
    import resource
    import threading

    out.mkdir(parents=True, exist_ok=True)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stamped: list[tuple[float, str]] = []

    def read() -> None:
        for line in p.stdout:
            stamped.append((time.perf_counter() - t0, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    reader.join(10)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    (out / "log.txt").write_text("".join(f"{t:8.2f}  {line}\n" for t, line in stamped))
    return wall, cpu, "\n".join(line for _, line in stamped), p.returncode, stamped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timm-train", type=Path, help="timm's train.py (git clone of pytorch-image-models)")
    ap.add_argument("--torchvision-train", type=Path, help="torchvision's references/classification/train.py")
    ap.add_argument("--models", default="resnet18,convnext_tiny")
    ap.add_argument("--runs", type=int, default=2, help="rounds; the table gives medians")
    ap.add_argument("--data", type=Path, default=None, help="default: $ZOO_DATA_DIR (or /tmp)/zoo-digits32")
    ap.add_argument("--zoo-variant", action="append", default=[], metavar="LABEL=ARGS",
                    help="another zoo row: LABEL=extra `zoo fit` arguments (shell-quoted), e.g. "
                         "zero-init=--model.arch_args '{\"zero_init_residual\": true}'")
    ap.add_argument("--zoo-repo", type=Path, default=REPO, help="checkout whose `zoo fit` runs (before/after)")
    ap.add_argument("--tools", default="zoo,timm,torchvision")
    ap.add_argument("--work", type=Path, default=None, help="run directories (deleted after each run)")
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--epochs", type=int, default=EPOCHS, help="the recipe's 15; fewer for a smoke test")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "peers.md"))
    args = ap.parse_args(argv)
    globals()["EPOCHS"] = args.epochs

    tools = args.tools.split(",")
    if "timm" in tools and not (args.timm_train and args.timm_train.is_file()):
        print("error: give --timm-train PATH/train.py (benchmarks/README.md: 'peers'), or --tools without timm",
              file=sys.stderr)
        return 2
    if "torchvision" in tools and not (args.torchvision_train and args.torchvision_train.is_file()):
        print("error: give --torchvision-train PATH/references/classification/train.py (benchmarks/README.md: "
              "'peers'), or --tools without torchvision", file=sys.stderr)
        return 2
    data = args.data or Path(os.environ.get("ZOO_DATA_DIR", tempfile.gettempdir())) / "zoo-digits32"
    digits_folder(data)
    work = args.work or Path(tempfile.mkdtemp(prefix="zoo-peers-"))
    launcher = work / "tv_launcher.py"
    work.mkdir(parents=True, exist_ok=True)
    launcher.write_text(_TV_LAUNCHER)

    variants: list[tuple[str, list[str]]] = []
    if "zoo" in tools:
        variants.append(("zoo", []))
        for v in args.zoo_variant:
            label, _, rest = v.partition("=")
            variants.append((f"zoo {label}", shlex.split(rest)))
    env = dict(os.environ, PYTHONPATH=str(args.zoo_repo.resolve()), WANDB_MODE="offline",
               WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    rows: dict[tuple[str, str], dict] = {}
    models = args.models.split(",")
    t_start = time.time()
    load0 = os.getloadavg()[0]
    for rnd in range(args.runs):
        for model in models:
            entries = list(variants)
            if "timm" in tools:
                entries.append(("timm train.py", None))
            if "torchvision" in tools:
                entries.append(("torchvision references", None))
            k = rnd % len(entries)
            entries = entries[k:] + entries[:k]  # rotate the order between rounds
            for label, extra in entries:
                out = work / f"{model}-{label.replace(' ', '_')}-{rnd}"
                tool = label.split()[0]  # zoo (and its variants), timm or torchvision
                if tool == "zoo":
                    cmd = zoo_cmd(model, data, out, extra)
                elif tool == "timm":
                    cmd = timm_cmd(args.timm_train.resolve(), model, data, out)
                else:
                    cmd = tv_cmd(launcher, args.torchvision_train.resolve(), model, data, out)
                wall, cpu, log, rc, stamped = run_one(cmd, out, env, args.timeout)
                ph = phases(tool, stamped, wall)
                if tool == "zoo":
                    top1 = zoo_top1(log)
                elif tool == "timm":
                    top1 = timm_top1(out)
                else:
                    top1 = tv_top1(log)
                r = rows.setdefault((model, label), {"walls": [], "cpus": [], "top1": [], "cmd": cmd, "rc": [],
                                                      "first_batch": [], "per_epoch": [], "tail": []})
                for k, v in ph.items():
                    r[k].append(v)
                r["walls"].append(wall)
                r["cpus"].append(cpu)
                r["top1"].append(top1)
                r["rc"].append(rc)
                print(f"round {rnd} {model:14s} {label:24s} rc {rc} wall {wall:7.1f} s cpu {cpu:7.1f} s top-1 {top1}  "
                      + "  ".join(f"{k} {v:.1f} s" if v is not None else f"{k} n/a" for k, v in ph.items()), flush=True)
                if rc:
                    print("\n".join(log.splitlines()[-15:]), file=sys.stderr)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)

    def fmt_median(vals, digits):
        vals = [v for v in vals if v is not None]
        return f"{statistics.median(vals):.{digits}f}" if vals else "n/a"

    lines = [
        "# zoo fit vs timm's and torchvision's training scripts (CPU)",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
        + machine_line("cpu", load0, f"shared with other work; {args.runs} interleaved rounds, medians"),
        "",
        f"Command: `python benchmarks/peers.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        f"Data: scikit-learn's digits, {RES} px RGB PNG ImageFolder, 1,500 train / 297 val. Recipe: batch {BATCH}, "
        f"{EPOCHS} epochs, cosine to 0, no warm-up, no label smoothing, no flip, RandomResizedCrop scale {SCALE}, "
        f"val crop 1.0, {WORKERS} workers, seed {SEED}, no wd on norms/biases; resnet18: SGD nesterov lr 0.1 "
        "m 0.9 wd 5e-4; convnext_tiny: AdamW lr 1e-3 wd 0.05, no drop path.",
        "",
        "Wall time split by the lines each tool prints (`MARKS`): start to its first training batch, "
        "seconds per epoch after the first (training and validation), and after the last epoch's end.",
        "",
        "| model | tool | val top-1 (final epoch, median) | wall s (whole process, median) | CPU s (median) "
        "| start -> first batch s | s per epoch | after last epoch s | runs (wall s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for (model, label), r in rows.items():
        fails = sum(1 for c in r["rc"] if c)
        walls = ", ".join(f"{w:.0f}" for w in r["walls"])
        lines.append(f"| {model} | {label} | {fmt_median(r['top1'], 3)} | {statistics.median(r['walls']):.0f} | {statistics.median(r['cpus']):.0f} "
                     f"| {fmt_median(r['first_batch'], 1)} | {fmt_median(r['per_epoch'], 1)} | {fmt_median(r['tail'], 1)} | {walls}"
                     + (f" ({fails} failed)" if fails else "") + " |")
    lines += ["", "Commands (round 0):", ""]
    for (model, label), r in rows.items():
        cmd = " ".join(shlex.quote(str(c)) for c in r["cmd"]).replace(str(work), "$WORK")
        lines.append(f"- {model}, {label}: `{cmd}`")
    lines += ["", f"Total {time.time() - t_start:.0f} s."]
    write_result(args.out, lines)
    return 0 if all(not any(r["rc"]) for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
