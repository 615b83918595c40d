"""Render stage: a feature-visualisation icon for every kept cell of every grid.

Reads the run's current grids and activations (atlas.store); writes an icons folder per map (each
layer, and each focus map `<layer>/class-<slug>`, `<layer>/pair-<a>-<b>`; see atlas.focus) and
grid size N in `render.sizes_for[map]`, else `render.sizes`, else all of `grid.sizes`: one
(icon_size, icon_size) RGB icon per kept cell, and icons.json with per icon `cell` [x, y], `file`,
`objective` (its final objective), `cosine` (between its centre activation and the cell's
direction; both measured on the saved 8-bit pixels without transforms), `member_cosine` (the
median cosine of the cell's member activations to the direction), `best_member_objective` (the
largest objective of a member's activation), `steps` (taken; fewer than asked when it stopped
early), `seed`, `attempt`; and for the folder `layer`, `map`, `size`, `icon_size`, `fingerprint`,
`grid_fingerprint` (`Grid.digest()`: icons are kept while their grid's cells and directions stay
the same), `objective` (in words), `steps`, `attempts`, `seed`, `member_similarity`,
`median_cosine` and `median_member_cosine` (medians over cells), `beats_best_member` (the share
of cells whose icon's objective exceeds their best member's).

Icon size: `render.icon_size`, or per layer or map `render.icon_size_for`; 0 = automatic: the
smallest odd number (>= 5) of the layer's strides that is at least 64 px (`auto_icon_size`), so
the map of an icon has a true centre position with rings of positions around it.

Method (Lucid's activation-atlas recipe): each icon maximises dot(h, w) * max(0.1, cos(h, w))^p at
the centre position (W // 2, H // 2) of the layer's map for an icon-sized input, with w the cell's
direction (or its whitened direction), over a Fourier-parameterised decorrelated-colour image
with random pad / jitter / scale / rotation, by Adam (constant lr, or a warm-up + cosine schedule).
Each icon stops once its objective stops rising (`render.stop_window`, `render.stop_rise`; see
`optvis.EarlyStop`) and leaves its batch. All cells of a grid are optimised together,
`render.batch_size` at a time; the best of `render.attempts` attempts (by final objective) is kept.
Icon (cell, attempt) draws every random number from its own generator seeded by (seed, N, x, y,
attempt), so it does not depend on which other icons share its batch, nor on the batch size.

Resuming: finished batches are kept in the map's icons work folder while the fingerprint is the
same; the finished folder replaces the old one in one rename. Several processes share a grid's
icons in blocks of SHARE_JOBS (atlas.distributed: torchrun ranks, or `--shard I/N` jobs and a
final `--merge`); since every icon is seeded by its cell, the icons equal a one-process run's.

`render_icons` is the same optimisation in memory, for directions from a notebook.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import optvis
from .artifacts import atomic_path
from .config import Config, RenderConfig
from .distributed import ALONE, Shard
from .errors import AtlasError
from .focus import MapSpec
from .blocks import iter_blocks
from .grid import cosine_to_direction
from .layer_maps import LayerMap, maps_from_json
from .layers import map_shapes
from .models import LoadedModel, fixed_input_size, load_model
from .runtime import keep_freed_memory
from .store import Grid, Run, icon_file
from .store.fingerprints import icons_fingerprint

MEMBER_SIMILARITY = "median over the cell's members of cos(member activation, direction)"
COS_FLOOR = 0.1  # the atlas objective's floor on the cosine factor


# ---------------------------------------------------------------------------------------------
# Pure core


def icon_seed(seed: int, size: int, x: int, y: int, attempt: int) -> int:
    """The seed of the generator behind icon (cell (x, y) of the size x size grid, attempt)."""
    state = np.random.SeedSequence([seed, size, x, y, attempt]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def icon_transform(icon_size: int, pad: int, jitter: int, scale: float, rotate: float) -> optvis.Transform:
    """The random transforms every icon goes through at every step (see `optvis.standard_transforms`)."""
    return optvis.standard_transforms(icon_size, pad_px=pad, jitter_px=jitter, scale=scale, rotate=rotate)


def icon_objective(layer: str, vectors: np.ndarray, cos_power: float = 3.0) -> optvis.Objective:
    """dot(h, v) * max(0.1, cos(h, v))^p at the map's centre, one (C,) vector v per icon."""
    return optvis.atlas_direction(layer, vectors, cos_power, floor=COS_FLOOR)


@dataclasses.dataclass
class IconBatch:
    """Rendered icons."""

    images: np.ndarray  # (b, S, S, 3) uint8
    objective: np.ndarray  # (b,) float32 final objective on the 8-bit pixels, no transforms
    cosine: np.ndarray  # (b,) float32 cos(centre activation, reference direction)
    steps: np.ndarray  # (b,) int64 optimisation steps each icon took (fewer than asked when it stopped early)


