"""The run stage for schedulers: every stage in order, skipping those that are up to date.

A thin wrapper over `atlas run` (same arguments, same exit codes):

    python scripts/run.py CONFIG_OR_RUN [--set key=value ...] [--force]
"""

import sys

from atlas.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
