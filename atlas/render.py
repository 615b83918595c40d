"""Render stage: a feature-visualisation icon for every kept cell of every grid.

Reads  `RUN/grid.h5` (`/<layer>/<N>/cell`, `direction`, `indptr`, `index`, and
`direction_whitened` with `render.whiten`) and `RUN/activations.h5` (`/layers/<layer>/acts`, for
how well the cells' own members match their directions).
Writes `RUN/<map>/icons-<N>/` for each map (each layer, and each focus map `<layer>/class-<slug>`,
`<layer>/pair-<a>-<b>`; see atlas.focus) and grid size N in `render.sizes_for[map]`, else
`render.sizes`, else all of `grid.sizes`:

- `cell-<x>-<y>.png`: the (icon_size, icon_size) RGB icon of cell (x, y) = (column, row) of
  grid.h5's `cell`, one per kept cell.
- `icons.json`: {"layer", "map", "size", "icon_size", "fingerprint", "grid_fingerprint" (the grid's
  `Grid.digest()`: icons are kept while their grid's cells and directions stay the same), "objective" (in
  words), "steps", "attempts", "seed", "member_similarity" (how `member_cosine` is computed),
  "icons": [{"cell": [x, y], "file", "objective", "cosine", "member_cosine", "steps", "seed",
  "attempt"}], "median_cosine", "median_member_cosine"}. `objective` is the icon's final objective
  and `cosine` the cosine similarity between its centre activation and the cell's direction, both
  measured on the saved 8-bit pixels without transforms; `member_cosine` is the median cosine
  between the cell's member activations and the direction. The medians are over cells.

Method (Lucid's activation-atlas recipe): each icon maximises dot(h, w) * max(0.1, cos(h, w))^p at
the centre position (W // 2, H // 2) of the layer's map for an icon-sized input, with w the cell's
direction (or its whitened direction), over a Fourier-parameterised decorrelated-colour image
with random pad / jitter / scale / rotation, by Adam. All cells of a grid are optimised together,
`render.batch_size` at a time; the best of `render.attempts` attempts (by final objective) is kept.
Icon (cell, attempt) draws every random number from its own generator seeded by (seed, N, x, y,
attempt), so it does not depend on which other icons share its batch, nor on the batch size.

Resuming: finished batches are kept in `RUN/<map>/.icons-<N>.partial/` (each written
atomically) while the fingerprint is the same; the finished folder replaces `icons-<N>/` in one
rename.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from PIL import Image

from . import optvis
from .artifacts import atomic_path, fingerprint, prepare_work_dir, read_fingerprint
from .config import Config, RenderConfig
from .errors import AtlasError
from .focus import MapSpec, read_maps
from .grid import GRID_NAME, Grid, cosine_to_direction, grid_fingerprint, load_grid
from .layout import ACTIVATIONS_NAME
from .models import load_model
from .runtime import keep_freed_memory, pick_device

ICONS_JSON = "icons.json"
MEMBER_SIMILARITY = "median over the cell's members of cos(member activation, direction)"
COS_FLOOR = 0.1  # the atlas objective's floor on the cosine factor


# ---------------------------------------------------------------------------------------------
# Pure core


def icon_seed(seed: int, size: int, x: int, y: int, attempt: int) -> int:
    """The seed of the generator behind icon (cell (x, y) of the size x size grid, attempt)."""
    state = np.random.SeedSequence([seed, size, x, y, attempt]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def icon_transform(r: RenderConfig) -> optvis.Transform:
    """The random transforms every icon goes through at every step (see `optvis.standard_transforms`)."""
    return optvis.standard_transforms(r.icon_size, pad_px=r.pad, jitter_px=r.jitter, scale=r.scale,
                                      rotate=r.rotate)


def icon_objective(layer: str, vectors: np.ndarray, r: RenderConfig) -> optvis.Objective:
    """dot(h, v) * max(0.1, cos(h, v))^p at the map's centre, one (C,) vector v per icon."""
    return optvis.atlas_direction(layer, vectors, r.cos_power, floor=COS_FLOOR)


