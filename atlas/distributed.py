"""Running collect and render over several processes: which share of the work is this process's.

Work is cut into pieces with fixed boundaries (collect's parts of images, render's blocks of
icons), each written to the run's work folder as a file of its own; piece i belongs to share
i mod N. A finished piece is never redone, so a killed process loses only its unfinished piece.

Two ways to run N shares:
- under `torchrun` (WORLD_SIZE > 1), the processes join a torch.distributed group and wait for
  each other at barriers; rank 0 writes the final artifact once every piece exists.
- `--shard I/N`, independent jobs (a scheduler's job array) that never talk to each other; each
  writes its pieces, and `--merge` writes the final artifact when all of them exist.

The processes exchange nothing but "I am done": the barriers run over gloo (the CPU backend)
whatever the devices, and each rank computes on its own device (`cuda:LOCAL_RANK` on a GPU node).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import re
from pathlib import Path

import torch

from .artifacts import prepare_work_dir, work_dir_matches
from .errors import AtlasError
from .runtime import pick_device

# Under `atlas run`, the other ranks wait at a barrier while rank 0 lays out and bins the samples
# (minutes to an hour on a million samples); torchrun ends every rank when one of them fails.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's share of a stage's work: pieces i with i % count == index."""

    index: int = 0  # rank, or I of --shard I/N
    count: int = 1  # world size, or N
    group: bool = False  # joined to a torch.distributed group: barriers wait for the others
    local_rank: int = 0  # the rank on this node (torchrun's LOCAL_RANK): which GPU is this process's

    @property
    def alone(self) -> bool:
        """One process does all the work."""
        return self.count == 1

    @property
    def writes_result(self) -> bool:
        """This process writes the stage's final artifact: the only process, or rank 0 of a group
        (independent --shard jobs leave it to --merge)."""
        return self.alone or (self.group and self.index == 0)

    @property
    def leads(self) -> bool:
        """Shows progress bars: the only process, rank 0 of a group, or an independent job."""
        return self.index == 0 or not self.group

    def owns(self, piece: int) -> bool:
        return piece % self.count == self.index

    def barrier(self) -> None:
        """Waits until every process of the group is here (nothing to wait for otherwise).

        Raises:
            AtlasError: another process of the group stopped (its own error says why).
        """
        if self.group:
            import torch.distributed as dist

            try:
                dist.barrier(group=_barrier_group())
            except RuntimeError:  # gloo: "Connection closed by peer" when a rank has exited
                raise AtlasError(f"{self.describe()}: another process of this torchrun group stopped; its error "
                                 "above says why") from None

    def prepare_work_dir(self, path: Path, stamp: str, *, merge: bool, what: str) -> None:
        """Readies a stage's work folder for this process's pieces (stamp: what they are made with).

        The only process prepares it, throwing away pieces of another config; in a group rank 0
        does that while the others wait. An independent --shard job and --merge never throw
        pieces away (another job may be writing them): they refuse a folder of another config.
        """
        if merge or not (self.alone or self.group):
            if path.exists() and not work_dir_matches(path, stamp):
                raise AtlasError(f"{path} holds {what} of another config (or other images); run every shard with the "
                                 "same config and --set options, or delete that folder to start over")
            if merge:
                if not path.exists():
                    raise AtlasError(f"no {what} in {path} to merge; run the --shard jobs first")
                return
        if self.index == 0 or not self.group:
            prepare_work_dir(path, stamp)
        self.barrier()

    def device(self, name: str, key: str) -> torch.device:
        """The device for a config's `device` value: under torchrun "auto" and "cuda" mean this
        rank's own GPU, cuda:LOCAL_RANK."""
        if self.group and name in ("auto", "cuda") and torch.cuda.is_available():
            if self.local_rank >= torch.cuda.device_count():
                raise AtlasError(f"rank {self.index} has LOCAL_RANK {self.local_rank} but this node has "
                                 f"{torch.cuda.device_count()} GPU(s); start at most that many processes per node")
            return torch.device("cuda", self.local_rank)
        return pick_device(name, key)

    def describe(self) -> str:
        if self.group:
            return f"rank {self.index} of {self.count}"
        return f"shard {self.index}/{self.count}"


ALONE = Shard()


def parse_shard(text: str) -> Shard:
    """`--shard I/N`: share I (counted from 0) of N independent jobs.

    Raises:
        AtlasError: not of the form I/N with 0 <= I < N.
    """
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise AtlasError(f"--shard must be I/N with 0 <= I < N (e.g. --shard 0/4 ... --shard 3/4 for four jobs), "
                         f"got {text!r}")
    return Shard(int(match[1]), int(match[2]))


def join_from_environment() -> Shard:
    """The share torchrun gives this process, after joining its process group; ALONE when the
    process was not started by torchrun with more than one process (WORLD_SIZE unset or 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ALONE
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    return Shard(rank, world, True, local_rank)


def leave() -> None:
    """Leaves the process group joined by `join_from_environment` (a no-op otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@functools.cache
def _barrier_group():
    """The group barriers run over: the default one when it is gloo (ours always is), else a gloo
    group of every rank made once (a group joined by the caller on nccl)."""
    import torch.distributed as dist

    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)
