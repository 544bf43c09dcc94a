"""`python -m launch.sweep _train ...` and `... worker ...` (see :func:`launch.sweep.command.internal_main`)."""

import sys

from .command import internal_main

sys.exit(internal_main(sys.argv[1:]))