@dataclasses.dataclass
class IconBatch:
    """Rendered icons of one batch."""

    images: np.ndarray  # (b, S, S, 3) uint8
    objective: np.ndarray  # (b,) float32 final objective on the 8-bit pixels, no transforms
    cosine: np.ndarray  # (b,) float32 cos(centre activation, reference direction)


def render_icons(network: optvis.Network, layer: str, vectors: np.ndarray, reference: np.ndarray,
                 seeds: Sequence[int], r: RenderConfig,
                 on_step: Callable[[int], None] | None = None) -> IconBatch:
    """Optimises one batch of icons and measures them.

    Args:
        network: the model cut at `layer`, on its device, taking [0, 1] pixels.
        layer: the layer whose centre activation is optimised.
        vectors: (b, C) float32 objective directions (the cells' directions, or whitened ones).
        reference: (b, C) float32 directions the reported cosine is measured against.
        seeds: b seeds, one generator each (see `icon_seed`).
        r: icon size, steps, learning rate, transforms, cos_power, decorrelate.
        on_step: called with the step number after each step.

    Returns:
        The 8-bit icons, with their objective and cosine measured on exactly those pixels.
    """
    if len(seeds) == 1:
        # oneDNN runs a batch of one through other convolution kernels than any larger batch
        # (whose results per image are identical whatever the batch), and 256 Adam steps through
        # ReLU kinks grow that rounding into visible differences. A lone icon is computed as a
        # pair, so every icon gets the same arithmetic whatever its batch.
        pair = optimize_icons(network, layer, np.repeat(vectors, 2, 0), np.repeat(reference, 2, 0),
                              [seeds[0]] * 2, r, on_step)
        return IconBatch(pair.images[:1], pair.objective[:1], pair.cosine[:1])
    return optimize_icons(network, layer, vectors, reference, seeds, r, on_step)


def optimize_icons(network: optvis.Network, layer: str, vectors: np.ndarray, reference: np.ndarray,
                   seeds: Sequence[int], r: RenderConfig,
                   on_step: Callable[[int], None] | None = None) -> IconBatch:
    """`render_icons` without its care for lone icons: a batch of one may round differently
    from the same icon in a larger batch (see `render_icons`)."""
    generators = optvis.make_generators(seeds)
    if r.decorrelate:
        image = optvis.fourier_image(r.icon_size, generators, device=network.device)
    else:
        image = optvis.pixel_image(r.icon_size, generators, device=network.device)
    objective = icon_objective(layer, vectors, r)
    vis = optvis.optimize(network, objective, image, generators=generators, transform=icon_transform(r),
                          steps=r.steps, lr=r.lr, on_step=on_step)
    pixels = (vis.images * 255).round().clamp(0, 255).to(torch.uint8)
    acts = optvis.evaluate(network, pixels.float() / 255)
    centre = optvis.at_position(acts[layer]).float()
    reference_t = torch.as_tensor(reference, dtype=torch.float32, device=centre.device)
    return IconBatch(pixels.permute(0, 2, 3, 1).cpu().numpy(),
                     objective(acts).float().cpu().numpy(),
                     optvis.cosine_at(centre, reference_t).cpu().numpy())


def member_cosines(acts: Any, grids: Sequence[Grid]) -> list[np.ndarray]:
    """Per grid, the (m,) float32 median cosine between each cell's members and its direction.

    Args:
        acts: (n, C) activations, array or h5py dataset (read once, in float32 blocks).
        grids: grids over the same samples.
    """
    result = []
    for grid, members in zip(grids, cosine_to_direction(acts, grids)):
        result.append(np.array([np.median(members[a:b]) for a, b in zip(grid.indptr[:-1], grid.indptr[1:])],
                               np.float32))
    return result


