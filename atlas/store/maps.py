"""layout.h5 and grid.h5: the maps of a run, their 2-D positions and their grids of cells.

Schemas (documented for users in README):

layout.h5
- `/<map>/xy` (n, 2) float32 in [0, 1]; a layer's map has row i = sample i of the layer; a focus
  map (`<layer>/class-<slug>`, `<layer>/pair-<a>-<b>`) also has `/<map>/rows` (n,) int64, the
  sorted sample rows it lays out. Group attrs: the reducer's parameters, the normalisation and the
  alignment (see atlas.layout).
- what placing new samples needs (atlas.place): `/<map>/fit_rows` (m,) int64 layer rows the
  reducer was fitted on, `/<map>/fit_raw` (m, d) float32 their positions before normalising (d = 1
  for a two-class view's y), and with PCA `/<map>/pca_mean` (C,), `/<map>/pca_components` (C, k)
  float32.
- file attrs: provenance (`inputs` = the activations' fingerprint), `layers`, `maps`.

grid.h5
- `/<map>/<N>/` per grid size N: `cell`, `count`, `direction`, `indptr`, `index`, and with
  attribution `attr`, `top_class`, `top_attr`, with whitening `direction_whitened`; attrs `size`,
  `min_count`, `n_samples`, `n_kept`. `/<layer>/whitening` (C, C) with attrs `eps`, `n_samples`.
- `/classes/name`, `/classes/wnid` copied from activations.h5.
- file attrs: provenance (`inputs` = layout.h5's fingerprint), `activations_fingerprint`,
  `layers`, `maps`, `sizes`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..artifacts import to_jsonable
from ..errors import AtlasError
from ..focus import MapSpec
from .provenance import mark_complete, write_provenance

GRID_ARRAYS = ("cell", "count", "direction", "indptr", "index", "attr", "top_class", "top_attr", "direction_whitened")


def maps_to_json(maps: Sequence[MapSpec]) -> str:
    """The maps as a JSON list (the `maps` attribute of layout.h5 and grid.h5)."""
    return json.dumps([dataclasses.asdict(m) for m in maps])


def maps_from_json(text: str) -> list[MapSpec]:
    """Reads `maps_to_json`'s output back."""
    return [MapSpec(d["name"], d["layer"], d["kind"], tuple(d["classes"]), tuple(d["class_names"]))
            for d in json.loads(text)]


def read_maps(h5: h5py.File) -> list[MapSpec]:
    """The maps a layout.h5 or grid.h5 holds (files without focus maps list only their layers)."""
    if "maps" in h5.attrs:
        return maps_from_json(str(h5.attrs["maps"]))
    return [MapSpec(layer, layer) for layer in json.loads(h5.attrs.get("layers", "[]"))]


def read_classes(h5: h5py.File) -> tuple[list[str] | None, list[str] | None]:
    """The class names and wnids stored in activations.h5 or grid.h5 (None where absent)."""
    def read(key: str) -> list[str] | None:
        return list(h5[key].asstr()[()]) if key in h5 else None

    return read("classes/name"), read("classes/wnid")


def write_classes(h5: h5py.File, names: Sequence[str] | None, wnids: Sequence[str] | None) -> None:
    str_dt = h5py.string_dtype()
    for key, values in (("name", names), ("wnid", wnids)):
        if values is not None:
            h5.create_dataset(f"classes/{key}", data=np.array(list(values), dtype=object), dtype=str_dt)


# ---------------------------------------------------------------------------------------------
# layout.h5


@dataclasses.dataclass
class MapLayout:
    """The layout of one map: a layer's samples, or a focus map's subset of them."""

    xy: np.ndarray  # (n, 2) float32 in [0, 1]; row i = sample rows[i] of the layer
    info: dict[str, Any]  # reducer parameters and trustworthiness (the attrs of /<map>)
    rows: np.ndarray | None = None  # (n,) int64 sorted sample rows of a focus map; None = all samples in order
    placement: MapPlacement | None = None  # what placing new samples needs; None when not kept or not read


@dataclasses.dataclass
class MapPlacement:
    """What placing new samples on a map needs besides its `info` (atlas.place): the fit samples
    (read back from activations.h5 by row), their raw positions and the PCA they went through."""

    fit_rows: np.ndarray  # (m,) int64 sorted layer rows the reducer was fitted on
    fit_raw: np.ndarray  # (m, d) float32 their positions as the reducer gave them, before normalising
    pca_mean: np.ndarray | None = None  # (C,) float32 (zeros for the uncentred cosine PCA); None = no PCA
    pca_components: np.ndarray | None = None  # (C, k) float32 orthonormal columns

    ARRAYS = ("fit_rows", "fit_raw", "pca_mean", "pca_components")