def render_batch(network: optvis.Network, layer: str, vectors: np.ndarray, reference: np.ndarray,
                 seeds: Sequence[int], *, icon_size: int, steps: int, lr: float, cos_power: float, decorrelate: bool,
                 pad: int, jitter: int, scale: float, rotate: float, schedule: str = "constant", warmup: int = 0,
                 stop_window: int = 0, stop_rise: float = 0.0, input_size: int | None = None,
                 on_step: Callable[[int], None] | None = None) -> IconBatch:
    """Optimises one batch of icons together and measures them.

    Args:
        network: the model cut at `layer`, on its device, taking [0, 1] pixels.
        layer: the layer whose centre activation is optimised.
        vectors: (b, C) float32 objective directions (the cells' directions, or whitened ones).
        reference: (b, C) float32 directions the reported cosine is measured against.
        seeds: b seeds, one generator each (see `icon_seed`).
        icon_size, steps, lr, cos_power, decorrelate, pad, jitter, scale, rotate, schedule, warmup,
            stop_window, stop_rise, input_size: see `render_icons`.
        on_step: called with the step number after each step.

    Returns:
        The 8-bit icons, with their objective and cosine measured on exactly those pixels.
    """
    settings = dict(icon_size=icon_size, steps=steps, lr=lr, cos_power=cos_power, decorrelate=decorrelate, pad=pad,
                    jitter=jitter, scale=scale, rotate=rotate, schedule=schedule, warmup=warmup,
                    stop_window=stop_window, stop_rise=stop_rise, input_size=input_size)
    if len(seeds) == 1:
        # oneDNN runs a batch of one through other convolution kernels than any larger batch
        # (whose results per image are identical whatever the batch), and 256 Adam steps through
        # ReLU kinks grow that rounding into visible differences. A lone icon is computed as a
        # pair, so every icon gets the same arithmetic whatever its batch.
        pair = optimize_icons(network, layer, np.repeat(vectors, 2, 0), np.repeat(reference, 2, 0),
                              [seeds[0]] * 2, on_step, **settings)
        return IconBatch(pair.images[:1], pair.objective[:1], pair.cosine[:1], pair.steps[:1])
    return optimize_icons(network, layer, vectors, reference, seeds, on_step, **settings)


def optimize_icons(network: optvis.Network, layer: str, vectors: np.ndarray, reference: np.ndarray,
                   seeds: Sequence[int], on_step: Callable[[int], None] | None, *, icon_size: int, steps: int,
                   lr: float, cos_power: float, decorrelate: bool, pad: int, jitter: int, scale: float,
                   rotate: float, schedule: str = "constant", warmup: int = 0, stop_window: int = 0,
                   stop_rise: float = 0.0, input_size: int | None = None) -> IconBatch:
    """`render_batch` without its care for lone icons: a batch of one may round differently
    from the same icon in a larger batch."""
    size = input_size or icon_size
    generators = optvis.make_generators(seeds)
    if decorrelate:
        image = optvis.fourier_image(size, generators, device=network.device)
    else:
        image = optvis.pixel_image(size, generators, device=network.device)
    objective = icon_objective(layer, vectors, cos_power)
    vis = optvis.optimize(network, objective, image, generators=generators,
                          transform=icon_transform(size, pad, jitter, scale, rotate), steps=steps, lr=lr,
                          schedule=lr_schedule(schedule, steps, warmup),
                          early_stop=early_stop(stop_window, stop_rise), on_step=on_step)
    pixels = (vis.images * 255).round().clamp(0, 255).to(torch.uint8)
    acts = optvis.evaluate(network, pixels.float() / 255)
    centre = optvis.at_position(acts[layer]).float()
    reference_t = torch.as_tensor(reference, dtype=torch.float32, device=centre.device)
    if size != icon_size:
        top, left = centre_window(size, tuple(acts[layer].shape[-2:]), icon_size)
        pixels = pixels[:, :, top:top + icon_size, left:left + icon_size]
    return IconBatch(pixels.permute(0, 2, 3, 1).cpu().numpy(),
                     objective(acts).float().cpu().numpy(),
                     optvis.cosine_at(centre, reference_t).cpu().numpy(), vis.steps.numpy())


SCHEDULES = ("constant", "cosine")


def lr_schedule(name: str, steps: int, warmup: int) -> optvis.Schedule | None:
    """render.schedule as a schedule: "constant" (None: Adam's lr throughout), or "cosine" (a
    linear warm-up over `warmup` steps, then a half cosine from lr to 0 at the last step)."""
    if name == "constant":
        return None
    if name == "cosine":
        return optvis.warmup_cosine(steps, warmup=min(warmup, steps - 1))
    raise ValueError(f"unknown schedule {name!r}; use one of {', '.join(SCHEDULES)}")