def pick_best(objective: np.ndarray, attempts: int) -> np.ndarray:
    """(m,) index of the best attempt per cell, from (m * attempts,) objectives in (cell, attempt) order."""
    return objective.reshape(-1, attempts).argmax(axis=1)


# ---------------------------------------------------------------------------------------------
# Stage


def render_fingerprint(config: Config, grid: Grid, layer: str) -> str:
    """What one grid's icons depend on: the [render] settings (less which sizes are rendered), the
    grid's cells and directions, the layer, the model and its preprocessing."""
    settings = dataclasses.replace(config.render, sizes=(), sizes_for={})
    return fingerprint("render", settings, grid.digest(), layer, config.model, config.weights, config.preprocess)


@dataclasses.dataclass
class GridIcons:
    """What rendering one map's grid did."""

    layer: str  # the map's name: a layer, or a focus map `<layer>/class-<slug>`, `<layer>/pair-<a>-<b>`
    size: int
    icons: int  # kept cells, one icon each
    skipped: bool  # up to date, nothing rendered
    resumed: int  # (cell, attempt) jobs taken from an interrupted run
    seconds: float
    icons_per_s: float  # icons rendered in this run per second of optimisation
    median_cosine: float  # median over cells of cos(icon's centre activation, direction)
    median_member_cosine: float  # median over cells of the median member cosine
    path: Path  # RUN/<layer>/icons-<N>


@dataclasses.dataclass
class RenderSummary:
    """What a render run did."""

    skipped: bool  # True when every icons folder was up to date
    grids: list[GridIcons]
    device: str
    seconds: float


def icons_dir(run_dir: Path, layer: str, size: int) -> Path:
    """RUN/<map>/icons-<N> (a focus map's folder sits inside its layer's)."""
    return Path(run_dir) / layer / f"icons-{size}"


def run(config: Config, *, force: bool = False, log: Callable[[str], None] = print,
        stop_after_batches: int | None = None) -> RenderSummary:
    """Runs the render stage: RUN/grid.h5 -> RUN/<layer>/icons-<N>/, skipping folders up to date.

    Args:
        config: the run's config (`config.render`, `config.layers`, model, weights, preprocess).
        force: render again even what is up to date.
        log: receives one summary line per grid and one overall.
        stop_after_batches: for tests: return after this many new batches (simulates a kill).

    Raises:
        AtlasError: grid.h5 missing, incomplete or made from another config; a CUDA device asked
            for but absent; a layer whose map does not fit the icon size.
    """
    t0 = time.perf_counter()
    r = config.render
    run_dir = config.run_dir
    grid_path = run_dir / GRID_NAME
    maps = _check_grid(config, grid_path)
    unknown = sorted(set(r.sizes_for) - {m.name for m in maps})
    if unknown:
        raise AtlasError(f"render.sizes_for names {unknown[0]!r}, which is not a map of this run; its maps are "
                         f"{', '.join(m.name for m in maps)}")
    grids = {(m.name, size): load_grid(grid_path, m.name, size)
             for m in maps for size in r.sizes_of(m.name, config.grid.sizes)}
    layer_of = {m.name: m.layer for m in maps}
    fps = {key: render_fingerprint(config, grid, layer_of[key[0]]) for key, grid in grids.items()}
    todo = [key for key in grids if force or not _is_up_to_date(icons_dir(run_dir, *key), fps[key])]
    if not todo:
        log(f"render: up to date, skipped ({len(grids)} icon folder(s) in {run_dir})")
        return RenderSummary(True, [], "", time.perf_counter() - t0)

    keep_freed_memory()
    device = pick_device(r.device, "render.device")
    model = load_model(config.model, config.weights, config.preprocess)
    # Channels-last runs the convolutions' forward and backward faster on the CPU (measured:
    # benchmarks/render.py) and is neutral or better on a GPU.
    module = model.module.to(device).to(memory_format=torch.channels_last)
    summaries: list[GridIcons] = []
    batches_left = [stop_after_batches]
    with h5py.File(run_dir / ACTIVATIONS_NAME, "r") as acts_h5:
        for layer in dict.fromkeys(m.layer for m in maps):
            keys = [key for key in todo if layer_of[key[0]] == layer]
            if not keys:
                continue
            network = optvis.Network(module, [layer], normalise=model.preprocess.normalise, channels_last=True)
            _check_layer(network, layer, grids[keys[0]], r)
            members = member_cosines(acts_h5[f"layers/{layer}/acts"], [grids[key] for key in keys])
            for key, member_cos in zip(keys, members):
                summary = _render_grid(network, layer, key[0], grids[key], member_cos, config, fps[key],
                                       batches_left, log)
                if summary is None:  # stopped early (tests)
                    return RenderSummary(False, summaries, str(device), time.perf_counter() - t0)
                summaries.append(summary)
    for name, size in grids:
        if (name, size) not in todo:
            summaries.append(GridIcons(name, size, 0, True, 0, 0.0, 0.0, float("nan"), float("nan"),
                                       icons_dir(run_dir, name, size)))
    seconds = time.perf_counter() - t0
    rendered = [s for s in summaries if not s.skipped]
    log(f"render: {sum(s.icons for s in rendered)} icons for {len(rendered)} grid(s) in {seconds:.1f} s on "
        f"{device} ({len(summaries) - len(rendered)} up to date)")
    return RenderSummary(False, summaries, str(device), seconds)


