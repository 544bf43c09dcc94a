"""``zoo ensemble CKPT CKPT ... [--data.root DIR] [--combine mean_prob|mean_logit|vote]``

Deep ensembles of independently trained checkpoints (Lakshminarayanan et al. 2017): every
member is loaded with ``zoo.load(weights=ckpt)`` (``weights_only=True``; EMA weights when the
checkpoint has them, ``--ema false`` for the trained ones), evaluated on the val split, and the
table (per member, best member, ensemble: top-1, top-5, NLL, Brier, ECE) printed and written
with a reliability diagram into the run directory (``--run.root/ensemble/<id>``).
Same-architecture members run stacked (torch.func vmap), see callbacks/ensemble.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from launch.run_dir import resumed_run_dir, run_id


class EnsembleError(ValueError):
    """A user's mistake in the member list (printed as one line by the CLI)."""


def _classes(path: str) -> Optional[list[str]]:
    """The class order a checkpoint was trained with, when it can be told."""
    from datamodules.imagenet import class_ids

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and ckpt.get("zoo_classes"):
        return list(ckpt["zoo_classes"])
    if not isinstance(ckpt, dict) or "datamodule_hyper_parameters" not in ckpt:
        return None
    root = ckpt["datamodule_hyper_parameters"].get("root")  # None: the embedded dataset
    try:
        return list(class_ids(root))
    except Exception:
        return None


