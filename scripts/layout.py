"""The layout stage for schedulers: RUN/activations.h5 -> RUN/layout.h5.

A thin wrapper over `atlas layout` (same arguments, same exit codes):

    python scripts/layout.py CONFIG_OR_RUN [--set key=value ...] [--force]
"""

import sys

from atlas.cli import main

if __name__ == "__main__":
    sys.exit(main(["layout", *sys.argv[1:]]))
