"""Grid stage: the layout is binned into N x N cells; each kept cell gets a direction and labels.

Reads  `RUN/layout.h5` (`/<layer>/xy`) and `RUN/activations.h5` (`/layers/<layer>/acts`, `attr`,
`/classes/name`, `/classes/wnid`).
Writes `RUN/grid.h5`, for every layer and every grid size N in `grid.sizes`:

- `/<layer>/<N>/cell` (m, 2) int32: (x, y) = (column, row) of the cell, each in [0, N); cells are
  ordered by row y, then column x (cell id y * N + x ascending); y grows upwards like the layout's
  second coordinate (the mosaic draws row N - 1 - y).
- `/<layer>/<N>/count` (m,) int32: samples in the cell, >= `grid.min_count`.
- `/<layer>/<N>/direction` (m, C) float32: mean activation of the cell's samples.
- `/<layer>/<N>/indptr` (m + 1,) int64 and `index` (nnz,) int64: the members as CSR; the samples
  of cell i are `index[indptr[i]:indptr[i + 1]]`, ascending row numbers of `/layers/<layer>/acts`.
- `/<layer>/<N>/attr` (m, n_classes) float32: mean attribution to every class (only when
  activations.h5 has attribution).
- `/<layer>/<N>/top_class` (m, k) int32 and `top_attr` (m, k) float32: the k = `grid.top_classes`
  classes with the largest mean attribution, largest first (only with attribution).
- `/<layer>/<N>/direction_whitened` (m, C) float32 = direction @ S and `/<layer>/whitening` (C, C)
  float32 S = inv(AᵀA / n + ridge I) (only when `grid.whiten`).
- attrs of `/<layer>/<N>`: `size`, `min_count`, `n_samples` (samples binned), `n_kept` (samples in
  kept cells); of `/<layer>/whitening`: `eps`, `n_samples`.
- `/classes/name` (n_classes,) str and `/classes/wnid` (n_classes,) str, copied from
  activations.h5 when present, so labels can be named from grid.h5 alone.
- focus maps (class atlases, two-class views; see atlas.focus): the same datasets under
  `/<layer>/class-<slug>/<N>/` and `/<layer>/pair-<a>-<b>/<N>/`, binned from their own layout;
  their `index` holds rows of the layer's `/layers/<layer>/acts` like a layer's own grid, and their
  `direction_whitened` uses the layer's `whitening`.
- file attrs: `stage`="grid", `fingerprint`, `inputs` (layout.h5's fingerprint),
  `activations_fingerprint`, `config` (JSON), `atlas_version`, `layers` (JSON list), `maps` (JSON
  list, as in layout.h5), `sizes` (JSON list), `complete`=True.

Activations and attributions are read in float32 blocks, so memory stays bounded by the block size
and the cells' sums.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .artifacts import atomic_path, fingerprint, is_up_to_date, read_fingerprint, write_provenance
from .config import Config, GridConfig
from .errors import AtlasError
from .focus import MapSpec, maps_to_json, read_classes, read_maps
from .layout import LAYOUT_NAME, iter_blocks, layout_fingerprint, open_activations, take_rows

GRID_NAME = "grid.h5"


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


def cosine_to_direction(acts: Any, grids: Sequence["Grid"]) -> list[np.ndarray]:
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


@dataclasses.dataclass
class Grid:
    """The kept cells of one layer's layout on one N x N grid."""

    size: int  # N
    cell: np.ndarray  # (m, 2) int32 (x, y), ordered by y then x
    count: np.ndarray  # (m,) int32 samples per cell
    direction: np.ndarray  # (m, C) float32 mean activation
    indptr: np.ndarray  # (m + 1,) int64 CSR row pointers into `index`
    index: np.ndarray  # (nnz,) int64 sample rows of /layers/<layer>/acts, ascending per cell
    attr: np.ndarray | None = None  # (m, n_classes) float32 mean attribution
    top_class: np.ndarray | None = None  # (m, k) int32 classes by mean attribution, largest first
    top_attr: np.ndarray | None = None  # (m, k) float32 their mean attribution
    direction_whitened: np.ndarray | None = None  # (m, C) float32 direction @ S
    min_count: int = 1  # cells with fewer samples were dropped
    n_samples: int = 0  # samples binned (kept or not)

    def __len__(self) -> int:
        return len(self.count)

    def digest(self) -> str:
        """A hash of what the grid's icons depend on: the cells and their (whitened) directions.

        Icons are reused while it stays the same, even when grid.h5 is rewritten (for a new layer,
        focus map or grid size elsewhere in the run).
        """
        h = hashlib.sha256(str(self.size).encode())
        for array in (self.cell, self.direction, self.direction_whitened):
            if array is not None:
                h.update(str(array.dtype).encode() + str(array.shape).encode())
                h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()[:20]

    def members(self, i: int) -> np.ndarray:
        """(count[i],) int64 sample rows of cell i."""
        return self.index[self.indptr[i]:self.indptr[i + 1]]

    def find(self, x: int, y: int) -> int | None:
        """Index of the kept cell at column x, row y, or None."""
        ids = self.cell[:, 1].astype(np.int64) * self.size + self.cell[:, 0]
        i = int(np.searchsorted(ids, y * self.size + x))
        return i if i < len(ids) and ids[i] == y * self.size + x else None

    def labels(self, class_names: Sequence[str] | None = None) -> list[list[tuple[str, float]]]:
        """Per cell, its top classes as (name, mean attribution); [] per cell without attribution."""
        if self.top_class is None or self.top_attr is None:
            return [[] for _ in range(len(self))]
        name = (lambda c: class_names[c]) if class_names is not None else (lambda c: f"class {c}")
        return [[(name(int(c)), float(a)) for c, a in zip(cs, avs)]
                for cs, avs in zip(self.top_class, self.top_attr)]

    def save(self, group: h5py.Group) -> None:
        """Writes the grid's datasets and attrs into an (empty) HDF5 group."""
        for key in ("cell", "count", "direction", "indptr", "index", "attr", "top_class", "top_attr",
                    "direction_whitened"):
            value = getattr(self, key)
            if value is not None:
                group.create_dataset(key, data=value)
        group.attrs["size"] = self.size
        group.attrs["min_count"] = self.min_count
        group.attrs["n_samples"] = self.n_samples
        group.attrs["n_kept"] = int(self.indptr[-1])

    @classmethod
    def load(cls, group: h5py.Group) -> "Grid":
        """Reads a grid written by `save`."""
        def get(key: str) -> np.ndarray | None:
            return group[key][()] if key in group else None

        return cls(int(group.attrs["size"]), get("cell"), get("count"), get("direction"), get("indptr"),
                   get("index"), get("attr"), get("top_class"), get("top_attr"), get("direction_whitened"),
                   int(group.attrs["min_count"]), int(group.attrs["n_samples"]))