def _data_args(args, first) -> dict:
    """The first member's DataModule settings (stored resolution, crop ratio: evaluation never
    guesses), with the command line's root/backend/batch size/workers on top."""
    import inspect

    from datamodules.imagenet import ImageNetDataModule

    ckpt = torch.load(args.checkpoints[0], map_location="cpu", weights_only=True)
    saved = dict(ckpt.get("datamodule_hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
    accepted = set(inspect.signature(ImageNetDataModule.__init__).parameters) - {"self"}
    kw = {k: v for k, v in saved.items() if k in accepted}
    if args.root is not None or "root" not in kw:
        kw["root"] = args.root
    for name, default in (("backend", "ffcv"), ("batch_size", 64), ("num_workers", 2)):
        value = getattr(args, name)
        if value is not None or name not in kw:
            kw[name] = value if value is not None else default
    kw["data_config"] = first.data_config
    return kw


def load_members(paths: list[str], use_ema: bool = True):
    import zoo

    members = []
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"ensemble member {p} does not exist")
        members.append(zoo.load(weights=p, use_ema=use_ema))
    nc = {p: m.hparams.num_classes for p, m in zip(paths, members)}
    if len(set(nc.values())) > 1:
        desc = ", ".join(f"{p}: {n}" for p, n in nc.items())
        raise EnsembleError(f"ensemble members have different numbers of classes ({desc}); ensemble models of one task")
    orders = {p: _classes(p) for p in paths}
    known = {p: o for p, o in orders.items() if o is not None}
    if len({tuple(o) for o in known.values()}) > 1:
        ref_p, ref = next(iter(known.items()))
        bad = next(p for p, o in known.items() if o != ref)
        raise EnsembleError(f"ensemble members {ref_p} and {bad} were trained with a different class order; "
                            "use members trained on the same class folders")
    return members, (next(iter(known.values())) if known else None)


# the spellings before one flag style (launch/flags.py): accepted with a deprecation line
RENAMED = {"--no-ema": ("--ema", "false"), "--no-stack": ("--stack", "false")}


def run_name(path: str) -> Optional[str]:
    """A checkpoint's run as ``<name>/<id>`` when it lies in a run directory (with ``/<file>``
    where the file is not ``last.ckpt``); None elsewhere."""
    p = Path(path)
    run = resumed_run_dir(path) if p.suffix == ".ckpt" else None
    if run is None:
        return None
    label = f"{run.parent.name}/{run.name}"
    return label if p.name == "last.ckpt" else f"{label}/{p.stem}"


def member_labels(paths: list[str]) -> list[str]:
    """Short row labels: the run name, else the file name; the path as given where two would match."""
    labels = [run_name(p) or Path(p).name for p in paths]
    return [lab if labels.count(lab) == 1 else p for lab, p in zip(labels, paths)]


def main(argv: list[str]) -> int:
    """Evaluate several checkpoints and their ensemble on the val split."""
    from launch.flags import add_bool, deprecated

    argv = deprecated(argv, RENAMED, "zoo ensemble")
    ap = argparse.ArgumentParser(prog="zoo ensemble", description=main.__doc__)
    ap.add_argument("checkpoints", nargs="+", help="member checkpoints (.ckpt, .safetensors, hub ids)")
    ap.add_argument("--data.root", dest="root", default=None, help="ImageNet-format folder; default: the embedded dataset")
    ap.add_argument("--data.backend", dest="backend", default=None, choices=["ffcv", "torchvision"],
                    help="default: as the first member was trained")
    ap.add_argument("--data.batch_size", dest="batch_size", type=int, default=None)
    ap.add_argument("--data.num_workers", dest="num_workers", type=int, default=None)
    ap.add_argument("--combine", default="mean_prob", choices=["mean_prob", "mean_logit", "vote"])
    add_bool(ap, "--ema", True, "the checkpoints' EMA weights where they have them (false: the trained ones)", dest="use_ema")
    add_bool(ap, "--stack", None, "run same-architecture members stacked (vmap; false: loop over members); "
             "default: on a GPU, and MLPs on any device")
    ap.add_argument("--run.root", dest="run_root", default="runs")
    args = ap.parse_args(argv)
    from datamodules.imagenet import DataError, ImageNetDataModule
    from zoo.weights import WeightsError

    from callbacks.ensemble import MemberRunner, arch_key, evaluate_members, reliability_png, table

    try:
        if len(args.checkpoints) < 2:
            raise EnsembleError("an ensemble needs at least 2 checkpoints")
        members, _ = load_members(args.checkpoints, args.use_ema)
        dm = ImageNetDataModule(**_data_args(args, members[0]))
        dm.prepare_data()
        dm.setup("validate")
        loader = dm.val_dataloader()
    except (EnsembleError, DataError, WeightsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_root).expanduser().resolve() / "ensemble" / run_id()
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"run directory: {run_dir}", flush=True)
    pre = members[0]
    runner = MemberRunner([m.net for m in members], [arch_key(m) for m in members], stack=args.stack)
    logits, labels = [], []
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            x, y = batch[0], batch[1].reshape(-1).long()
            logits.append(runner(pre.preprocess(x)).float())
            labels.append(y.clone())  # FFCV reuses its batch buffers: keep a copy
    dt = time.perf_counter() - t0
    logits, y = torch.cat(logits, 1), torch.cat(labels)
    names = member_labels(args.checkpoints)
    rows = evaluate_members(logits, y, names, args.combine)
    print(f"{len(members)} members, {y.numel()} val images, {y.numel() / dt:.0f} images/s "
          f"({'stacked' if args.stack else 'looped'})")
    print(table(rows), flush=True)
    (run_dir / "ensemble.json").write_text(json.dumps(
        {"checkpoints": args.checkpoints, "combine": args.combine, "images": int(y.numel()), "rows": rows}, indent=1))
    best = min(range(len(names)), key=lambda i: (-rows[names[i]]["top1"], rows[names[i]]["nll"]))
    from callbacks.ensemble import combine, ranking_scores

    png = reliability_png(run_dir / "reliability.png", {
        f"best member ({names[best]})": (logits[best].softmax(-1), y),
        f"ensemble ({args.combine})": (combine(logits, args.combine), y, ranking_scores(logits, args.combine)),
    })
    print(f"reliability diagram: {png}\nlogs: {run_dir}", flush=True)
    return 0
