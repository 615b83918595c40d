"""Grid stage: the layout is binned into N x N cells; each kept cell gets a direction and labels.

Reads the run's layout and activations (atlas.store); writes grid.h5: for every map (each layer,
and each focus map of atlas.focus) and every N in `grid.sizes`, a `Grid` (atlas.store.maps):

- `cell` (m, 2) int32: (x, y) = (column, row) of each kept cell, in [0, N); cells are ordered by
  row y, then column x (cell id y * N + x ascending); y grows upwards like the layout's second
  coordinate (the mosaic draws row N - 1 - y).
- `count` (m,) int32: samples in the cell, >= `grid.min_count`.
- `direction` (m, C) float32: mean activation of the cell's samples.
- `indptr` (m + 1,) int64 and `index` (nnz,) int64: the members as CSR; the samples of cell i are
  `index[indptr[i]:indptr[i + 1]]`, ascending sample rows of the layer (a focus map's too).
- `attr` (m, n_classes) float32 mean attribution to every class, and `top_class` (m, k) int32 /
  `top_attr` (m, k) float32, the k = `grid.top_classes` classes with the largest mean
  attribution, largest first (only with attribution).
- `direction_whitened` (m, C) float32 = direction @ S, with S = inv(AᵀA / n + ridge I) of the
  layer's samples stored once per layer (only when `grid.whiten`).

Activations and attributions are read in float32 blocks, so memory stays bounded by the block size
and the cells' sums.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .blocks import iter_blocks, sum_by_cell, take_rows
from .config import Config, GridConfig
from .errors import AtlasError
from .store import Grid, GridSet, LayerSamples, MapLayout, Run

# ---------------------------------------------------------------------------------------------
# Pure core


def bin_layout(xy: np.ndarray, size: int) -> np.ndarray:
    """Returns the cell id y * size + x of every position on a size x size grid over [0, 1]^2.

    Cell (x, y) covers [x / size, (x + 1) / size) x [y / size, (y + 1) / size), the edges k / size
    rounded to float64, so a position on an edge goes to the cell above it.

    Args:
        xy: (n, 2) float positions in [0, 1].
        size: cells per side, >= 1.

    Returns:
        (n,) int64 cell ids in [0, size * size).
    """
    xy = np.asarray(xy)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"xy must be (n, 2), got shape {xy.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if len(xy) and not (np.isfinite(xy).all() and xy.min() >= 0 and xy.max() <= 1):
        raise ValueError("xy must lie in [0, 1]; normalise the layout first")
    edges = np.arange(size + 1, dtype=np.float64) / size
    column_row = np.searchsorted(edges, xy.astype(np.float64), side="right") - 1
    # 1.0 sits on the closing edge of the last cell; the normalised layout always has a sample
    # there, so the last cell is closed on the right rather than opening an (N+1)-th cell.
    np.minimum(column_row, size - 1, out=column_row)
    return column_row[:, 1] * size + column_row[:, 0]


def cosine_to_direction(acts: Any, grids: Sequence[Grid]) -> list[np.ndarray]:
    """For each grid, every member's cosine to its cell's direction, aligned with `grid.index`.

    Args:
        acts: (n, C) activations, array or h5py dataset, read once in float32 blocks for all grids.
        grids: grids over the same samples.

    Returns:
        one (nnz,) float32 array per grid.
    """
    n = len(acts)
    slots, units, out = [], [], []
    for grid in grids:
        slot = np.full(n, -1, np.int64)
        slot[grid.index] = np.repeat(np.arange(len(grid)), np.diff(grid.indptr))
        direction = grid.direction.astype(np.float32)
        slots.append(slot)
        units.append(direction / np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12))
        out.append(np.zeros(n, np.float32))
    for start, block in iter_blocks(acts):
        norms = np.maximum(np.linalg.norm(block, axis=1), 1e-12)
        for slot, unit, cosine in zip(slots, units, out):
            cells = slot[start:start + len(block)]
            rows = np.flatnonzero(cells >= 0)
            cosine[start + rows] = np.einsum("ij,ij->i", block[rows], unit[cells[rows]]) / norms[rows]
    return [cosine[grid.index] for grid, cosine in zip(grids, out)]


def top_classes(attr_mean: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k classes with the largest mean attribution per cell, largest first.

    Args:
        attr_mean: (m, n_classes) float mean attribution.
        k: labels per cell; capped at n_classes.

    Returns:
        (m, k) int32 class indices and (m, k) float32 their attributions; equal values are
        ordered by class index (which of several classes tied for the k-th place is kept is
        unspecified, but the same for the same input).
    """
    attr_mean = np.asarray(attr_mean)
    m, n_classes = attr_mean.shape
    k = min(k, n_classes)
    if k <= 0:
        return np.zeros((m, 0), np.int32), np.zeros((m, 0), np.float32)
    if k < n_classes:
        candidates = np.argpartition(-attr_mean, k - 1, axis=1)[:, :k]
    else:
        candidates = np.broadcast_to(np.arange(n_classes), (m, n_classes))
    values = np.take_along_axis(attr_mean, candidates, axis=1)
    order = np.lexsort((candidates, -values), axis=1)
    return (np.take_along_axis(candidates, order, axis=1).astype(np.int32),
            np.take_along_axis(values, order, axis=1).astype(np.float32))