def grid_cells(xy: np.ndarray, acts: Any, attr: Any | None, size: int, min_count: int,
               top_k: int = 5) -> Grid:
    """Bins a layout on one size x size grid and summarises each cell with >= min_count samples.

    See `grid_cells_multi` for the arguments; returns its one Grid.
    """
    return grid_cells_multi(xy, acts, attr, (size,), min_count, top_k)[size]


def grid_cells_multi(xy: np.ndarray, acts: Any, attr: Any | None, sizes: Iterable[int], min_count: int,
                     top_k: int = 5) -> dict[int, Grid]:
    """Bins a layout on several grids at once, reading the activations once.

    Args:
        xy: (n, 2) float positions in [0, 1].
        acts: (n, C) activations, array or h5py dataset (read in float32 blocks).
        attr: (n, n_classes) attributions like acts, or None.
        sizes: grid sizes N.
        min_count: cells with fewer samples are dropped, >= 1.
        top_k: class labels per cell (with attribution).

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


def sum_by_cell(values: Any, slots: Sequence[np.ndarray], n_cells: Sequence[int]) -> list[np.ndarray]:
    """Sums the rows of `values` per cell for several assignments, in one pass over the rows.

    Each block's rows are sorted by cell and reduced with `np.add.reduceat`, so the cost is a
    sort and a sum per block whatever the number of cells.
    """
    width = values.shape[1]
    sums = [np.zeros((m, width)) for m in n_cells]
    for start, block in iter_blocks(values):
        for slot, total in zip(slots, sums):
            cells = slot[start:start + len(block)]
            rows = np.flatnonzero(cells >= 0)
            if len(rows) == 0:
                continue
            rows = rows[np.argsort(cells[rows], kind="stable")]
            sorted_cells = cells[rows]
            starts = np.flatnonzero(np.r_[True, sorted_cells[1:] != sorted_cells[:-1]])
            total[sorted_cells[starts]] += np.add.reduceat(block[rows].astype(np.float64), starts, axis=0)
    return sums


# ---------------------------------------------------------------------------------------------
# Artifact


@dataclasses.dataclass
class GridSet:
    """`RUN/grid.h5`: every layer's grids, optional whitening, the class names, provenance."""

    grids: dict[str, dict[int, Grid]]  # map name (a layer, or a focus map) -> size -> Grid, in the order of `maps`
    whitening: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # layer -> (C, C) float32 S
    class_names: list[str] | None = None  # (n_classes,) names, when the model has known classes
    class_wnids: list[str] | None = None  # (n_classes,) WordNet ids, when known
    fingerprint: str = ""  # see `grid_fingerprint`
    inputs: str = ""  # fingerprint of the layout.h5 it was made from
    activations_fingerprint: str = ""  # fingerprint of the activations.h5 it was made from
    config: Any = None  # the run config (JSON-able)
    whiten_eps: float = 0.0  # ridge used for `whitening`
    maps: list[MapSpec] = dataclasses.field(default_factory=list)  # what each map is; default: one per layer

    def save(self, path: str | Path) -> None:
        """Writes grid.h5 to `path` (not atomically; `run` wraps this in `atomic_path`)."""
        with h5py.File(path, "w") as h5:
            _write_classes(h5, self.class_names, self.class_wnids)
            for layer, grids in self.grids.items():
                _write_layer(h5, layer, grids, self.whitening.get(layer), self.whiten_eps)
            sizes = {s for grids in self.grids.values() for s in grids}
            _write_grid_provenance(h5, self.fingerprint, self.inputs, self.activations_fingerprint, self.config,
                                   self.maps or [MapSpec(name, name) for name in self.grids], sizes)

    @classmethod
    def load(cls, path: str | Path) -> "GridSet":
        """Reads a whole grid.h5 (see `load_grid` for one layer and size)."""
        with h5py.File(path, "r") as h5:
            grids: dict[str, dict[int, Grid]] = {}
            whitening: dict[str, np.ndarray] = {}
            eps = 0.0
            maps = read_maps(h5)
            for layer in (m.name for m in maps):
                group = h5[layer]
                sizes = sorted(int(k) for k in group if k.isdigit())
                grids[layer] = {s: Grid.load(group[str(s)]) for s in sizes}
                if "whitening" in group:
                    whitening[layer] = group["whitening"][()]
                    eps = float(group["whitening"].attrs["eps"])
            names, wnids = read_classes(h5)
            return cls(grids, whitening, names, wnids, str(h5.attrs["fingerprint"]), str(h5.attrs["inputs"]),
                       str(h5.attrs["activations_fingerprint"]), json.loads(h5.attrs["config"]), eps, maps)


