"""The collect stage for schedulers: images -> RUN/activations.h5.

A thin wrapper over `atlas collect` (same arguments, same exit codes):

    python scripts/collect.py CONFIG_OR_RUN [--set key=value ...] [--force] [--shard I/N | --merge]
    torchrun --nproc-per-node N scripts/collect.py CONFIG_OR_RUN    # N processes share the work
"""

import sys

from atlas.cli import main

if __name__ == "__main__":
    sys.exit(main(["collect", *sys.argv[1:]]))
