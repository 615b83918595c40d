"""The stages as functions of a config: what `atlas collect|layout|grid|render|mosaic|view|run` call.

Each takes a `Config` (or the path of a TOML config or of a run directory), runs its stage,
skipping what is up to date, and returns the stage's summary. After each stage the effective
config is written to `RUN/config.toml`, so the run directory stands for its config.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import Config, load_config, save_config
from .distributed import ALONE, Shard
from .errors import AtlasError
from .store.run import STAGES


def _config(config: Config | str | Path) -> Config:
    return config if isinstance(config, Config) else load_config(config)


SHARED_STAGES = ("collect", "render")  # stages whose work is shared out between processes (atlas.distributed)


def run_stages(config: Config | str | Path, stages: Sequence[str] = STAGES, *, force: bool = False,
               log: Callable[[str], None] = print, shard: Shard = ALONE, merge: bool = False) -> list[Any]:
    """Runs stages in order (default all six) and returns their summaries.

    Args:
        config: a Config, or the path of a TOML config or a run directory.
        stages: names from STAGES (collect, layout, grid, render, mosaic, view), in order.
        force: redo each stage even when it is up to date.
        log: receives the stages' summary lines.
        shard: this process's share (atlas.distributed). collect and render share their work out;
            under torchrun rank 0 runs the other stages while the rest wait (their summary is
            None), and an independent `--shard I/N` job may run only collect or render.
        merge: collect and render only write their results from the parts the shards left.
    """
    config = _config(config)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; the stages are {', '.join(STAGES)}")
    unshared = [s for s in stages if s not in SHARED_STAGES]
    if (merge or not (shard.alone or shard.group)) and unshared:
        raise AtlasError(f"--shard and --merge apply to collect and render only, not to {unshared[0]}; "
                         "run the other stages once, in one job")
    summaries = []
    for stage in stages:
        module = importlib.import_module(f"atlas.{stage}")
        if stage in SHARED_STAGES:
            summaries.append(module.run(config, force=force, log=log, shard=shard, merge=merge))
        else:
            summaries.append(module.run(config, force=force, log=log) if shard.writes_result else None)
            shard.barrier()
        # The run directory holds the effective config of its last successful stage (not of a
        # command that failed on, say, a misspelt layer). Independent shard jobs write it too, so
        # that `--merge RUN` finds it.
        if shard.writes_result or not shard.group:
            save_config(config)
    return summaries


def run_collect(config: Config | str | Path, *, force: bool = False, log: Callable[[str], None] = print):
    """Images -> RUN/activations.h5 (see atlas.collect). Returns a CollectSummary.

    Every `run_<stage>` takes the same arguments as `run_stages`: a Config or the path of a TOML
    config or a run directory; `force` redoes the stage even when up to date; `log` receives its
    summary lines.
    """
    return run_stages(config, ("collect",), force=force, log=log)[0]


def run_layout(config: Config | str | Path, *, force: bool = False, log: Callable[[str], None] = print):
    """Activations -> RUN/layout.h5 (see atlas.layout). Returns a LayoutSummary."""
    return run_stages(config, ("layout",), force=force, log=log)[0]


def run_grid(config: Config | str | Path, *, force: bool = False, log: Callable[[str], None] = print):
    """Layout -> RUN/grid.h5 (see atlas.grid). Returns a GridSummary."""
    return run_stages(config, ("grid",), force=force, log=log)[0]


def run_render(config: Config | str | Path, *, force: bool = False, log: Callable[[str], None] = print):
    """Grids -> an icons folder per map and size (see atlas.render). Returns a RenderSummary."""
    return run_stages(config, ("render",), force=force, log=log)[0]


def run_mosaic(config: Config | str | Path, *, force: bool = False, log: Callable[[str], None] = print):
    """Icons and images -> the atlas pictures (see atlas.mosaic). Returns a MosaicSummary."""
    return run_stages(config, ("mosaic",), force=force, log=log)[0]


def run_view(config: Config | str | Path, *, force: bool = False, log: Callable[[str], None] = print):
    """Grids, icons and images -> RUN/viewer/index.html, the interactive atlas (see atlas.view).
    Returns a ViewSummary."""
    return run_stages(config, ("view",), force=force, log=log)[0]