def load_grid(path: str | Path, layer: str, size: int) -> Grid:
    """Reads one map's grid of one size from grid.h5 (`layer` is a layer or a focus map's name)."""
    with h5py.File(path, "r") as h5:
        key = f"{layer}/{size}"
        if key not in h5 or "cell" not in h5[key]:
            have = {m.name: sorted(int(k) for k in h5[m.name] if k.isdigit()) for m in read_maps(h5) if m.name in h5}
            raise AtlasError(f"{path} has no {size}x{size} grid for {layer!r}; it has {have}")
        return Grid.load(h5[key])


def load_class_names(path: str | Path) -> list[str] | None:
    """The class names stored in grid.h5 (or activations.h5), or None when the classes are unknown."""
    with h5py.File(path, "r") as h5:
        return read_classes(h5)[0]


def _write_classes(h5: h5py.File, names: Sequence[str] | None, wnids: Sequence[str] | None) -> None:
    str_dt = h5py.string_dtype()
    for key, values in (("name", names), ("wnid", wnids)):
        if values is not None:
            h5.create_dataset(f"classes/{key}", data=np.array(list(values), dtype=object), dtype=str_dt)


def _write_grid_provenance(h5: h5py.File, fp: str, layout_fp: str, acts_fp: str, config: Any,
                           maps: Sequence[MapSpec], sizes: Iterable[int]) -> None:
    write_provenance(h5, stage="grid", fingerprint_=fp, config=config, inputs=layout_fp,
                     activations_fingerprint=acts_fp, layers=list(dict.fromkeys(m.layer for m in maps)),
                     sizes=sorted(set(sizes)))
    h5.attrs["maps"] = maps_to_json(maps)
    h5.attrs["complete"] = True


def _write_layer(h5: h5py.File, layer: str, grids: dict[int, Grid], whitening: np.ndarray | None,
                 eps: float) -> None:
    group = h5.require_group(layer)
    for size, grid in grids.items():
        grid.save(group.create_group(str(size)))
    if whitening is not None:
        ds = group.create_dataset("whitening", data=whitening.astype(np.float32))
        ds.attrs["eps"] = eps
        ds.attrs["n_samples"] = next(iter(grids.values())).n_samples if grids else 0


# ---------------------------------------------------------------------------------------------
# Stage


