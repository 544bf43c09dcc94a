"""BNStatsCheck's per-layer table: a W&B table with a WandbLogger, else a CSV in the run directory."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

COLUMNS = ["layer", "channels", "nonfinite", "collapsed", "mean_err", "mean_err_max", "logvar",
           "logvar_max", "rank_max_diff"]


def write_table(trainer, rows: list[dict]) -> Optional[Path]:
    """``rows`` (one dict per layer, keys of :data:`COLUMNS`) as the W&B table ``bn/layers`` (with
    a WandbLogger) and as ``<run dir>/bn_stats/epoch=NNN-step=N.csv`` (for the run report);
    returns the CSV's path. Call on rank zero."""
    if not rows:
        return None
    data = [[r.get(c) for c in COLUMNS] for r in rows]
    logger = trainer.logger
    if type(logger).__name__ == "WandbLogger":
        logger.log_table(key="bn/layers", columns=COLUMNS, data=data)
    out = Path(trainer.default_root_dir) / "bn_stats"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"epoch={trainer.current_epoch:03d}-step={trainer.global_step}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(data)
    return path