def early_stop(window: int, min_rise: float) -> optvis.EarlyStop | None:
    """render.stop_window and render.stop_rise as an `optvis.EarlyStop` (None when window is 0)."""
    return optvis.EarlyStop(window, min_rise) if window > 0 else None


def centre_window(input_size: int, map_hw: tuple[int, int], icon_size: int) -> tuple[int, int]:
    """(top, left) of the icon_size square of an input_size image centred on the map's centre
    position (the one the objective reads), kept inside the image."""
    corner = []
    for n in map_hw:
        centre = (n // 2 + 0.5) * input_size / n
        corner.append(int(np.clip(round(centre - icon_size / 2), 0, input_size - icon_size)))
    return corner[0], corner[1]


def render_icons(model: nn.Module | LoadedModel, layer: str, directions: np.ndarray, *,
                 reference: np.ndarray | None = None, seeds: Sequence[int] | None = None, seed: int = 0,
                 icon_size: int = 64, steps: int = 256, lr: float = 0.05, cos_power: float = 3.0,
                 decorrelate: bool = True, pad: int = 4, jitter: int = 4, scale: float = 0.1, rotate: float = 5.0,
                 schedule: str = "constant", warmup: int = 0, stop_window: int = 0, stop_rise: float = 0.0,
                 batch_size: int = 32, normalise: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 input_size: int | None = None, layer_map: LayerMap | None = None,
                 precision: str = "float32", compile: bool = False,
                 device: str | torch.device = "cpu") -> IconBatch:
    """Renders an atlas icon for each direction, in memory (no files).

    Each icon maximises dot(h, v) * max(0.1, cos(h, v))^cos_power at the centre of `layer`'s map
    for an icon-sized input, with v its direction, from a Fourier-parameterised image through
    random pad, jitter, scale and rotation, by Adam. A model that takes one input size (a vision
    transformer) is optimised at that size, and the icon is the icon_size square around the
    centre position.

    Args:
        model: an `nn.Module` (taking normalised inputs) or a `LoadedModel` (its preprocessing's
            normalisation is used).
        layer: a dotted layer name whose output reads as a map (see `layer_map`).
        directions: (m, C) float directions, e.g. a Grid's `direction`.
        reference: (m, C) directions the reported cosine is measured against; default `directions`.
        seeds: m seeds, one per icon; default `icon_seed(seed, 0, i, 0, 0)` for icon i.
        seed: see `seeds`; default 0.
        icon_size: icon side in pixels, >= 16, or 0 for the layer's automatic side
            (`auto_icon_size`); default 64.
        steps: Adam steps; default 256.
        lr: Adam's learning rate (its peak under a schedule); default 0.05.
        cos_power: p of the objective; default 3.
        decorrelate: decorrelated-colour Fourier image (False: plain pixels); default True.
        pad, jitter: pixels of padding and of random translation (pad >= jitter); default 4, 4.
        scale: random scale drawn from [1 - scale, 1 + scale]; default 0.1.
        rotate: random rotation in degrees drawn from [-rotate, rotate]; default 5.
        schedule, warmup: learning rate over the steps, "constant" or "cosine" (a linear warm-up
            over `warmup` steps, then a half cosine to 0); default "constant", 0.
        stop_window, stop_rise: early stopping (`optvis.EarlyStop`): an icon stops once its mean
            objective over the last stop_window steps rose less than stop_rise (relative) over
            the window before; default 0 = no early stopping.
        batch_size: icons optimised together; default 32.
        normalise: [0, 1] pixels -> model input; default the LoadedModel's, else identity.
        input_size: side of the optimised image; default `models.fixed_input_size(model)` for a
            model that takes one size, else icon_size.
        layer_map: how the layer's output reads as a map (`atlas.layer_maps`); default resolved
            from its shape ("auto").
        precision: "float32", or "bfloat16" (the model under bf16 autocast); default "float32".
        compile: run the model through `torch.compile`; default False.
        device: where the model runs; default "cpu". The model is moved there.

    Returns:
        IconBatch: `images` (m, S, S, 3) uint8 (S = icon_size), `objective` (m,) and `cosine` (m,)
        float32, `steps` (m,) int64.
    """
    if isinstance(model, LoadedModel):
        normalise = normalise or model.preprocess.normalise
        model = model.module
    directions = np.asarray(directions, np.float32)
    reference = directions if reference is None else np.asarray(reference, np.float32)
    seeds = list(seeds) if seeds is not None else [icon_seed(seed, 0, i, 0, 0) for i in range(len(directions))]
    module = model.to(torch.device(device)).to(memory_format=torch.channels_last)
    if layer_map is None:
        probe = input_size or fixed_input_size(module) or icon_size or PROBE_PX
        layer_map = map_shapes(module, (3, probe, probe), [layer])[0][layer]
    network = optvis.Network(module, [layer], normalise=normalise, channels_last=True, maps={layer: layer_map},
                             autocast=AUTOCAST[precision], compile=compile)
    icon_size = icon_size or auto_icon_size(network, layer, input_size or fixed_input_size(module))
    input_size = input_size or optimisation_size(module, icon_size)
    if input_size is not None and input_size < icon_size:
        raise AtlasError(f"icon_size {icon_size} is larger than the {input_size} px image the icons are optimised at")
    settings = dict(icon_size=icon_size, steps=steps, lr=lr, cos_power=cos_power, decorrelate=decorrelate, pad=pad,
                    jitter=jitter, scale=scale, rotate=rotate, schedule=schedule, warmup=warmup,
                    stop_window=stop_window, stop_rise=stop_rise, input_size=input_size)
    parts = [render_batch(network, layer, directions[a:a + batch_size], reference[a:a + batch_size],
                          seeds[a:a + batch_size], **settings) for a in range(0, len(directions), batch_size)]
    if not parts:
        return IconBatch(np.zeros((0, icon_size, icon_size, 3), np.uint8), np.zeros(0, np.float32),
                         np.zeros(0, np.float32), np.zeros(0, np.int64))
    return IconBatch(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(IconBatch)))


