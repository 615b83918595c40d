"""The grid stage for schedulers: RUN/activations.h5 + RUN/layout.h5 -> RUN/grid.h5.

A thin wrapper over `atlas grid` (same arguments, same exit codes):

    python scripts/grid.py CONFIG_OR_RUN [--set key=value ...] [--force]
"""

import sys

from atlas.cli import main

if __name__ == "__main__":
    sys.exit(main(["grid", *sys.argv[1:]]))