def _check_grid(config: Config, grid_path: Path) -> list[MapSpec]:
    """Returns grid.h5's maps, or raises AtlasError if it is missing, incomplete or stale."""
    run_dir = config.run_dir
    if not grid_path.is_file():
        raise AtlasError(f"{grid_path} not found; run `atlas grid {run_dir}` first")
    fp = read_fingerprint(grid_path)
    if fp is None:
        raise AtlasError(f"{grid_path} is incomplete or unreadable; run `atlas grid {run_dir}` again")
    with h5py.File(grid_path, "r") as h5:
        layout_fp = str(h5.attrs.get("inputs", ""))
        acts_fp = str(h5.attrs.get("activations_fingerprint", ""))
        maps = read_maps(h5)
    missing = [layer for layer in config.layers if layer not in {m.name for m in maps}]
    if missing:
        raise AtlasError(f"{grid_path} has no grids for layer(s) {', '.join(missing)}; "
                         f"run `atlas collect {run_dir}`, `atlas layout {run_dir}` and `atlas grid {run_dir}` first")
    if fp != grid_fingerprint(config, layout_fp, acts_fp):
        raise AtlasError(f"{grid_path} was made with another [grid] config; run `atlas grid {run_dir}` first")
    if read_fingerprint(run_dir / ACTIVATIONS_NAME) != acts_fp:
        raise AtlasError(f"{grid_path} was made from other activations than {run_dir / ACTIVATIONS_NAME}; "
                         f"run `atlas layout {run_dir}` and `atlas grid {run_dir}` first")
    return maps


def _check_layer(network: optvis.Network, layer: str, grid: Grid, r: RenderConfig) -> None:
    """The layer must give a (C, H, W) map with the grid's C channels for an icon-sized input."""
    with torch.no_grad():
        acts = optvis.evaluate(network, torch.full((1, 3, r.icon_size, r.icon_size), 0.5))[layer]
    if acts.dim() != 4 or acts.shape[1] != grid.direction.shape[1]:
        raise AtlasError(f"layer {layer!r} gives activations of shape {tuple(acts.shape[1:])} for a {r.icon_size} px "
                         f"icon, but its grid directions have {grid.direction.shape[1]} channels")


