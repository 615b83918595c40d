"""Layout stage: every activation sample gets a 2-D position (UMAP), scaled to [0, 1].

Reads  `RUN/activations.h5`: `/layers/<layer>/acts` (n, C) float16/float32, file attr `fingerprint`.
Writes `RUN/layout.h5`:

- `/<layer>/xy` (n, 2) float32 in [0, 1]; row i is sample i of `/layers/<layer>/acts`, column 0 is x.
- attrs of `/<layer>` (the reducer's parameters and how faithful the map is):
  `n_samples` int, `n_fit` int (samples UMAP was fitted on; the rest placed with `transform`),
  `n_neighbors` int (effective; lower than asked when there are fewer samples),
  `n_neighbors_requested` int, `min_dist` float, `metric` str, `knn` str ("exact" for small runs,
  "nn-descent" past EXACT_KNN_PAIRS = n * n_fit), `pca_dims` int (effective, 0 = none),
  `pca_variance` float (fraction of the fit sample's variance, or of its second moment for the
  cosine metric, that the PCA keeps; 1.0 without PCA), `seed` int, `clip_percentile` float,
  `margin` float, `trustworthiness` float (scikit-learn's, NaN when not computed),
  `trust_samples` int, `trust_neighbors` int, `umap_version` str, `fit_seconds` float,
  `transform_seconds` float.
- focus maps (`layout.classes`, `layout.pairs`; see atlas.focus): `/<layer>/class-<slug>/` and
  `/<layer>/pair-<a>-<b>/` hold `xy` for their own samples, `rows` (n,) int64 (the sorted rows of
  `/layers/<layer>/acts` they lay out; row i of `xy` is sample `rows[i]`) and the attrs above plus
  `kind` ("class" or "pair"), `classes`, `class_names`, `layer`, `class_top`. A two-class view's
  x is the attribution difference (atlas.focus.pair_axis) and only its y comes from UMAP (1-D),
  so its `trustworthiness` is that of y.
- file attrs: `stage`="layout", `fingerprint`, `inputs` (the activations' fingerprint), `config`
  (JSON), `atlas_version`, `layers` (JSON list, config order), `maps` (JSON list of
  {name, layer, kind, classes, class_names}: the layers' own maps and the focus maps, in order),
  `complete`=True.

Method (Lucid's activation-atlas recipe): optional PCA, UMAP to 2-D with a fixed seed, fitted on
at most `layout.fit_samples` random samples with the rest placed by the fitted model's `transform`,
then `normalize_layout`. Activations are read in blocks and converted to float32 block by block,
so a million samples need memory for the fit sample only.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .artifacts import atomic_path, fingerprint, is_up_to_date, to_jsonable, write_provenance
from .config import Config, LayoutConfig
from .errors import AtlasError
from .focus import MapSpec, class_rows, class_scores, maps_to_json, pair_axis, plan_maps, read_classes, read_maps

ACTIVATIONS_NAME = "activations.h5"
LAYOUT_NAME = "layout.h5"

MIN_SAMPLES = 4  # UMAP's spectral initialisation needs more samples than n_components + 1
BLOCK_BYTES = 1 << 26  # activations are read and converted to float32 64 MiB at a time
TRANSFORM_ROWS = 65_536  # samples placed per UMAP.transform call (fixed, so results are reproducible)
# umap-learn finds exact neighbours below 4,096 fit samples, through a Python-level loop over all
# pairs (fit samples with each other, and every transformed sample with every fit sample): about
# 2 s per million pairs. Past this many pairs we make it use nearest-neighbour descent instead.
EXACT_KNN_PAIRS = 1_000_000
METRICS = ("cosine", "euclidean", "correlation", "manhattan", "chebyshev", "braycurtis", "canberra")


# ---------------------------------------------------------------------------------------------
# Pure core


def normalize_layout(xy: np.ndarray, clip_percentile: float = 1.0, margin: float = 0.1) -> np.ndarray:
    """Removes outliers and scales a layout to [0, 1] on each axis.

    Each axis is clipped to its [p, 100 - p] percentile range widened by `margin` times that
    range on both sides, then the clipped values are scaled so their minimum is 0 and maximum 1
    (Lucid's `normalize_layout`, with the margin applied symmetrically). An axis without spread
    maps to 0.5.

    Args:
        xy: (n, 2) float array, n >= 1.
        clip_percentile: p in [0, 50); default 1.
        margin: relative widening of the clipping range; default 0.1.

    Returns:
        (n, 2) float32 in [0, 1].
    """
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or len(xy) == 0:
        raise ValueError(f"xy must be a non-empty (n, d) array, got shape {xy.shape}")
    lo = np.percentile(xy, clip_percentile, axis=0)
    hi = np.percentile(xy, 100 - clip_percentile, axis=0)
    span = hi - lo
    clipped = np.clip(xy, lo - margin * span, hi + margin * span)
    low, width = clipped.min(axis=0), np.ptp(clipped, axis=0)
    out = np.full_like(clipped, 0.5)
    spread = width > 0
    out[:, spread] = (clipped[:, spread] - low[spread]) / width[spread]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def block_rows(n_columns: int) -> int:
    """Rows per block so that one float32 block takes about BLOCK_BYTES."""
    return max(1, BLOCK_BYTES // (4 * max(1, n_columns)))


def iter_blocks(acts: Any, rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (start, float32 block) over the rows of an (n, C) array or h5py dataset."""
    n = len(acts)
    rows = rows or block_rows(acts.shape[1] if len(acts.shape) > 1 else 1)
    for start in range(0, n, rows):
        yield start, np.asarray(acts[start:start + rows], dtype=np.float32)


def scan_rows(acts: Any, picks: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int, int]:
    """Reads the rows of several sorted index arrays in one pass and counts non-finite rows.

    Args:
        acts: (n, C) array or h5py dataset.
        picks: sorted int64 index arrays into the rows.

    Returns:
        (one float32 (len(pick), C) array per pick, number of rows with NaN or inf, first such row
        or -1).
    """
    c = acts.shape[1]
    out = [np.empty((len(p), c), np.float32) for p in picks]
    n_bad, first_bad = 0, -1
    for start, block in iter_blocks(acts):
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            if first_bad < 0:
                first_bad = start + int(np.argmax(bad))
            n_bad += int(bad.sum())
        stop = start + len(block)
        for dest, pick in zip(out, picks):
            a, b = np.searchsorted(pick, [start, stop])
            dest[a:b] = block[pick[a:b] - start]
    return out, n_bad, first_bad


def check_spread(acts: np.ndarray, metric: str) -> None:
    """Raises AtlasError when all rows are the same point for the metric (a layout would be noise)."""
    def same(rows: np.ndarray) -> bool:
        scale = max(1.0, float(np.abs(rows).max(initial=0.0)))
        return float(np.ptp(rows, axis=0).max(initial=0.0)) <= 1e-6 * scale

    what = None
    if same(acts):
        what = "are identical"
    elif metric in ("cosine", "correlation"):
        rows = acts - acts.mean(axis=1, keepdims=True) if metric == "correlation" else acts
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        if same(np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)):
            what = f"are the same point for the {metric} metric (they differ only in length)"
    if what:
        raise AtlasError(f"all {len(acts)} activation vectors {what}, so a layout would be noise; "
                         "this layer carries no information at the sampled positions (pick another layer "
                         "or check the images)")