def grid_fingerprint(config: Config, layout_fingerprint_: str, activations_fingerprint: str) -> str:
    """What the grid depends on: its config, the layout and the activations it reads."""
    return fingerprint("grid", config.grid, layout_fingerprint_, activations_fingerprint)


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
        log: receives one line per layer and one overall.
    """
    t0 = time.perf_counter()
    g = config.grid
    run_dir = config.run_dir
    acts_path, acts_fp = open_activations(run_dir)
    layout_path = run_dir / LAYOUT_NAME
    if not layout_path.is_file():
        raise AtlasError(f"{layout_path} not found; run `atlas layout {run_dir}` first")
    layout_fp = read_fingerprint(layout_path)
    if layout_fp != layout_fingerprint(config, acts_fp):
        raise AtlasError(f"{layout_path} is out of date (made from other activations or another [layout] "
                         f"config); run `atlas layout {run_dir}` first")
    out_path = run_dir / GRID_NAME
    fp = grid_fingerprint(config, layout_fp, acts_fp)
    if not force and is_up_to_date(out_path, fp):
        log(f"grid: up to date, skipped ({out_path})")
        return GridSummary(True, out_path, {}, 0.0)

    cells: dict[str, dict[int, int]] = {}
    with h5py.File(acts_path, "r") as acts_h5, h5py.File(layout_path, "r") as layout_h5, \
            atomic_path(out_path) as tmp, h5py.File(tmp, "w") as out:
        names, wnids = read_classes(acts_h5)
        _write_classes(out, names, wnids)
        maps = read_maps(layout_h5)
        whitening: dict[str, np.ndarray] = {}
        for m in maps:
            if m.layer == "classes":
                raise AtlasError("a layer named 'classes' clashes with grid.h5's /classes group")
            if f"layers/{m.layer}/acts" not in acts_h5 or f"{m.name}/xy" not in layout_h5:
                raise AtlasError(f"{m.name!r} is missing from {acts_path.name} or {layout_path.name}; "
                                 f"run `atlas collect {run_dir}` and `atlas layout {run_dir}` again")
            t_layer = time.perf_counter()
            try:
                grids, n = _grid_map(acts_h5[f"layers/{m.layer}"], layout_h5[m.name], g)
                if g.whiten and m.layer not in whitening:
                    whitening[m.layer] = whitening_matrix(acts_h5[f"layers/{m.layer}/acts"], g.whiten_eps)
            except AtlasError as exc:
                raise AtlasError(f"grid of {'map' if m.kind != 'layer' else 'layer'} {m.name!r}: {exc}") from None
            if g.whiten:
                for grid in grids.values():
                    grid.direction_whitened = whiten_directions(grid.direction, whitening[m.layer])
            # the whitening matrix is the layer's (all its samples), stored once in the layer's group
            _write_layer(out, m.name, grids, whitening.get(m.layer) if m.kind == "layer" else None, g.whiten_eps)
            cells[m.name] = {size: len(grid) for size, grid in grids.items()}
            log(_layer_line(m.name, grids, n, time.perf_counter() - t_layer))
        _write_grid_provenance(out, fp, layout_fp, acts_fp, config, maps, g.sizes)
    seconds = time.perf_counter() - t0
    log(f"grid: {len(cells)} map(s), sizes {', '.join(map(str, g.sizes))} in {seconds:.1f} s; wrote {out_path} "
        f"({out_path.stat().st_size / 2**20:.1f} MiB)")
    return GridSummary(False, out_path, cells, seconds)


def _grid_map(layer: h5py.Group, layout: h5py.Group, g: GridConfig) -> tuple[dict[int, Grid], int]:
    """Bins one map: a layer's samples, or a focus map's subset of them (whose members are then
    renumbered to the layer's sample rows). Returns the grids and the number of samples binned."""
    xy = layout["xy"][()]
    attr = layer["attr"] if "attr" in layer else None
    if "rows" not in layout:
        return grid_cells_multi(xy, layer["acts"], attr, g.sizes, g.min_count, g.top_classes), len(xy)
    rows = layout["rows"][()]
    acts = take_rows(layer["acts"], rows)
    grids = grid_cells_multi(xy, acts, take_rows(attr, rows) if attr is not None else None, g.sizes, g.min_count,
                             g.top_classes)
    for grid in grids.values():
        grid.index = rows[grid.index]  # ascending per cell still: rows is sorted
    return grids, len(xy)


def _layer_line(layer: str, grids: dict[int, Grid], n: int, seconds: float) -> str:
    parts = [f"{s}x{s} {len(grid)} cells ({100 * int(grid.indptr[-1]) / max(n, 1):.0f}% of samples)"
             for s, grid in grids.items()]
    return f"grid: {'map' if '/' in layer else 'layer'} {layer}: {n} samples; " + ", ".join(parts) + f"; {seconds:.1f} s"