def _is_up_to_date(folder: Path, fp: str) -> bool:
    meta = _read_json(folder / ICONS_JSON)
    if meta is None or meta.get("fingerprint") != fp:
        return False
    return all((folder / str(entry.get("file", ""))).is_file() for entry in meta.get("icons", []))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _render_grid(network: optvis.Network, layer: str, name: str, grid: Grid, member_cos: np.ndarray,
                 config: Config, fp: str, batches_left: list[int | None], log: Callable[[str], None]
                 ) -> GridIcons | None:
    """Renders (or resumes) the icons of map `name`'s grid (a map of `layer`) and writes its folder;
    None if stopped early."""
    r = config.render
    t0 = time.perf_counter()
    out_dir = icons_dir(config.run_dir, name, grid.size)
    partial = out_dir.with_name(f".{out_dir.name}.partial")
    prepare_work_dir(partial, fp)
    m, attempts = len(grid), r.attempts
    jobs_cell = np.repeat(np.arange(m), attempts)  # job j = (cell j // attempts, attempt j % attempts)
    jobs_attempt = np.tile(np.arange(attempts), m)
    n_jobs = len(jobs_cell)
    images = np.zeros((n_jobs, r.icon_size, r.icon_size, 3), np.uint8)
    objective = np.full(n_jobs, -np.inf, np.float32)
    cosine = np.full(n_jobs, np.nan, np.float32)
    done = np.zeros(n_jobs, bool)
    for start, stop, part in _read_parts(partial, n_jobs, r.icon_size):
        images[start:stop], objective[start:stop], cosine[start:stop] = part.images, part.objective, part.cosine
        done[start:stop] = True
    resumed = int(done.sum())
    if resumed:
        log(f"render: {name} {grid.size}x{grid.size}: resuming, {resumed} of {n_jobs} attempts already rendered")

    vectors = grid.direction_whitened if r.whiten else grid.direction
    if vectors is None:
        raise AtlasError("render.whiten = true but grid.h5 has no direction_whitened; set grid.whiten = true and "
                         f"run `atlas grid {config.run_dir}` again")
    seeds = np.array([icon_seed(r.seed, grid.size, int(grid.cell[c, 0]), int(grid.cell[c, 1]), int(a))
                      for c, a in zip(jobs_cell, jobs_attempt)], dtype=object)
    todo = np.flatnonzero(~done)
    batch_size = r.batch_size or _auto_batch_size(network, layer, vectors, r)
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    progress = _progress(m, resumed / attempts, f"render {name} {grid.size}x{grid.size}")
    t_loop = time.perf_counter()
    try:
        for batch in batches:
            # Runs of consecutive jobs are stored as one part each (a batch is one run unless it
            # straddles jobs finished by an interrupted run).
            cells = jobs_cell[batch]
            result = render_icons(network, layer, vectors[cells], grid.direction[cells], list(seeds[batch]), r,
                                  on_step=_stepper(progress, len(batch) / (r.steps * attempts)))
            images[batch], objective[batch], cosine[batch] = result.images, result.objective, result.cosine
            for run_jobs in _consecutive_runs(batch):
                _write_part(partial, int(run_jobs[0]), int(run_jobs[-1]) + 1,
                            IconBatch(images[run_jobs], objective[run_jobs], cosine[run_jobs]))
            if batches_left[0] is not None:
                batches_left[0] -= 1
                if batches_left[0] <= 0:
                    return None
    finally:
        progress.close()
    loop_seconds = time.perf_counter() - t_loop

    best = pick_best(objective, attempts)
    chosen = np.arange(m) * attempts + best
    entries = []
    for c, j in enumerate(chosen):
        x, y = int(grid.cell[c, 0]), int(grid.cell[c, 1])
        entries.append({"cell": [x, y], "file": f"cell-{x}-{y}.png", "objective": float(objective[j]),
                        "cosine": float(cosine[j]), "member_cosine": float(member_cos[c]), "steps": r.steps,
                        "seed": r.seed, "attempt": int(best[c])})
    meta = {"layer": layer, "map": name, "size": grid.size, "icon_size": r.icon_size, "fingerprint": fp,
            "grid_fingerprint": grid.digest(),
            "objective": f"dot(h, v) * max({COS_FLOOR}, cos(h, v))^{r.cos_power:g} at the centre of {layer}, "
                         f"v = the cell's {'whitened ' if r.whiten else ''}direction",
            "steps": r.steps, "attempts": attempts, "seed": r.seed, "member_similarity": MEMBER_SIMILARITY,
            "icons": entries,
            "median_cosine": float(np.median(cosine[chosen])),
            "median_member_cosine": float(np.median(member_cos))}
    _write_folder(out_dir, images[chosen], entries, meta)
    shutil.rmtree(partial, ignore_errors=True)
    seconds = time.perf_counter() - t0
    rendered = (n_jobs - resumed) / attempts
    summary = GridIcons(name, grid.size, m, False, resumed, seconds,
                        rendered / loop_seconds if loop_seconds > 0 else 0.0,
                        meta["median_cosine"], meta["median_member_cosine"], out_dir)
    log(f"render: {name} {grid.size}x{grid.size}: {m} icons in {seconds:.1f} s ({summary.icons_per_s:.2f} icons/s; "
        f"{r.icon_size} px, {r.steps} steps, {attempts} attempt(s)); median cosine to the cell direction: icons "
        f"{summary.median_cosine:.3f}, members {summary.median_member_cosine:.3f}; wrote {out_dir}")
    return summary


