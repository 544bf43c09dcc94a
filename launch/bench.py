"""`zoo bench`: run the benchmark scripts of benchmarks/ and print their tables.

    zoo bench                      # augment, overhead (+ data-bound check), loader
    zoo bench augment overhead     # a subset
    zoo bench gpu                  # the GPU script (benchmarks/README.md), with its GPU-decode part:
                                   # the data.gpu_decode split that `auto` chose from the measured rates
    zoo bench peers --timm-train T --torchvision-train V   # zoo fit vs the peers' scripts

Each table is also written to benchmarks/results/<name>.md with its command and machine.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCHES = ("augment", "overhead", "loader", "gpu", "peers")
DEFAULT = ("augment", "overhead", "loader")
ARGS = {"gpu": ["--gpu-decode"]}  # arguments zoo bench gives a script


def main(argv: list[str]) -> int:
    """Run the benchmark scripts of benchmarks/ and print their tables."""
    if argv[:1] == ["peers"]:  # takes the peers' script paths: its own arguments (and --help) follow
        names, rest = ["peers"], argv[1:]
    else:
        ap = argparse.ArgumentParser(prog="zoo bench", description=main.__doc__)
        ap.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run, of {', '.join(BENCHES)} (default: {' '.join(DEFAULT)}); "
                             "`zoo bench peers --help` for the peers benchmark's options")
        names, rest = ap.parse_args(argv).names or list(DEFAULT), []
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"error: unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    repo = Path(__file__).resolve().parent.parent
    if not (repo / "benchmarks").is_dir():
        print("error: benchmarks/ is not next to launch/: run `zoo bench` from a source checkout", file=sys.stderr)
        return 2
    sys.path.insert(0, str(repo))
    for name in names:
        print(f"== benchmarks/{name}.py", flush=True)
        rc = importlib.import_module(f"benchmarks.{name}").main([*ARGS.get(name, []), *rest])
        if isinstance(rc, int) and rc:  # loader.main returns its table
            return rc
    return 0
