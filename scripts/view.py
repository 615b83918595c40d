"""The view stage for schedulers: the grids and icons -> RUN/viewer/index.html.

A thin wrapper over `atlas view` (same arguments, same exit codes):

    python scripts/view.py CONFIG_OR_RUN [--set key=value ...] [--force]
"""

import sys

from atlas.cli import main

if __name__ == "__main__":
    sys.exit(main(["view", *sys.argv[1:]]))