def icon_options(r: RenderConfig) -> dict[str, Any]:
    """The keyword arguments of `render_batch` that the `[render]` table sets."""
    return dict(icon_size=r.icon_size, steps=r.steps, lr=r.lr, cos_power=r.cos_power, decorrelate=r.decorrelate,
                pad=r.pad, jitter=r.jitter, scale=r.scale, rotate=r.rotate, schedule=r.schedule, warmup=r.warmup,
                stop_window=r.stop_window, stop_rise=r.stop_rise)


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


def best_member_objectives(acts: Any, grids: Sequence[Grid], vectors: Sequence[np.ndarray],
                           cos_power: float) -> list[np.ndarray]:
    """Per grid, the (m,) float32 largest atlas objective dot(h, w) * max(0.1, cos(h, w))^p over each
    cell's members h, with w the cell's row of `vectors` (what its icon maximises): the bar an icon
    has to clear to stand for its cell better than any real sample of it.

    Args:
        acts: (n, C) activations, array or h5py dataset (read once, in float32 blocks).
        grids: grids over the same samples.
        vectors: per grid, (m, C) objective directions (directions, or whitened directions).
        cos_power: p.
    """
    n = len(acts)
    slots, out = [], []
    for grid in grids:
        slot = np.full(n, -1, np.int64)
        slot[grid.index] = np.repeat(np.arange(len(grid)), np.diff(grid.indptr))
        slots.append(slot)
        out.append(np.full(len(grid), -np.inf, np.float32))
    units = [v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12) for v in vectors]
    for start, block in iter_blocks(acts):
        norms = np.maximum(np.linalg.norm(block, axis=1), 1e-8)
        for slot, w, unit, best in zip(slots, vectors, units, out):
            cells = slot[start:start + len(block)]
            rows = np.flatnonzero(cells >= 0)
            dot = np.einsum("ij,ij->i", block[rows], w[cells[rows]])
            cos = np.einsum("ij,ij->i", block[rows], unit[cells[rows]]) / norms[rows]
            value = (dot * np.maximum(cos, COS_FLOOR) ** cos_power).astype(np.float32)
            np.maximum.at(best, cells[rows], value)
    return out


def pick_best(objective: np.ndarray, attempts: int) -> np.ndarray:
    """(m,) index of the best attempt per cell, from (m * attempts,) objectives in (cell, attempt) order."""
    return objective.reshape(-1, attempts).argmax(axis=1)


# ---------------------------------------------------------------------------------------------
# Stage


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
    written: bool = True  # False for a shard that left the folder to rank 0 or to --merge
    beats_best_member: float = float("nan")  # share of cells whose icon's objective exceeds every member's


@dataclasses.dataclass
class RenderSummary:
    """What a render run did."""

    skipped: bool  # True when every icons folder was up to date
    grids: list[GridIcons]
    device: str
    seconds: float


