"""`zoo gradcheck MODEL` and `zoo init-stats MODEL`: the model-level checks of zoo/model_checks.py
as commands, with a table on stdout, a CSV and (init-stats) a PNG plot.

    zoo gradcheck mlp                       # small float64 instance, 3 entries per tensor
    zoo gradcheck convnet --model.arch_args '{"widths": [4, 8], "skip": true}' --threshold 1e-4
    zoo init-stats mlp --model.arch_args '{"depth": 6, "width": 256, "input_size": 32}'
    zoo init-stats convnet --input_size 64
    zoo init-stats mlp --model.arch_args '{"activation": "sigmoid", "input_size": 32}'   # saturation shown
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from zoo import model_checks
from zoo.registry import UnknownModelError

from launch.flags import deprecated

# the spellings before one flag style (launch/flags.py): accepted with a deprecation line
RENAMED = {"--arch-args": ("--model.arch_args",), "--num-classes": ("--model.num_classes",),
           "--input-size": ("--input_size",), "--out": ("--out_dir",), "--per-tensor": ("--per_tensor",),
           "--batch-size": ("--batch_size",)}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="registry name (zoo models lists them) or a checkpoint of a zoo run: its architecture at the eval size it records (gradcheck: its trained weights); or --model.arch")
    p.add_argument("--model.arch", dest="arch", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model.arch_args", dest="arch_args", default="{}",
                   help="JSON architecture arguments, e.g. '{\"depth\": 4}'")
    p.add_argument("--model.num_classes", dest="num_classes", type=int, default=10)
    p.add_argument("--input_size", type=int, default=None, help="image side (fixed-input nets: their input_size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=None, help="output directory (default runs/<command>/<model>/<time>)")


def _parse(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args = p.parse_args(argv)
    if (args.model is None) == (args.arch is None):
        p.error("give the architecture once: zoo {} MODEL (or --model.arch MODEL)".format(p.prog.split()[-1]))
    args.model = args.model or args.arch
    return args


def _arch_args(text: str) -> dict:
    try:
        args = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: --model.arch_args is not JSON ({e.msg}); write e.g. '{{\"depth\": 4}}'")
    if not isinstance(args, dict):
        raise SystemExit("error: --model.arch_args must be a JSON object, e.g. '{\"depth\": 4}'")
    return args


def _out_dir(args, command: str) -> Path:
    name = getattr(args, "arch", None) or args.model
    out = Path(args.out_dir) if args.out_dir else Path("runs") / command / name.replace("/", "_") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    return out.resolve()


def _from_checkpoint(args, small: bool):
    """``args.model`` is a checkpoint: its architecture (arch_args, classes) at the eval size it
    records (``zoo_data_config``: what it was trained and evaluated at); gradcheck checks its
    trained weights, init-stats a fresh initialisation of the same network."""
    from zoo import load
    from zoo.registry import create_network
    from zoo.weights import WeightsError

    try:
        model = load(weights=args.model)
    except (WeightsError, UnknownModelError) as e:
        raise SystemExit(f"error: {e}")
    hp, size = model.hparams, int(model.data_config["input_size"])
    if args.input_size is not None and args.input_size != size:
        print(f"zoo: checking {args.model} at --input_size {args.input_size} px instead of the recorded eval size "
              f"{size} px (leave --input_size out to use what it was trained and evaluated at)")
        size = args.input_size
    args.arch, args.num_classes = hp.arch, int(hp.num_classes)
    arch_args = {**dict(hp.arch_args or {}), **_arch_args(args.arch_args)}
    net = model.net if small else create_network(hp.arch, num_classes=args.num_classes, **arch_args)
    return net, (int(arch_args.get("in_chans", 3)), size, size)


def _build(args, small: bool):
    if Path(args.model).is_file():
        return _from_checkpoint(args, small)
    arch_args = _arch_args(args.arch_args)
    from zoo.init import build
    if args.input_size is not None and args.model in model_checks.SMALL_INPUT_SIZE:
        arch_args["input_size"] = args.input_size
    try:
        if small:
            net, shape = model_checks.small_instance(args.model, num_classes=args.num_classes, **arch_args)
        else:
            from zoo.registry import get_data_config, get_entry

            net = build(get_entry(args.model).builder, num_classes=args.num_classes, arch_args=arch_args)
            size = arch_args.get("input_size", get_data_config(args.model).input_size)
            shape = (int(arch_args.get("in_chans", 3)), int(size), int(size))
    except (UnknownModelError, TypeError, ValueError) as e:
        raise SystemExit(f"error: cannot build {args.model} with {arch_args}: {e}")
    if args.input_size is not None and args.model not in model_checks.SMALL_INPUT_SIZE:
        shape = (shape[0], args.input_size, args.input_size)
    return net, shape


def gradcheck_main(argv: list[str]) -> int:
    """Check an architecture's backprop against central finite differences (float64)."""
    argv = deprecated(argv, RENAMED, "zoo gradcheck")
    p = argparse.ArgumentParser(prog="zoo gradcheck", description="backprop vs central finite differences (float64)")
    _common(p)
    p.add_argument("--per_tensor", type=int, default=3, help="random entries checked per parameter tensor")
    p.add_argument("--eps", type=float, default=1e-6, help="finite-difference step")
    p.add_argument("--threshold", type=float, default=1e-4, help="largest relative error that passes (CS231n: 1e-4 with kinks)")
    args = _parse(p, argv)
    import torch

    torch.manual_seed(args.seed)  # the instance's weights: the same table for the same seed
    net, shape = _build(args, small=True)
    print(f"gradcheck {getattr(args, 'arch', None) or args.model}: {sum(q.numel() for q in net.parameters()):,} parameters, input {shape}, float64, eval mode")
    rows = model_checks.gradcheck(
        net, shape, args.num_classes, per_tensor=args.per_tensor, eps=args.eps, seed=args.seed,
        progress=lambda xs: tqdm(xs, desc="finite differences", unit="entry", file=sys.stderr),
    )
    out = _out_dir(args, "gradcheck")
    print(f"{'parameter':40s} {'index':14s} {'backprop':>13s} {'numeric':>13s} {'rel. error':>10s}")
    bad = 0
    with open(out / "gradcheck.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["parameter", "index", "backprop", "numeric", "rel_error", "abs_error", "pass"])
        for r in rows:
            ok = r.rel_error <= args.threshold
            bad += not ok
            print(f"{r.param:40s} {str(r.index):14s} {r.backprop:13.6e} {r.numeric:13.6e} {r.rel_error:10.2e}{'' if ok else '  FAIL'}")
            w.writerow([r.param, r.index, r.backprop, r.numeric, r.rel_error, r.abs_error, ok])
    worst = max(r.rel_error for r in rows)
    print(f"max relative error {worst:.2e} over {len(rows)} entries (threshold {args.threshold:g})")
    print(f"table: {out / 'gradcheck.csv'}")
    if bad:
        print(f"error: {bad} of {len(rows)} gradients differ from finite differences by more than {args.threshold:g}; "
              "the backward of the failing parameters' layers is wrong", file=sys.stderr)
        return 1
    return 0


# the columns after the network as built (for logreg/mlp/convnet: fan_in): zoo/init.py's schemes
SCHEMES = {"xavier": "xavier", "N(0,1)": "normal", "0.01*N(0,1)": "small"}


def init_stats_main(argv: list[str]) -> int:
    """Per-layer activation statistics of an architecture at initialisation."""
    argv = deprecated(argv, RENAMED, "zoo init-stats")
    p = argparse.ArgumentParser(prog="zoo init-stats", description="per-layer activation statistics at initialisation")
    _common(p)
    p.add_argument("--batch_size", type=int, default=64, help="random N(0,1) inputs per forward")
    args = _parse(p, argv)
    import torch
    from zoo.init import init_weights_

    arch_args = _arch_args(args.arch_args)
    arch_args.pop("init", None)  # every scheme is a column
    args.arch_args = json.dumps(arch_args)
    results = {}
    for scheme in tqdm(["default", *SCHEMES], desc="init schemes", file=sys.stderr):
        torch.manual_seed(args.seed)
        net, shape = _build(args, small=False)
        if scheme != "default":
            init_weights_(net, SCHEMES[scheme])
        results[scheme] = model_checks.init_stats(net, shape, batch_size=args.batch_size, seed=args.seed)
    out = _out_dir(args, "init-stats")
    layers = [s.layer for s in results["default"]]
    head = f"{'layer':28s}" + "".join(f"{k:>30s}" for k in results)
    print(f"init-stats {getattr(args, 'arch', None) or args.model}: input {shape}, batch {args.batch_size} of N(0,1); default: as built "
          f"(logreg/mlp/convnet: fan_in, zoo/init.py)\nE[a^2] (mean, var) per layer")
    print(head)
    for i, name in enumerate(layers):
        print(f"{name:28s}" + "".join(f"{results[k][i].mean_square:10.3g} ({results[k][i].mean:8.2g},{results[k][i].var:8.2g})" for k in results))
    if any(st.saturated is not None for st in results["default"]):
        lo, hi = model_checks.SATURATION[torch.nn.Sigmoid]
        print(f"\nsaturated outputs, % of the layer's (sigmoid < {lo} or > {hi}, |tanh| > {model_checks.SATURATION[torch.nn.Tanh][1]}: "
              f"local gradient < 1/5 of its maximum); * = {100 * model_checks.SATURATION_FLAG:.0f}% or more")
        print(head)
        for i, name in enumerate(layers):
            if results["default"][i].saturated is None:
                continue
            print(f"{name:28s}" + "".join(
                f"{100 * results[k][i].saturated:28.1f}{' *' if results[k][i].flagged else '  '}" for k in results))
    print("\ngradient variance Var(dL/da), cross-entropy summed over the batch against random labels")
    print(head)
    for i, name in enumerate(layers):
        print(f"{name:28s}" + "".join(f"{_g(results[k][i].grad_var):>30s}" for k in results))
    print()
    for k, stats in results.items():
        flagged = [st.layer for st in stats if st.flagged]
        print(f"{k:14s} largest departure of E[a^2] from 1: x{model_checks.max_scale_drift(stats):.3g}"
              + (f"; saturated: {', '.join(flagged)}" if flagged else ""))
    with open(out / "init_stats.csv", "w", newline="") as f:
        w = csv.writer(f)
        cols = ("mean", "var", "mean_square", "saturated", "grad_var")
        w.writerow(["layer", *[f"{k}_{c}" for k in results for c in cols]])
        for i, name in enumerate(layers):
            w.writerow([name, *[getattr(results[k][i], c) for k in results for c in cols]])
    png = out / "init_stats.png"
    _plot(results, layers, png, getattr(args, "arch", None) or args.model)
    print(f"table: {out / 'init_stats.csv'}")
    print(f"plot: {png}")
    return 0


def _g(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _plot(results: dict, layers: list[str], png: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gx) = plt.subplots(1, 2, figsize=(2 * max(6, 0.35 * len(layers) + 3), 4))
    for k, stats in results.items():
        label = f"{k}" + (" (as built)" if k == "default" else "")
        ys = [min(max(s.mean_square, 1e-300), 1e300) for s in stats]
        ax.plot(range(len(ys)), ys, marker="o", label=label)
        gs = [min(max(s.grad_var, 1e-300), 1e300) if s.grad_var is not None else float("nan") for s in stats]
        gx.plot(range(len(gs)), gs, marker="o", label=label)
        sat = [(i, y) for i, (s, y) in enumerate(zip(stats, ys)) if s.flagged]
        if sat:
            ax.scatter(*zip(*sat), s=120, facecolors="none", edgecolors="red", zorder=3)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhspan(0.5, 2.0, color="green", alpha=0.08, label="within x2 of the input")
    for a in (ax, gx):
        a.set_yscale("log")
        a.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("E[a^2] after the layer")
    ax.set_title(f"{model}: activation scale at init (red: saturated)", fontsize=9)
    gx.set_ylabel("Var(dL/da)")
    gx.set_title("gradient reaching each layer", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