@dataclasses.dataclass(frozen=True)
class Projection:
    """A linear map to fewer dimensions: `(x - mean) @ components`."""

    mean: np.ndarray  # (C,) float32; zeros for the uncentred projection used with the cosine metric
    components: np.ndarray  # (C, k) float32, orthonormal columns
    kept: float  # fraction of the (centred) second moment the k components keep

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((x - self.mean) @ self.components, dtype=np.float32)


def fit_projection(x: np.ndarray, dims: int, center: bool) -> Projection | None:
    """PCA to `dims` dimensions from the eigenvectors of the (centred) second moment of x.

    Without centring the projection keeps dot products and norms as well as a linear map to
    `dims` dimensions can, which is what the cosine metric compares; centring would change the
    angles. Eigenvector signs are fixed (largest entry positive) so the result is reproducible.
    Returns None when `dims` is 0 or not below the number of columns.
    """
    c = x.shape[1]
    if dims <= 0 or dims >= c:
        return None
    mean = x.mean(axis=0, dtype=np.float64) if center else np.zeros(c)
    moment = np.zeros((c, c))
    for start in range(0, len(x), block_rows(c)):
        block = x[start:start + block_rows(c)].astype(np.float64) - mean
        moment += block.T @ block
    values, vectors = np.linalg.eigh(moment)
    order = np.argsort(values)[::-1][:dims]
    components = vectors[:, order]
    signs = np.sign(components[np.abs(components).argmax(axis=0), np.arange(dims)])
    components *= np.where(signs == 0, 1.0, signs)
    total = float(np.clip(values, 0, None).sum())
    kept = float(np.clip(values[order], 0, None).sum() / total) if total > 0 else 1.0
    return Projection(mean.astype(np.float32), components.astype(np.float32), kept)