def run(config: Config, *, force: bool = False, log: Callable[[str], None] = print, shard: Shard = ALONE,
        merge: bool = False) -> RenderSummary:
    """Runs the render stage: the current grids -> an icons folder per map and size, skipping
    folders that are up to date.

    Args:
        config: the run's config (`config.render`, `config.layers`, model, weights, preprocess).
        force: render again even what is up to date.
        log: receives one summary line per grid and one overall.
        shard: this process's share of every grid's icons (atlas.distributed): under torchrun
            every rank renders its blocks and rank 0 writes the folders; an independent
            `--shard I/N` job only renders its blocks.
        merge: render nothing; write the folders from the icons the shards left.

    Raises:
        AtlasError: grid.h5 missing, incomplete or stale; a CUDA device asked for but absent; a
            layer whose map does not fit the icon size.
    """
    t0 = time.perf_counter()
    r = config.render
    store = Run(config.run_dir, config)
    grid_file = store.grid_file("render")
    specs = grid_file.specs
    names = {m.name for m in specs}
    for key, known in (("sizes_for", names), ("icon_size_for", names | {m.layer for m in specs})):
        unknown = sorted(set(getattr(r, key)) - known)
        if unknown:  # a mistyped name would otherwise apply to nothing
            raise AtlasError(f"render.{key} names {unknown[0]!r}, which is not a map of this run; its maps are "
                             f"{', '.join(m.name for m in specs)}")
    jobs = [(m, size) for m in specs for size in r.sizes_of(m.name, config.grid.sizes)]
    grids = {(m.name, size): grid_file.grid(m.name, size) for m, size in jobs}
    # a merge writes every folder whose pieces are on disk, even over current icons (shards run with --force)
    todo = [(m, size) for m, size in jobs if force or store.icons_state(m, grids[(m.name, size)])[0] != "current"
            or (merge and store.icons_work_dir(m.name, size).exists())]
    if not todo:
        log(f"render: up to date, skipped ({len(jobs)} icon folder(s) in {store.root})")
        return RenderSummary(True, [], "", time.perf_counter() - t0)

    keep_freed_memory()
    device = torch.device("cpu") if merge else shard.device(r.device, "render.device")  # a merge renders nothing
    model = load_model(config.model, config.weights, config.preprocess)
    # Channels-last runs the convolutions' forward and backward faster on the CPU (measured:
    # benchmarks/render.py) and is neutral or better on a GPU.
    module = model.module.to(device).to(memory_format=torch.channels_last)
    fixed = fixed_input_size(module)
    summaries: list[GridIcons] = []
    with store.activations("render") as acts:
        maps = maps_from_json(acts.layer_maps, config.layers)
        for layer in dict.fromkeys(m.layer for m in specs):
            keys = [(m, size) for m, size in todo if m.layer == layer]
            if not keys:
                continue
            network = optvis.Network(module, [layer], normalise=model.preprocess.normalise, channels_last=True,
                                     maps={layer: maps[layer]}, autocast=AUTOCAST[r.precision], compile=r.compile)
            auto = None  # the layer's automatic icon side, measured once when a map asks for it
            layer_grids = [grids[(m.name, size)] for m, size in keys]
            members = member_cosines(acts.layer(layer).acts, layer_grids)
            bests = best_member_objectives(acts.layer(layer).acts, layer_grids,
                                           [g.direction_whitened if r.whiten else g.direction for g in layer_grids],
                                           r.cos_power)
            for (m, size), member_cos, member_best in zip(keys, members, bests):
                icon_size = r.icon_size_of(m.name)
                if not icon_size:
                    auto = auto or auto_icon_size(network, layer, fixed)
                    icon_size = auto
                input_size = optimisation_size(module, icon_size)
                if input_size is not None and (m, size) == keys[0]:
                    log(f"render: the model takes {input_size} px inputs only: {layer}'s icons are optimised at "
                        f"{input_size} px and cut to the {icon_size} px square around the centre position")
                _check_layer(network, layer, grids[(m.name, size)], input_size or icon_size)
                summaries.append(_render_grid(store, network, m, grids[(m.name, size)], member_cos, member_best,
                                              icon_size, input_size, log, shard, merge))
    for m, size in jobs:
        if (m, size) not in todo:
            summaries.append(GridIcons(m.name, size, 0, True, 0, 0.0, 0.0, float("nan"), float("nan"),
                                       store.icons_dir(m.name, size)))
    seconds = time.perf_counter() - t0
    rendered = [s for s in summaries if not s.skipped]
    if not (shard.writes_result or merge):
        log(f"render: {shard.describe()}: its share of {len(rendered)} grid(s) in {seconds:.1f} s on {device}; "
            + ("rank 0 writes the icon folders" if shard.group else
               f"when every shard has finished, run `atlas render {config.run_dir} --merge`"))
    else:
        log(f"render: {sum(s.icons for s in rendered)} icons for {len(rendered)} grid(s) in {seconds:.1f} s on "
            f"{device} ({len(summaries) - len(rendered)} up to date)")
    return RenderSummary(False, summaries, str(device), seconds)


AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16}  # render.precision -> the Network's autocast dtype
AUTO_MIN_PX = 64  # render.icon_size = 0: automatic icons are at least this wide (the old fixed default)
# ... and at least this many strides: on the demo's fireboat cells at blocks.15 (stride 32), 3 strides
# (96 px) reached a median cosine of 0.798, 4 (128 px) 0.854, 5 (160 px) 0.865, against the members' 0.817
AUTO_MIN_STRIDES = 5
PROBE_PX = 224  # the input side the layer's stride is measured at


