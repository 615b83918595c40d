"""The render stage for schedulers: RUN/grid.h5 -> RUN/<layer>/icons-<N>/.

A thin wrapper over `atlas render` (same arguments, same exit codes):

    python scripts/render.py CONFIG_OR_RUN [--set key=value ...] [--force] [--shard I/N | --merge]
    torchrun --nproc-per-node N scripts/render.py CONFIG_OR_RUN    # N processes share the work
"""

import sys

from atlas.cli import main

if __name__ == "__main__":
    sys.exit(main(["render", *sys.argv[1:]]))
