"""``zoo report RUN_DIR [--out DIR]``: the run report of a run directory, as one HTML file.

    zoo report runs/convnet/20260101-120000-abc123     # -> runs/.../report/report.html

The same report ``zoo fit`` writes at its end (callbacks/run_report.py has what it holds). It
reads only the run directory, whichever logger the run used, and needs no server: open the HTML
file in a browser, or copy it anywhere (its images are embedded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="zoo report", description="Write a run directory's report: report/report.html (images embedded) and its PNGs.")
    parser.add_argument("run_dir", help="a run directory (`zoo fit` prints it: run directory: ...)")
    parser.add_argument("--out", default=None, help="folder for the report (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).expanduser()
    if not run_dir.is_dir():
        print(f"error: run directory {run_dir} not found: give the directory `zoo fit` printed "
              "(run directory: ...)", file=sys.stderr)
        return 2
    marks = ("config.yaml", "metrics.jsonl", "checkpoints", "plots")
    if not any((run_dir / m).exists() for m in marks) and not list(run_dir.glob("*/config.yaml")):
        print(f"error: {run_dir} is not a run directory (no config.yaml, metrics.jsonl, checkpoints/ or plots/): "
              "give the directory `zoo fit` printed", file=sys.stderr)
        return 2
    from callbacks.run_report import write_report

    path = write_report(run_dir, args.out)
    print(f"run report: {path}")
    return 0