@dataclasses.dataclass
class Layout:
    """`RUN/layout.h5`: per-map 2-D positions plus the provenance of the file."""

    maps: dict[str, MapLayout]  # map name -> layout, in the order of `specs`
    fingerprint: str = ""  # this artifact's fingerprint (store.fingerprints.layout_fingerprint)
    inputs: str = ""  # the fingerprint of the activations.h5 it was made from
    config: Any = None  # the run config it was made with (JSON-able)
    specs: list[MapSpec] = dataclasses.field(default_factory=list)  # what each map is; default: one per layer

    def save(self, path: str | Path) -> None:
        """Writes the layout to `path` (not atomically; `Run.write_layout` wraps this)."""
        specs = self.specs or [MapSpec(name, name) for name in self.maps]
        with h5py.File(path, "w") as h5:
            for name, layout in self.maps.items():
                group = h5.require_group(name)  # a focus map's group sits inside its layer's
                group.create_dataset("xy", data=np.asarray(layout.xy, dtype=np.float32))
                if layout.rows is not None:
                    group.create_dataset("rows", data=np.asarray(layout.rows, dtype=np.int64))
                if layout.placement is not None:
                    for key in MapPlacement.ARRAYS:
                        value = getattr(layout.placement, key)
                        if value is not None:
                            group.create_dataset(key, data=value)
                for key, value in layout.info.items():
                    group.attrs[key] = value
            write_provenance(h5, stage="layout", fingerprint=self.fingerprint, config=self.config,
                             inputs=self.inputs, layers=list(dict.fromkeys(m.layer for m in specs)))
            h5.attrs["maps"] = maps_to_json(specs)
            mark_complete(h5)

    @classmethod
    def load(cls, path: str | Path, names: Sequence[str] | None = None, placement: bool = False) -> "Layout":
        """Reads a layout file (all maps, or the named ones; with `placement`, also what placing
        new samples needs, None for a map of a file made before it was kept)."""
        with h5py.File(path, "r") as h5:
            specs = read_maps(h5)
            names = names if names is not None else [m.name for m in specs]
            out = {}
            for name in names:
                if name not in h5 or "xy" not in h5[name]:
                    raise AtlasError(f"{path} has no map {name!r}; run `atlas layout {Path(path).parent}`")
                group = h5[name]
                rows = group["rows"][()] if "rows" in group else None
                kept = None
                if placement and "fit_rows" in group:
                    kept = MapPlacement(*(group[key][()] if key in group else None for key in MapPlacement.ARRAYS))
                out[name] = MapLayout(group["xy"][:], {k: to_jsonable(v) for k, v in group.attrs.items()}, rows,
                                      kept)
            return cls(out, str(h5.attrs["fingerprint"]), str(h5.attrs["inputs"]), json.loads(h5.attrs["config"]),
                       [m for m in specs if m.name in out])


# ---------------------------------------------------------------------------------------------
# grid.h5


@dataclasses.dataclass
class Grid:
    """The kept cells of one map's layout on one N x N grid."""

    size: int  # N
    cell: np.ndarray  # (m, 2) int32 (x, y), ordered by y then x
    count: np.ndarray  # (m,) int32 samples per cell
    direction: np.ndarray  # (m, C) float32 mean activation
    indptr: np.ndarray  # (m + 1,) int64 CSR row pointers into `index`
    index: np.ndarray  # (nnz,) int64 sample rows of the layer, ascending per cell
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


def _write_grid(group: h5py.Group, grid: Grid) -> None:
    for key in GRID_ARRAYS:
        value = getattr(grid, key)
        if value is not None:
            group.create_dataset(key, data=value)
    group.attrs["size"] = grid.size
    group.attrs["min_count"] = grid.min_count
    group.attrs["n_samples"] = grid.n_samples
    group.attrs["n_kept"] = int(grid.indptr[-1])


def _read_grid(group: h5py.Group) -> Grid:
    arrays = {key: group[key][()] if key in group else None for key in GRID_ARRAYS}
    return Grid(int(group.attrs["size"]), **arrays, min_count=int(group.attrs["min_count"]),
                n_samples=int(group.attrs["n_samples"]))