def trustworthiness_of(acts: np.ndarray, xy: np.ndarray, n_neighbors: int = 10,
                       metric: str = "cosine") -> float:
    """scikit-learn's trustworthiness of a 2-D layout: 1 when every 2-D neighbour is a true one.

    Args:
        acts: (m, C) float32 activations (a subsample; the cost is O(m^2)).
        xy: (m, 2) their positions.
        n_neighbors: neighbourhood size; lowered to (m - 1) // 2 if needed.
        metric: distance in activation space.

    Returns:
        A float in [0, 1], or NaN when m is too small (< 3).
    """
    from sklearn.manifold import trustworthiness

    k = min(n_neighbors, (len(acts) - 1) // 2)
    if k < 1:
        return float("nan")
    return float(trustworthiness(acts, xy, n_neighbors=k, metric=metric))


def reduce_to_2d(acts: Any, cfg: LayoutConfig, dims: int = 2) -> tuple[np.ndarray, dict[str, Any]]:
    """Lays out activation samples in 2-D (or `dims`-D) with UMAP and normalises the result to [0, 1].

    Fits UMAP (after the optional PCA) on at most `cfg.fit_samples` samples drawn with
    `cfg.seed` and places the others with the fitted model's `transform`, `TRANSFORM_ROWS` at a
    time. Same input and config, same output.

    Degenerate input: fewer than MIN_SAMPLES samples, NaN or inf anywhere, or all fit samples the
    same point for the metric raise AtlasError before UMAP runs. Fewer fit samples than
    `cfg.n_neighbors` + 1 is not an error: n_neighbors is lowered to n_fit - 1 (recorded in info).

    Args:
        acts: (n, C) float16/float32 array or h5py dataset; read in float32 blocks.
        cfg: the `[layout]` config.
        dims: output dimensions; 1 for the y axis of a two-class view.

    Returns:
        xy: (n, dims) float32 in [0, 1].
        info: the reducer's parameters and trustworthiness (the keys listed in the module
            docstring).
    """
    t0 = time.perf_counter()
    n = len(acts)
    if len(acts.shape) != 2:
        raise ValueError(f"acts must be (n, C), got shape {acts.shape}")
    _check_metric(cfg.metric)
    if n < MIN_SAMPLES:
        raise AtlasError(f"{n} samples are too few for a layout (UMAP needs at least {MIN_SAMPLES}); "
                         "collect more images or raise collect.samples_per_image")
    fit_idx, trust_idx = pick_samples(n, cfg)
    (fit_x, trust_x), n_bad, first_bad = scan_rows(acts, [fit_idx, trust_idx])
    if n_bad:
        raise AtlasError(f"{n_bad} of {n} activation rows contain NaN or inf (first: row {first_bad}); "
                         "float16 storage overflows above 65504, so recollect with collect.dtype = \"float32\"")
    check_spread(fit_x, cfg.metric)

    projection = fit_projection(fit_x, cfg.pca_dims, center=cfg.metric not in ("cosine", "correlation"))
    n_fit = len(fit_idx)
    n_neighbors = min(cfg.n_neighbors, n_fit - 1)  # the documented fallback: UMAP needs k < n
    approximate = n * n_fit > EXACT_KNN_PAIRS
    reducer = _make_umap(n_neighbors, cfg, approximate, dims)
    raw = np.empty((n, dims), np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_jobs value .* overridden")  # we seed on purpose
        raw[fit_idx] = reducer.fit_transform(projection(fit_x) if projection else fit_x)
        del fit_x
        t_fit = time.perf_counter()
        if n_fit < n:
            rest = np.ones(n, bool)
            rest[fit_idx] = False
            for rows_idx, rows in iter_selected(acts, rest, TRANSFORM_ROWS):
                raw[rows_idx] = reducer.transform(projection(rows) if projection else rows)
    t_transform = time.perf_counter()
    if not np.isfinite(raw).all():
        raise AtlasError("UMAP produced non-finite positions; try another layout.seed or layout.metric = \"euclidean\"")

    xy = normalize_layout(raw, cfg.clip_percentile, cfg.margin)
    trust = (trustworthiness_of(trust_x, xy[trust_idx], cfg.trust_neighbors, cfg.metric)
             if len(trust_idx) else float("nan"))
    info = {
        "n_samples": n, "n_fit": n_fit, "n_neighbors": n_neighbors, "n_neighbors_requested": cfg.n_neighbors,
        "min_dist": cfg.min_dist, "metric": cfg.metric, "knn": "nn-descent" if approximate else "exact",
        "pca_dims": projection.components.shape[1] if projection else 0,
        "pca_variance": projection.kept if projection else 1.0, "seed": cfg.seed,
        "clip_percentile": cfg.clip_percentile, "margin": cfg.margin, "trustworthiness": trust,
        "trust_samples": len(trust_idx), "trust_neighbors": cfg.trust_neighbors, "umap_version": reducer_version(),
        "fit_seconds": t_fit - t0, "transform_seconds": t_transform - t_fit,
    }
    return xy, info


def pick_samples(n: int, cfg: LayoutConfig) -> tuple[np.ndarray, np.ndarray]:
    """The sorted rows UMAP is fitted on and the rows trustworthiness is measured on.

    The fit rows are `np.random.default_rng(cfg.seed).choice(n, n_fit, replace=False)` (all rows
    when n_fit = n), the trust rows the same draw from `default_rng([cfg.seed, 1])`.
    """
    n_fit = n if cfg.fit_samples == 0 else min(n, max(cfg.fit_samples, MIN_SAMPLES))
    fit_idx = np.arange(n) if n_fit == n else np.sort(np.random.default_rng(cfg.seed).choice(n, n_fit, replace=False))
    n_trust = min(n, cfg.trust_samples)
    trust_idx = (np.arange(n) if n_trust == n else
                 np.sort(np.random.default_rng([cfg.seed, 1]).choice(n, n_trust, replace=False)))
    return fit_idx, trust_idx


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        close = difflib.get_close_matches(metric, METRICS, n=1)
        raise AtlasError(f"layout.metric {metric!r} is not supported"
                         + (f"; did you mean {close[0]!r}?" if close else f"; use one of {', '.join(METRICS)}"))


def iter_selected(acts: Any, mask: np.ndarray, chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (row indices, float32 rows) of the rows where `mask` is set, exactly `chunk` at a time.

    Chunks do not depend on how the rows are read, so the results of per-chunk work (UMAP's
    transform) are reproducible.
    """
    wanted = np.flatnonzero(mask)
    for a in range(0, len(wanted), chunk):
        idx = wanted[a:a + chunk]
        yield idx, take_rows(acts, idx)


def take_rows(acts: Any, idx: np.ndarray) -> np.ndarray:
    """The rows `idx` (sorted) of an array or h5py dataset as float32, read a block at a time."""
    if isinstance(acts, np.ndarray):
        return np.asarray(acts[idx], dtype=np.float32)
    out = np.empty((len(idx), acts.shape[1]), np.float32)
    rows = block_rows(acts.shape[1])
    pos = 0
    while pos < len(idx):  # h5py reads a contiguous slice much faster than a point selection
        start = int(idx[pos])
        stop = min(start + rows, int(idx[-1]) + 1)
        end = int(np.searchsorted(idx, stop))
        out[pos:end] = np.asarray(acts[start:stop], dtype=np.float32)[idx[pos:end] - start]
        pos = end
    return out


def reducer_version() -> str:
    from importlib.metadata import version

    return version("umap-learn")


def _make_umap(n_neighbors: int, cfg: LayoutConfig, approximate: bool, dims: int = 2):
    import umap

    # random_state makes UMAP single-threaded; that is the price of a reproducible layout
    return umap.UMAP(n_components=dims, n_neighbors=n_neighbors, min_dist=cfg.min_dist, metric=cfg.metric,
                     random_state=cfg.seed, transform_seed=cfg.seed, n_jobs=1,
                     force_approximation_algorithm=approximate)


# ---------------------------------------------------------------------------------------------
# Artifact


@dataclasses.dataclass
class LayerLayout:
    """The layout of one map: a layer's samples, or a focus map's subset of them."""

    xy: np.ndarray  # (n, 2) float32 in [0, 1]; row i = sample rows[i] of /layers/<layer>/acts
    info: dict[str, Any]  # reducer parameters and trustworthiness (the attrs of /<map>)
    rows: np.ndarray | None = None  # (n,) int64 sorted sample rows of a focus map; None = all samples in order


@dataclasses.dataclass
class Layout:
    """`RUN/layout.h5`: per-map 2-D positions plus the provenance of the file."""

    layers: dict[str, LayerLayout]  # map name -> layout, in the order of `maps`
    fingerprint: str = ""  # this artifact's fingerprint (see `layout_fingerprint`)
    inputs: str = ""  # the fingerprint of the activations.h5 it was made from
    config: Any = None  # the run config it was made with (JSON-able)
    maps: list[MapSpec] = dataclasses.field(default_factory=list)  # what each map is; default: one per layer

    def save(self, path: str | Path) -> None:
        """Writes the layout to `path` (not atomically; `run` wraps this in `atomic_path`)."""
        maps = self.maps or [MapSpec(name, name) for name in self.layers]
        with h5py.File(path, "w") as h5:
            for name, layer in self.layers.items():
                group = h5.require_group(name)  # a focus map's group sits inside its layer's
                group.create_dataset("xy", data=np.asarray(layer.xy, dtype=np.float32))
                if layer.rows is not None:
                    group.create_dataset("rows", data=np.asarray(layer.rows, dtype=np.int64))
                for key, value in layer.info.items():
                    group.attrs[key] = value
            write_provenance(h5, stage="layout", fingerprint_=self.fingerprint, config=self.config,
                             inputs=self.inputs, layers=list(dict.fromkeys(m.layer for m in maps)))
            h5.attrs["maps"] = maps_to_json(maps)
            h5.attrs["complete"] = True

    @classmethod
    def load(cls, path: str | Path, layers: Sequence[str] | None = None) -> "Layout":
        """Reads a layout file (all maps, or the named ones)."""
        with h5py.File(path, "r") as h5:
            maps = read_maps(h5)
            names = layers if layers is not None else [m.name for m in maps]
            out = {}
            for name in names:
                if name not in h5 or "xy" not in h5[name]:
                    raise AtlasError(f"{path} has no layer {name!r}; run `atlas layout` for this config")
                group = h5[name]
                rows = group["rows"][()] if "rows" in group else None
                out[name] = LayerLayout(group["xy"][:], {k: to_jsonable(v) for k, v in group.attrs.items()}, rows)
            return cls(out, str(h5.attrs["fingerprint"]), str(h5.attrs["inputs"]), json.loads(h5.attrs["config"]),
                       [m for m in maps if m.name in out])


# ---------------------------------------------------------------------------------------------
# Stage


def open_activations(run_dir: Path) -> tuple[Path, str]:
    """Returns the path and fingerprint of a run's complete activations.h5, or raises AtlasError."""
    path = run_dir / ACTIVATIONS_NAME
    if not path.is_file():
        raise AtlasError(f"{path} not found; run `atlas collect {run_dir}` first")
    try:
        with h5py.File(path, "r") as h5:
            complete = bool(h5.attrs.get("complete", False))
            fp = h5.attrs.get("fingerprint")
    except OSError as exc:
        raise AtlasError(f"cannot read {path} ({exc}); run `atlas collect {run_dir}` again") from None
    if not complete or fp is None:
        raise AtlasError(f"{path} is incomplete; run `atlas collect {run_dir}` to finish it")
    return path, str(fp)


def layout_fingerprint(config: Config, activations_fingerprint: str) -> str:
    """What the layout depends on: its config, the layers and the activations it reads."""
    return fingerprint("layout", config.layout, config.layers, activations_fingerprint)


@dataclasses.dataclass
class LayoutSummary:
    """What a layout run did."""

    skipped: bool  # True when layout.h5 was up to date
    path: Path  # RUN/layout.h5
    samples: dict[str, int]  # samples laid out per map
    trustworthiness: dict[str, float]  # per map (NaN when not computed)
    seconds: float


def run(config: Config, *, force: bool = False, log: Callable[[str], None] = print) -> LayoutSummary:
    """Runs the layout stage: RUN/activations.h5 -> RUN/layout.h5, skipped when up to date.

    Lays out every layer, then each layer's class atlases and two-class views (`layout.classes`,
    `layout.pairs`; see atlas.focus).

    Args:
        config: the run's config (`config.layout`, `config.layers`, `config.run_dir`).
        force: redo the layout even when layout.h5 is up to date.
        log: receives one line per map and one overall.
    """
    t0 = time.perf_counter()
    acts_path, acts_fp = open_activations(config.run_dir)
    out_path = config.run_dir / LAYOUT_NAME
    fp = layout_fingerprint(config, acts_fp)
    if not force and is_up_to_date(out_path, fp):
        log(f"layout: up to date, skipped ({out_path})")
        return LayoutSummary(True, out_path, {}, {}, 0.0)

    cfg = config.layout
    layers: dict[str, LayerLayout] = {}
    with h5py.File(acts_path, "r") as h5:
        maps = plan_maps(config.layers, cfg.classes, cfg.pairs, *read_classes(h5), cfg.focus_layers)
        for name in config.layers:
            key = f"layers/{name}/acts"
            if key not in h5:
                raise AtlasError(f"{acts_path} has no layer {name!r}; run `atlas collect {config.run_dir}` "
                                 "with this config")
            t_layer = time.perf_counter()
            try:
                xy, info = reduce_to_2d(h5[key], cfg)
            except AtlasError as exc:
                raise AtlasError(f"layout of layer {name!r}: {exc}") from None
            layers[name] = LayerLayout(xy, info)
            log(_layer_line(name, info, time.perf_counter() - t_layer))
            focus = [m for m in maps if m.layer == name and m.kind != "layer"]
            if focus:
                layers.update(layout_focus_maps(h5[f"layers/{name}"], focus, cfg, log))

    with atomic_path(out_path) as tmp:
        Layout(layers, fp, acts_fp, config, maps).save(tmp)
    seconds = time.perf_counter() - t0
    total = sum(len(layers[n].xy) for n in config.layers)
    extra = f" and {len(maps) - len(config.layers)} focus map(s)" if len(maps) > len(config.layers) else ""
    log(f"layout: {len(config.layers)} layer(s){extra}, {total} samples in {seconds:.1f} s; wrote {out_path} "
        f"({out_path.stat().st_size / 2**20:.1f} MiB)")
    return LayoutSummary(False, out_path, {k: len(v.xy) for k, v in layers.items()},
                         {k: v.info["trustworthiness"] for k, v in layers.items()}, seconds)


def layout_focus_maps(group: h5py.Group, maps: Sequence[MapSpec], cfg: LayoutConfig,
                      log: Callable[[str], None]) -> dict[str, LayerLayout]:
    """Lays out one layer's class atlases and two-class views (see atlas.focus).

    Args:
        group: the layer's `/layers/<layer>` group of activations.h5 (`acts`, `attr`).
        maps: the layer's focus maps.
        cfg: the `[layout]` config (`class_top` and the UMAP settings).
    """
    layer = maps[0].layer
    if "attr" not in group:
        raise AtlasError(f"layout.classes and layout.pairs need each sample's attribution, which layer {layer!r} "
                         "lacks; collect with collect.attribution = true")
    columns = sorted({c for m in maps for c in m.classes})
    top, scores = class_scores(group["attr"], columns)
    selected = {c: class_rows(top, scores[:, columns.index(c)], c, cfg.class_top) for c in columns}
    out = {}
    for m in maps:
        t_map = time.perf_counter()
        rows = selected[m.classes[0]] if m.kind == "class" else np.union1d(*(selected[c] for c in m.classes))
        try:
            if m.kind == "class":
                xy, info = reduce_to_2d(take_rows(group["acts"], rows), cfg)
            else:
                y, info = reduce_to_2d(take_rows(group["acts"], rows), cfg, dims=1)
                a, b = (columns.index(c) for c in m.classes)
                xy = np.column_stack([pair_axis(scores[rows, b] - scores[rows, a]), y[:, 0]]).astype(np.float32)
        except AtlasError as exc:
            raise AtlasError(f"layout of {m.name!r} ({len(rows)} samples for {' and '.join(m.class_names)}): {exc}; "
                             "or raise layout.class_top") from None
        info.update(kind=m.kind, classes=list(m.classes), class_names=list(m.class_names), layer=layer,
                    class_top=cfg.class_top)
        out[m.name] = LayerLayout(xy, info, rows)
        log(_layer_line(m.name, info, time.perf_counter() - t_map))
    return out


def _layer_line(name: str, info: dict[str, Any], seconds: float) -> str:
    parts = [f"layout: {'map' if '/' in name else 'layer'} {name}: {info['n_samples']} samples"]
    if info["n_fit"] < info["n_samples"]:
        parts.append(f"fitted on {info['n_fit']}, rest placed by transform")
    if info["n_neighbors"] < info["n_neighbors_requested"]:
        parts.append(f"n_neighbors lowered to {info['n_neighbors']} (fewer samples than asked for)")
    if info["pca_dims"]:
        parts.append(f"PCA to {info['pca_dims']} dims keeps {100 * info['pca_variance']:.0f}%")
    trust = info["trustworthiness"]
    if np.isfinite(trust):
        parts.append(f"trustworthiness {trust:.3f} (k={info['trust_neighbors']}, {info['trust_samples']} samples)")
    parts.append(f"{seconds:.1f} s")
    return ", ".join(parts)