def icon_size_for_stride(stride: int, minimum: int = AUTO_MIN_PX, min_strides: int = AUTO_MIN_STRIDES) -> int:
    """The icon side for a layer of this stride: the smallest odd number n >= min_strides of
    strides with n * stride >= minimum. Such an input gives an n x n map (where the padding adds no
    position of its own) whose centre position (n // 2, n // 2) sees the centre of the icon, with
    rings of positions around it; an even map has no centre position, and 2x2 no ring."""
    if stride < 1 or minimum < 1 or min_strides < 1:
        raise ValueError(f"stride, minimum and min_strides must be >= 1, got {stride}, {minimum}, {min_strides}")
    n = max(min_strides, -(-minimum // stride))
    return (n + 1 - n % 2) * stride


def map_hw(network: optvis.Network, layer: str, size: int) -> tuple[int, int]:
    """(H, W) of the layer's map for a size x size input."""
    with torch.no_grad():
        return tuple(optvis.evaluate(network, torch.full((1, 3, size, size), 0.5))[layer].shape[-2:])


def auto_icon_size(network: optvis.Network, layer: str, fixed_input: int | None = None,
                   minimum: int = AUTO_MIN_PX, min_strides: int = AUTO_MIN_STRIDES) -> int:
    """render.icon_size = 0: `icon_size_for_stride` of the layer's stride, measured as the input
    side over the map side at PROBE_PX (or at the model's one input size), and checked: the icon
    must give an odd, square map of at least 3x3.

    Raises:
        AtlasError: the measured size does not give such a map (set render.icon_size_for).
    """
    probe = fixed_input or PROBE_PX
    h, w = map_hw(network, layer, probe)
    stride = max(1, round(probe / max(h, w)))
    size = icon_size_for_stride(stride, minimum, min_strides)
    if fixed_input is not None:  # a ViT: icons are cut from its one input size
        return min(size, fixed_input)
    got = map_hw(network, layer, size)
    if got[0] != got[1] or got[0] % 2 == 0 or got[0] < 3:
        raise AtlasError(f"render.icon_size = 0 picked {size} px for layer {layer!r} (stride {stride}), but that "
                         f"gives a {got[0]}x{got[1]} map, not an odd square of at least 3x3; set "
                         f"render.icon_size_for.{layer} to a side that does")
    return size


def optimisation_size(module: nn.Module, icon_size: int) -> int | None:
    """The side icons are optimised at when it is not icon_size: the one input size of a model that
    takes one size only (a ViT), else None.

    Raises:
        AtlasError: icon_size is larger than that size.
    """
    size = fixed_input_size(module)
    if size is None or size == icon_size:
        return None
    if icon_size > size:
        raise AtlasError(f"render.icon_size = {icon_size} is larger than the {size} px inputs the model takes; "
                         f"set render.icon_size to at most {size}")
    return size


def _check_layer(network: optvis.Network, layer: str, grid: Grid, input_size: int) -> None:
    """The layer must give a (C, H, W) map with the grid's C channels for an input_size input."""
    try:
        with torch.no_grad():
            acts = optvis.evaluate(network, torch.full((1, 3, input_size, input_size), 0.5))[layer]
    except (RuntimeError, ValueError, AssertionError) as exc:  # the model's own check of its input
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AtlasError(f"the model fails on a {input_size} px icon input at layer {layer!r} ({reason}); if it takes "
                         "one input size only, set render.icon_size to that size") from None
    if acts.dim() != 4 or acts.shape[1] != grid.direction.shape[1]:
        raise AtlasError(f"layer {layer!r} gives activations of shape {tuple(acts.shape[1:])} for a {input_size} px "
                         f"icon, but its grid directions have {grid.direction.shape[1]} channels")


SHARE_JOBS = 32  # render jobs per block shared out between processes: block k belongs to shard k mod N


def _render_grid(store: Run, network: optvis.Network, spec: MapSpec, grid: Grid, member_cos: np.ndarray,
                 member_best: np.ndarray, icon_size: int, input_size: int | None, log: Callable[[str], None], shard: Shard = ALONE,
                 merge: bool = False) -> GridIcons:
    """Renders (or resumes) this process's share of the icons of one map's grid, and writes its
    folder when this process writes results (see atlas.distributed)."""
    config = store.config
    r = config.render
    layer, name = spec.layer, spec.name
    t0 = time.perf_counter()
    fp = icons_fingerprint(config, grid, spec)
    partial = store.icons_work_dir(name, grid.size)
    shard.prepare_work_dir(partial, fp, merge=merge, what="icons")
    m, attempts = len(grid), r.attempts
    jobs_cell = np.repeat(np.arange(m), attempts)  # job j = (cell j // attempts, attempt j % attempts)
    jobs_attempt = np.tile(np.arange(attempts), m)
    n_jobs = len(jobs_cell)
    done = _read_jobs(partial, n_jobs, icon_size)[1]
    resumed = int(done.sum())
    todo = [] if merge else np.flatnonzero(~done & shard_mask(n_jobs, shard))
    if resumed and len(todo):
        log(f"render: {name} {grid.size}x{grid.size}: resuming, {resumed} of {n_jobs} attempts already rendered")

    # config validation asks grid.whiten for render.whiten, and a current grid was made with it
    vectors = grid.direction_whitened if r.whiten else grid.direction
    seeds = np.array([icon_seed(r.seed, grid.size, int(grid.cell[c, 0]), int(grid.cell[c, 1]), int(a))
                      for c, a in zip(jobs_cell, jobs_attempt)], dtype=object)
    settings = {**icon_options(r), "icon_size": icon_size, "input_size": input_size}
    batch_size = (r.batch_size or _auto_batch_size(network, layer, vectors, settings)) if len(todo) else 1
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    progress = _progress(len(todo) / attempts, f"render {name} {grid.size}x{grid.size}",
                         show=shard.leads)
    t_loop = time.perf_counter()
    try:
        for batch in batches:
            # Runs of consecutive jobs are stored as one part each (a batch is one run unless it
            # straddles jobs finished by an interrupted run or owned by another shard).
            cells = jobs_cell[batch]
            result = render_batch(network, layer, vectors[cells], grid.direction[cells], list(seeds[batch]),
                                  **settings, on_step=_stepper(progress, len(batch) / (r.steps * attempts)))
            for run_jobs in _consecutive_runs(batch):
                at = np.searchsorted(batch, run_jobs)
                _write_part(partial, int(run_jobs[0]), int(run_jobs[-1]) + 1,
                            IconBatch(result.images[at], result.objective[at], result.cosine[at], result.steps[at]))
    finally:
        progress.close()
    loop_seconds = time.perf_counter() - t_loop
    rendered = len(todo) / attempts
    rate = rendered / loop_seconds if loop_seconds > 0 else 0.0
    shard.barrier()  # under torchrun: every rank's icons of this grid are on disk

    if not (shard.writes_result or merge):
        log(f"render: {name} {grid.size}x{grid.size}: {shard.describe()}: {rendered:.0f} icons in "
            f"{loop_seconds:.1f} s ({rate:.2f} icons/s)")
        return GridIcons(name, grid.size, 0, False, resumed, time.perf_counter() - t0, rate, float("nan"),
                         float("nan"), store.icons_dir(name, grid.size), written=False)
    finished, done = _read_jobs(partial, n_jobs, icon_size)
    objective, cosine = finished.objective, finished.cosine
    if not done.all():
        missing = np.flatnonzero(~done)
        raise AtlasError(f"render: {name} {grid.size}x{grid.size} lacks {len(missing)} of {n_jobs} icons (job "
                         f"{missing[0]} first; block k of {SHARE_JOBS} jobs belongs to shard k mod N of --shard "
                         f"I/N): run those shards again, or `atlas render {config.run_dir}` to render the rest here")

    best = pick_best(objective, attempts)
    chosen = np.arange(m) * attempts + best
    entries = []
    for c, j in enumerate(chosen):
        x, y = int(grid.cell[c, 0]), int(grid.cell[c, 1])
        entries.append({"cell": [x, y], "file": icon_file(x, y), "objective": float(objective[j]),
                        "cosine": float(cosine[j]), "member_cosine": float(member_cos[c]),
                        "best_member_objective": float(member_best[c]), "steps": int(finished.steps[j]),
                        "seed": r.seed, "attempt": int(best[c])})
    meta = {"layer": layer, "map": name, "size": grid.size, "icon_size": icon_size,
            **({"input_size": input_size} if input_size else {}), "fingerprint": fp,
            "grid_fingerprint": grid.digest(),
            "objective": f"dot(h, v) * max({COS_FLOOR}, cos(h, v))^{r.cos_power:g} at the centre of {layer}, "
                         f"v = the cell's {'whitened ' if r.whiten else ''}direction",
            "steps": r.steps, "attempts": attempts, "seed": r.seed, "member_similarity": MEMBER_SIMILARITY,
            "icons": entries,
            "median_cosine": float(np.median(cosine[chosen])),
            "median_member_cosine": float(np.median(member_cos)),
            "beats_best_member": float(np.mean(objective[chosen] > member_best))}
    icons = store.write_icons(name, grid.size, finished.images[chosen], entries, meta)
    shutil.rmtree(partial, ignore_errors=True)
    seconds = time.perf_counter() - t0
    summary = GridIcons(name, grid.size, m, False, resumed, seconds, rate, meta["median_cosine"],
                        meta["median_member_cosine"], icons.folder, beats_best_member=meta["beats_best_member"])
    log(f"render: {name} {grid.size}x{grid.size}: {m} icons in {seconds:.1f} s ({summary.icons_per_s:.2f} icons/s"
        f"{f' on {shard.describe()}' if shard.group else ''}; "
        f"{icon_size} px{f' cut from {input_size} px' if input_size else ''}, {_steps_note(r, finished.steps[chosen])}, "
        f"{attempts} "
        f"attempt(s)); median cosine to the cell direction: icons "
        f"{summary.median_cosine:.3f}, members {summary.median_member_cosine:.3f}; icons beat their cell's best "
        f"member on the objective in {summary.beats_best_member:.0%} of cells; wrote {icons.folder}")
    return summary


def _steps_note(r: RenderConfig, steps: np.ndarray) -> str:
    """How many steps the icons took: "256 steps", or with early stopping "112 steps on average (of 256)"."""
    if r.stop_window == 0:
        return f"{r.steps} steps"
    return f"{float(np.mean(steps)):.0f} steps on average (of {r.steps})"


def shard_mask(n_jobs: int, shard: Shard) -> np.ndarray:
    """(n_jobs,) bool: the jobs of this shard, whole blocks of SHARE_JOBS jobs (k mod N == I)."""
    return (np.arange(n_jobs) // SHARE_JOBS) % shard.count == shard.index


CPU_BATCH = 32  # render.batch_size = 0 on the CPU: past this, bigger batches gain little (benchmarks/render.py)
MAX_BATCH = 1024


def _auto_batch_size(network: optvis.Network, layer: str, vectors: np.ndarray, settings: dict[str, Any]) -> int:
    """render.batch_size = 0: CPU_BATCH on the CPU; on a GPU, as many icons as fit in half its free
    memory, from the peak memory of one step of a probe batch."""
    device = network.device
    if device.type != "cuda":
        return CPU_BATCH
    probe = min(8, len(vectors))
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    render_batch(network, layer, vectors[:probe], vectors[:probe], list(range(probe)), **{**settings, "steps": 1})
    per_icon = max(1, (torch.cuda.max_memory_allocated(device) - before) / probe)
    free, _total = torch.cuda.mem_get_info(device)
    return int(np.clip(0.5 * free / per_icon, 1, MAX_BATCH))


def _progress(total: float, desc: str, show: bool):
    """A progress bar on a terminal (one process of a torchrun group shows its own; the others stay quiet)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="icon", desc=desc, disable=None if show else True, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}, {rate_fmt}]")


def _stepper(progress, per_step: float) -> Callable[[int], None]:
    return lambda _step: progress.update(per_step)


def _consecutive_runs(jobs: np.ndarray) -> list[np.ndarray]:
    breaks = np.flatnonzero(np.diff(jobs) != 1) + 1
    return np.split(jobs, breaks)


def _write_part(partial: Path, start: int, stop: int, part: IconBatch) -> None:
    with atomic_path(partial / f"part-{start:07d}-{stop:07d}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, images=part.images, objective=part.objective, cosine=part.cosine, steps=part.steps)


def _read_jobs(partial: Path, n_jobs: int, icon_size: int) -> tuple[IconBatch, np.ndarray]:
    """The finished jobs in a work folder: an IconBatch of n_jobs (objective -inf, cosine NaN and
    steps 0 where not done) and done (n_jobs,) bool."""
    jobs = IconBatch(np.zeros((n_jobs, icon_size, icon_size, 3), np.uint8), np.full(n_jobs, -np.inf, np.float32),
                     np.full(n_jobs, np.nan, np.float32), np.zeros(n_jobs, np.int64))
    done = np.zeros(n_jobs, bool)
    for start, stop, part in _read_parts(partial, n_jobs, icon_size):
        for field in dataclasses.fields(IconBatch):
            getattr(jobs, field.name)[start:stop] = getattr(part, field.name)
        done[start:stop] = True
    return jobs, done


def _read_parts(partial: Path, n_jobs: int, icon_size: int):
    """Yields (start, stop, IconBatch) of every readable finished part; unreadable ones are ignored."""
    for path in sorted(partial.glob("part-*.npz")):
        try:
            start, stop = (int(v) for v in path.stem.split("-")[1:3])
            with np.load(path) as data:
                part = IconBatch(data["images"], data["objective"], data["cosine"], data["steps"])
        except (OSError, ValueError, KeyError):
            continue
        if 0 <= start < stop <= n_jobs and part.images.shape == (stop - start, icon_size, icon_size, 3):
            yield start, stop, part