@dataclasses.dataclass
class GridSet:
    """`RUN/grid.h5`: every map's grids, optional whitening, the class names, provenance."""

    grids: dict[str, dict[int, Grid]]  # map name -> size -> Grid, in the order of `specs`
    whitening: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # layer -> (C, C) float32 S
    class_names: list[str] | None = None  # (n_classes,) names, when the model has known classes
    class_wnids: list[str] | None = None  # (n_classes,) WordNet ids, when known
    fingerprint: str = ""  # store.fingerprints.grid_fingerprint
    inputs: str = ""  # fingerprint of the layout.h5 it was made from
    activations_fingerprint: str = ""  # fingerprint of the activations.h5 it was made from
    config: Any = None  # the run config (JSON-able)
    whiten_eps: float = 0.0  # ridge used for `whitening`
    specs: list[MapSpec] = dataclasses.field(default_factory=list)  # what each map is; default: one per layer

    def save(self, path: str | Path) -> None:
        """Writes grid.h5 to `path` (not atomically; `Run.write_grids` wraps this)."""
        specs = self.specs or [MapSpec(name, name) for name in self.grids]
        if "classes" in {m.layer for m in specs}:
            raise AtlasError("a layer named 'classes' clashes with grid.h5's class names; rename the module")
        with h5py.File(path, "w") as h5:
            write_classes(h5, self.class_names, self.class_wnids)
            for name, grids in self.grids.items():
                group = h5.require_group(name)
                for size, grid in grids.items():
                    _write_grid(group.create_group(str(size)), grid)
            for layer, matrix in self.whitening.items():  # the layer's (all its samples), stored once
                ds = h5.require_group(layer).create_dataset("whitening", data=matrix.astype(np.float32))
                ds.attrs["eps"] = self.whiten_eps
                grids = self.grids.get(layer, {})
                ds.attrs["n_samples"] = next(iter(grids.values())).n_samples if grids else 0
            sizes = sorted({s for grids in self.grids.values() for s in grids})
            write_provenance(h5, stage="grid", fingerprint=self.fingerprint, config=self.config, inputs=self.inputs,
                             activations_fingerprint=self.activations_fingerprint,
                             layers=list(dict.fromkeys(m.layer for m in specs)), sizes=sizes)
            h5.attrs["maps"] = maps_to_json(specs)
            mark_complete(h5)

    @classmethod
    def load(cls, path: str | Path) -> "GridSet":
        """Reads a whole grid.h5 (`GridFile` reads one map and size at a time)."""
        with h5py.File(path, "r") as h5:
            grids: dict[str, dict[int, Grid]] = {}
            whitening: dict[str, np.ndarray] = {}
            eps = 0.0
            specs = read_maps(h5)
            for name in (m.name for m in specs):
                group = h5[name]
                grids[name] = {s: _read_grid(group[str(s)]) for s in sorted(int(k) for k in group if k.isdigit())}
                if "whitening" in group:
                    whitening[name] = group["whitening"][()]
                    eps = float(group["whitening"].attrs["eps"])
            names, wnids = read_classes(h5)
            return cls(grids, whitening, names, wnids, str(h5.attrs["fingerprint"]), str(h5.attrs["inputs"]),
                       str(h5.attrs["activations_fingerprint"]), json.loads(h5.attrs["config"]), eps, specs)


class GridFile:
    """A reader of one grid.h5 that loads one map's grid of one size at a time."""

    def __init__(self, path: str | Path, run: str | Path | None = None):
        self.path = Path(path)
        self._run = Path(run) if run is not None else self.path.parent
        with h5py.File(self.path, "r") as h5:
            self.fingerprint = str(h5.attrs["fingerprint"])
            self.specs = read_maps(h5)
            self.class_names, self.class_wnids = read_classes(h5)
            self._sizes = {m.name: sorted(int(k) for k in h5[m.name] if k.isdigit() and "cell" in h5[m.name][k])
                           for m in self.specs if m.name in h5}

    def spec(self, name: str) -> MapSpec | None:
        """The map called `name` (a layer or a focus map), or None."""
        return next((m for m in self.specs if m.name == name), None)

    def sizes(self, name: str) -> list[int]:
        """The grid sizes the file holds for a map, ascending."""
        return self._sizes.get(name, [])

    def grid(self, name: str, size: int) -> Grid:
        """One map's grid of one size; AtlasError naming the sizes it has when there is none."""
        if size not in self.sizes(name):
            have = ", ".join(map(str, self.sizes(name))) or "none"
            raise AtlasError(f"{self.path} has no {size}x{size} grid for {name!r} (it has {have}); pick one of those, "
                             f"or add {size} to grid.sizes: `atlas grid {self._run} --set grid.sizes=[...]`")
        with h5py.File(self.path, "r") as h5:
            return _read_grid(h5[f"{name}/{size}"])
