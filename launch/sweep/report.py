"""The sweep's report: the ranked table (printed and results.csv), the plot (sweep.png), and
the W&B summary run."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional

import optuna

from .liveness import fail_stale
from .study import Sweep


def rows(sweep: Sweep, storage=None) -> list[dict]:
    storage = storage or sweep.storage()
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    out = []
    for rnd in sweep.rounds():
        if sweep.study_name(rnd) not in names:
            continue
        study = optuna.load_study(study_name=sweep.study_name(rnd), storage=storage)
        for t in study.get_trials(deepcopy=False):
            out.append({"round": rnd, "trial": t.number, "state": t.state.name, "value": t.value,
                        "last_value": t.user_attrs.get("last_value"), **{k: t.params.get(k) for k in sweep.spec.params},
                        "attempt": t.user_attrs.get("attempt", 1), "run_dir": t.user_attrs.get("run_dir", "")})
    sign = -1 if sweep.spec.direction == "maximize" else 1
    done = sorted((r for r in out if r["state"] == "COMPLETE"), key=lambda r: sign * r["value"])
    for i, r in enumerate(done, 1):
        r["rank"] = i
    return done + [r for r in out if r["state"] != "COMPLETE"]


def report(sweep: Sweep, storage=None, to_wandb: bool = False) -> tuple[Path, Optional[Path]]:
    """Print the ranked table; write results.csv and sweep.png. Returns their paths."""
    storage = storage or sweep.storage()
    for rnd in sweep.rounds():
        try:
            fail_stale(optuna.load_study(study_name=sweep.study_name(rnd), storage=storage), sweep)
        except KeyError:
            pass
    table = rows(sweep, storage)
    keys = list(sweep.spec.params)
    m = sweep.spec.metric
    print(f"sweep {sweep.spec.name}: {m} ({sweep.spec.direction}), {sweep.dir}")
    head = f"{'rank':>4s} {'rnd':>3s} {'trial':>5s} {'state':9s} {m:>10s} " + " ".join(f"{k:>18s}" for k in keys)
    print(head)
    for r in table:
        val = f"{r['value']:10.4f}" if r["value"] is not None else f"{'-':>10s}"
        ps = " ".join(f"{fmt(r[k]):>18s}" for k in keys)
        print(f"{r.get('rank', ''):>4} {r['round']:>3d} {r['trial']:>5d} {r['state']:9s} {val} {ps}")
    csv_path = sweep.dir / "results.csv"
    cols = ["rank", "round", "trial", "state", "value", "last_value", *keys, "attempt", "run_dir"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(table)
    png = plot(sweep, table, storage) if any(r["state"] == "COMPLETE" for r in table) else None
    if to_wandb and png is not None:
        log_to_wandb(sweep, table, cols, png)
    return csv_path, png


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot(sweep: Sweep, table: list[dict], storage) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = sweep.spec.params
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.6), squeeze=False)
    done = [r for r in table if r["state"] == "COMPLETE"]
    for ax, (name, p) in zip(axes[0], params.items()):
        for rnd, marker in ((1, "o"), (2, "^")):
            pts = [(r[name], r["value"]) for r in done if r["round"] == rnd]
            if pts:
                xs, ys = zip(*pts)
                if p.values is not None:
                    xs = [p.values.index(x) for x in xs]
                ax.scatter(xs, ys, marker=marker, label=f"round {rnd}" + (" (refined)" if rnd == 2 else ""))
        if done:
            b = done[0]
            bx = p.values.index(b[name]) if p.values is not None else b[name]
            ax.scatter([bx], [b["value"]], s=160, facecolors="none", edgecolors="red", label="best")
        if p.log:
            ax.set_xscale("log")
        if p.values is not None:
            ax.set_xticks(range(len(p.values)), [str(v) for v in p.values])
        ax.set_xlabel(name + (" (log)" if p.log else ""))
        ax.set_ylabel(sweep.spec.metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"sweep {sweep.spec.name}: {sweep.spec.metric} per trial")
    fig.tight_layout()
    png = sweep.dir / "sweep.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def log_to_wandb(sweep: Sweep, table: list[dict], cols: list[str], png: Path) -> None:
    if str(sweep.spec.fixed.get("run.logger", "wandb")) != "wandb":
        return
    import wandb

    mode = "online" if os.environ.get("WANDB_MODE") == "online" else "offline"
    run = wandb.init(project=str(sweep.spec.fixed.get("run.project", "lightning-zoo")), group=sweep.spec.name,
                     job_type="sweep", name=f"{sweep.spec.name}-summary", dir=str(sweep.dir), mode=mode,
                     reinit="finish_previous")
    run.log({"sweep/results": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in table]),
             "sweep/plot": wandb.Image(str(png))})
    run.finish()
    print(f"W&B ({mode}): group {sweep.spec.name}" + (f"; wandb sync {sweep.dir / 'wandb'} --sync-all" if mode == "offline" else ""))
