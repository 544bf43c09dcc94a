"""One flag style for every `zoo` command, and the old spellings that still work for one release.

- An option that sets a model, data or trainer field has the dotted name `zoo fit` uses:
  ``--data.root``, ``--data.batch_size``, ``--model.arch_args``, ``--model.num_classes``.
- A command's own option is lowercase words joined by underscores, as LightningCLI's
  (``--ckpt_path``): ``--out_dir``, ``--input_size``, ``--per_tensor``.
- A boolean is ``--name true|false`` (a bare ``--name`` means true), as in `zoo fit`.

A renamed flag given in its old spelling is rewritten to the new one with one line on stderr
(``deprecated()``); the old spellings go in the release after next.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence

TRUE = ("true", "yes", "1", "on")
FALSE = ("false", "no", "0", "off")


def parse_bool(text: str) -> bool:
    """``true``/``false`` (also yes/no, 1/0, on/off), as jsonargparse reads `zoo fit`'s booleans."""
    value = str(text).strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_bool(parser: argparse.ArgumentParser, flag: str, default, help: str, dest: str | None = None) -> None:
    """``--flag true|false``; a bare ``--flag`` means true."""
    parser.add_argument(flag, dest=dest, type=parse_bool, nargs="?", const=True, default=default,
                        metavar="true|false", help=help)


def deprecated(argv: Sequence[str], renamed: Mapping[str, Sequence[str]], prog: str) -> list[str]:
    """``argv`` with each old flag of ``renamed`` (old -> the new words, e.g. ``"--no-ema":
    ("--ema", "false")``) replaced, and one line on stderr for each old flag that was used."""
    out: list[str] = []
    told: set[str] = set()
    for word in argv:
        old, eq, value = word.partition("=")
        if old in renamed:
            new = list(renamed[old])
            if old not in told:
                told.add(old)
                print(f"{prog}: {old} is deprecated, use {' '.join(new)} (the old spelling goes in the next release)",
                      file=sys.stderr)
            out.extend(new[:-1] + [f"{new[-1]}={value}"] if eq else new)
        else:
            out.append(word)
    return out