CPU_BATCH = 32  # render.batch_size = 0 on the CPU: past this, bigger batches gain little (benchmarks/render.py)
MAX_BATCH = 1024


def _auto_batch_size(network: optvis.Network, layer: str, vectors: np.ndarray, r: RenderConfig) -> int:
    """render.batch_size = 0: CPU_BATCH on the CPU; on a GPU, as many icons as fit in half its free
    memory, from the peak memory of one step of a probe batch."""
    device = network.device
    if device.type != "cuda":
        return CPU_BATCH
    probe = min(8, len(vectors))
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    render_icons(network, layer, vectors[:probe], vectors[:probe], list(range(probe)), dataclasses.replace(r, steps=1))
    per_icon = max(1, (torch.cuda.max_memory_allocated(device) - before) / probe)
    free, _total = torch.cuda.mem_get_info(device)
    return int(np.clip(0.5 * free / per_icon, 1, MAX_BATCH))


def _progress(total: int, initial: float, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="icon", desc=desc, disable=None, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}, {rate_fmt}]")


def _stepper(progress, per_step: float) -> Callable[[int], None]:
    return lambda _step: progress.update(per_step)


def _consecutive_runs(jobs: np.ndarray) -> list[np.ndarray]:
    breaks = np.flatnonzero(np.diff(jobs) != 1) + 1
    return np.split(jobs, breaks)


def _write_part(partial: Path, start: int, stop: int, part: IconBatch) -> None:
    with atomic_path(partial / f"part-{start:07d}-{stop:07d}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=part.images, objective=part.objective, cosine=part.cosine)


def _read_parts(partial: Path, n_jobs: int, icon_size: int):
    """Yields (start, stop, IconBatch) of every readable finished part; unreadable ones are ignored."""
    for path in sorted(partial.glob("part-*.npz")):
        try:
            start, stop = (int(v) for v in path.stem.split("-")[1:3])
            with np.load(path) as data:
                part = IconBatch(data["images"], data["objective"], data["cosine"])
        except (OSError, ValueError, KeyError):
            continue
        if 0 <= start < stop <= n_jobs and part.images.shape == (stop - start, icon_size, icon_size, 3):
            yield start, stop, part


def _write_folder(out_dir: Path, images: np.ndarray, entries: list[dict], meta: dict) -> None:
    """Writes the PNGs and icons.json into a hidden folder, then swaps it in for `out_dir`."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for image, entry in zip(images, entries):
            Image.fromarray(image).save(tmp / entry["file"])
        (tmp / ICONS_JSON).write_text(json.dumps(meta, indent=1) + "\n")
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
