"""The mosaic stage for schedulers: icons and grid -> RUN/<layer>/atlas-<N>.png and the preview.

A thin wrapper over `atlas mosaic` (same arguments, same exit codes):

    python scripts/mosaic.py CONFIG_OR_RUN [--set key=value ...] [--force]
"""

import sys

from atlas.cli import main

if __name__ == "__main__":
    sys.exit(main(["mosaic", *sys.argv[1:]]))