def whitening_matrix(acts: Any, eps: float = 1e-3) -> np.ndarray:
    """S = inv(AᵀA / n + ridge I), ridge = eps * mean diagonal of AᵀA / n (the article's whitening).

    Args:
        acts: (n, C) array or h5py dataset of activations, read in float32 blocks.
        eps: ridge relative to the mean diagonal, > 0.

    Returns:
        (C, C) float32 symmetric positive definite S.
    """
    c = acts.shape[1]
    moment = np.zeros((c, c))
    n = 0
    for _, block in iter_blocks(acts):
        moment += block.T @ block  # float32 per block, float64 across blocks
        n += len(block)
    if n == 0:
        raise AtlasError("no samples to whiten with")
    moment /= n
    ridge = eps * float(np.trace(moment)) / c
    if not ridge > 0:
        raise AtlasError("all activations are zero, so they cannot be whitened; set grid.whiten = false")
    values, vectors = np.linalg.eigh(moment + ridge * np.eye(c))
    inverse = (vectors / values) @ vectors.T
    return ((inverse + inverse.T) / 2).astype(np.float32)  # exactly symmetric despite rounding


def whiten_directions(direction: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    """Returns direction @ S as float32 (m, C): the objective the render stage aims at."""
    return (direction.astype(np.float64) @ whitening.astype(np.float64)).astype(np.float32)


def bin_grid(xy: np.ndarray, acts: Any, attr: Any | None = None, size: int = 10, *, min_count: int = 3,
             top_k: int = 5) -> Grid:
    """Bins a layout on one size x size grid and summarises each cell with >= min_count samples.

    Args:
        xy: (n, 2) float positions in [0, 1] (a layout, e.g. from `layout_2d`).
        acts: (n, C) activations of the same samples, array or h5py dataset.
        attr: (n, n_classes) attributions, or None (then no class labels).
        size: N, cells per side; default 10.
        min_count: cells with fewer samples are dropped; default 3.
        top_k: class labels kept per cell; default 5.

    Returns:
        The Grid: `cell` (m, 2) int32 (x, y), `count` (m,), `direction` (m, C) mean activation,
        `indptr`/`index` the members as CSR, `attr`, `top_class`, `top_attr` with attribution.
    """
    return bin_grids(xy, acts, attr, (size,), min_count=min_count, top_k=top_k)[size]


def bin_grids(xy: np.ndarray, acts: Any, attr: Any | None, sizes: Iterable[int], *, min_count: int = 3,
              top_k: int = 5) -> dict[int, Grid]:
    """Bins a layout on several grids at once, reading the activations once.

    Args:
        xy: (n, 2) float positions in [0, 1].
        acts: (n, C) activations, array or h5py dataset (read in float32 blocks).
        attr: (n, n_classes) attributions like acts, or None.
        sizes: grid sizes N.
        min_count: cells with fewer samples are dropped, >= 1; default 3.
        top_k: class labels per cell (with attribution); default 5.

    Returns:
        {N: Grid}, without whitened directions (see `whiten_directions`).

    Raises:
        AtlasError: no cell of some grid keeps min_count samples; NaN or inf in acts or attr.
    """
    xy = np.asarray(xy)
    n = len(xy)
    if len(acts) != n or (attr is not None and len(attr) != n):
        with_attr = f" and attr {len(attr)}" if attr is not None else ""
        raise ValueError(f"xy has {n} rows but acts {len(acts)}{with_attr}")
    grids: dict[int, Grid] = {}
    slots: list[np.ndarray] = []  # per size: (n,) row of each sample's kept cell, -1 if dropped
    for size in dict.fromkeys(sizes):
        ids = bin_layout(xy, size)
        counts = np.bincount(ids, minlength=size * size)
        kept = np.flatnonzero(counts >= min_count)
        if len(kept) == 0:
            raise AtlasError(f"no cell of the {size}x{size} grid has {min_count} or more samples ({n} samples, "
                             f"busiest cell {counts.max(initial=0)}); use a smaller grid size in grid.sizes "
                             "or a lower grid.min_count")
        slot_of_id = np.full(size * size, -1, np.int64)
        slot_of_id[kept] = np.arange(len(kept))
        slot = slot_of_id[ids]
        member_rows = np.flatnonzero(slot >= 0)
        index = member_rows[np.argsort(slot[member_rows], kind="stable")]
        indptr = np.zeros(len(kept) + 1, np.int64)
        np.cumsum(counts[kept], out=indptr[1:])
        cell = np.stack([kept % size, kept // size], axis=1).astype(np.int32)
        grids[size] = Grid(size, cell, counts[kept].astype(np.int32), np.empty((0, 0), np.float32), indptr,
                           index.astype(np.int64), min_count=min_count, n_samples=n)
        slots.append(slot)

    sizes = list(grids)
    for what, source in (("direction", acts), ("attr", attr)):
        if source is None:
            continue
        sums = sum_by_cell(source, slots, [len(grids[s]) for s in sizes])
        for size, total in zip(sizes, sums):
            grid = grids[size]
            mean = (total / grid.count[:, None]).astype(np.float32)
            if not np.isfinite(mean).all():
                name = "activations" if what == "direction" else "attributions"
                raise AtlasError(f"the {name} contain NaN or inf; recollect with collect.dtype = \"float32\"")
            setattr(grid, what, mean)
            if what == "attr":
                grid.top_class, grid.top_attr = top_classes(mean, top_k)
    return grids


# ---------------------------------------------------------------------------------------------
# Stage


@dataclasses.dataclass
class GridSummary:
    """What a grid run did."""

    skipped: bool  # True when grid.h5 was up to date
    path: Path  # RUN/grid.h5
    cells: dict[str, dict[int, int]]  # map name -> size -> cells kept
    seconds: float


def run(config: Config, *, force: bool = False, log: Callable[[str], None] = print) -> GridSummary:
    """Runs the grid stage: RUN/layout.h5 + RUN/activations.h5 -> RUN/grid.h5, skipped when up to date.

    Args:
        config: the run's config (`config.grid`, `config.layers`, `config.run_dir`).
        force: redo the grids even when grid.h5 is up to date.
        log: receives one line per map and one overall.
    """
    t0 = time.perf_counter()
    g = config.grid
    store = Run(config.run_dir, config)
    expected = store.expected_grid_fingerprint()
    out_path = store.grid_path
    if not force and store.is_current(out_path, expected):
        log(f"grid: up to date, skipped ({out_path})")
        return GridSummary(True, out_path, {}, 0.0)

    layout = store.layout(upto="grid")
    grids: dict[str, dict[int, Grid]] = {}
    whitening: dict[str, np.ndarray] = {}
    with store.activations("grid") as acts:
        for m in layout.specs:
            samples = acts.layer(m.layer)
            t_map = time.perf_counter()
            try:
                grids[m.name] = _grid_map(samples, layout.maps[m.name], g)
                if g.whiten and m.layer not in whitening:
                    whitening[m.layer] = whitening_matrix(samples.acts, g.whiten_eps)
            except AtlasError as exc:
                raise AtlasError(f"grid of {'map' if m.kind != 'layer' else 'layer'} {m.name!r}: {exc}") from None
            if g.whiten:
                for grid in grids[m.name].values():
                    grid.direction_whitened = whiten_directions(grid.direction, whitening[m.layer])
            log(_map_line(m.name, grids[m.name], len(layout.maps[m.name].xy), time.perf_counter() - t_map))
        names, wnids, acts_fp = acts.class_names, acts.class_wnids, acts.fingerprint
    store.write_grids(GridSet(grids, whitening, names, wnids, expected, layout.fingerprint, acts_fp, config,
                              g.whiten_eps, layout.specs))
    seconds = time.perf_counter() - t0
    log(f"grid: {len(grids)} map(s), sizes {', '.join(map(str, g.sizes))} in {seconds:.1f} s; wrote {out_path} "
        f"({out_path.stat().st_size / 2**20:.1f} MiB)")
    return GridSummary(False, out_path, {name: {s: len(grid) for s, grid in by_size.items()}
                                         for name, by_size in grids.items()}, seconds)


def grid_options(g: GridConfig) -> dict[str, Any]:
    """The keyword arguments of `bin_grid` that the `[grid]` table sets."""
    return {"min_count": g.min_count, "top_k": g.top_classes}


def _grid_map(samples: LayerSamples, layout: MapLayout, g: GridConfig) -> dict[int, Grid]:
    """Bins one map: a layer's samples, or a focus map's subset of them (whose members are then
    renumbered to the layer's sample rows)."""
    if layout.rows is None:
        return bin_grids(layout.xy, samples.acts, samples.attr, g.sizes, **grid_options(g))
    rows = layout.rows
    attr = take_rows(samples.attr, rows) if samples.attr is not None else None
    grids = bin_grids(layout.xy, take_rows(samples.acts, rows), attr, g.sizes, **grid_options(g))
    for grid in grids.values():
        grid.index = rows[grid.index]  # ascending per cell still: rows is sorted
    return grids


def _map_line(name: str, grids: dict[int, Grid], n: int, seconds: float) -> str:
    parts = [f"{s}x{s} {len(grid)} cells ({100 * int(grid.indptr[-1]) / max(n, 1):.0f}% of samples)"
             for s, grid in grids.items()]
    return f"grid: {'map' if '/' in name else 'layer'} {name}: {n} samples; " + ", ".join(parts) + f"; {seconds:.1f} s"
