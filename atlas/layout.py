"""Layout stage: every activation sample gets a 2-D position (UMAP), scaled to [0, 1].

Reads the run's activations (atlas.store); writes layout.h5, one map per layer plus each layer's
class atlases and two-class views (`layout.classes`, `layout.pairs`; see atlas.focus): each map's
`xy` (n, 2) float32 in [0, 1] (column 0 is x) and, for a focus map, the sorted sample `rows` it
lays out. A two-class view's x is the attribution difference (atlas.focus.pair_axis) and only its
y comes from UMAP (1-D), so its trustworthiness is that of y.

Each map records `layout_2d`'s info: `n_samples`, `n_fit` (samples UMAP was fitted on; the rest
placed as `placement` says), `n_neighbors` (effective; lower than asked when there are fewer
samples, or for torchdr fewer distinct samples), `n_neighbors_requested`, `min_dist`, `metric`,
`knn` ("exact"; umap-learn: "nn-descent" past EXACT_KNN_PAIRS = n * n_fit), `epochs`
(optimisation epochs: umap-learn's rule, 500 up to 10,000 fit samples, else 200; torchdr is given
the same), `placement` ("none" when every sample was fitted; "transform": umap-learn's; "nearest-fit-mean":
atlas.placement),
`pca_dims` (effective, 0 = none), `pca_variance` (the fraction of the fit sample's variance, or of
its second moment for the cosine metric, that the PCA keeps; 1.0 without PCA), `seed`,
`clip_percentile`, `margin`, `trustworthiness` (scikit-learn's, NaN when not computed),
`trust_samples`, `trust_neighbors`, `backend` ("umap-learn" or "torchdr"), `backend_version` (that
package's version), `device` ("cpu", or the torchdr backend's "cuda:N"), `fit_seconds`,
`transform_seconds` (placing the rest); torchdr maps add `negative_sample_rate`; focus maps add
`kind`, `classes`, `class_names`, `layer`, `class_top`.

Method (Lucid's activation-atlas recipe): optional PCA, UMAP to 2-D with a fixed seed (umap-learn,
or TorchDR's PyTorch UMAP on the CPU or a GPU: `layout.backend`, atlas.reducers), fitted on at
most `fit_samples` random samples with the rest placed by the fitted model's `transform`
(umap-learn) or by the weighted mean of their nearest fit samples (torchdr, atlas.placement),
then `normalize_layout`. Activations are read in float32 blocks, so a million samples need memory
for the fit sample only.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .blocks import block_rows, iter_selected, scan_rows, take_rows
from .config import METRICS, Config, LayoutConfig
from .errors import AtlasError
from .focus import MapSpec, class_rows, class_scores, class_threshold, pair_axis, pair_scale, plan_maps
from .placement import place_samples
from .reducers import backend_version, fit_torchdr, make_umap_learn, umap_epochs
from .runtime import pick_device
from .store import Activations, LayerSamples, Layout, MapLayout, MapPlacement, Run

MIN_SAMPLES = 4  # UMAP's spectral initialisation needs more samples than n_components + 1
TRANSFORM_ROWS = 65_536  # samples placed per UMAP.transform or place_samples call (fixed, so results are reproducible)
# umap-learn finds exact neighbours below 4,096 fit samples, through a Python-level loop over all
# pairs (fit samples with each other, and every transformed sample with every fit sample): about
# 2 s per million pairs. Past this many pairs we make it use nearest-neighbour descent instead.
EXACT_KNN_PAIRS = 1_000_000


# ---------------------------------------------------------------------------------------------
# Pure core


@dataclasses.dataclass(frozen=True)
class Normalization:
    """The scaling `normalize_layout` fitted: x -> clip((x - low) / width, 0, 1) per axis, 0.5 on an
    axis without spread. Kept in layout.h5 (`norm_low`, `norm_width`) so that new samples placed
    later (atlas.place) land where the layout's own samples at the same raw position did."""

    low: np.ndarray  # (d,) float64 minimum of the clipped positions
    width: np.ndarray  # (d,) float64 their range; 0 = no spread

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        """(n, d) float positions -> (n, d) float32 in [0, 1]."""
        xy = np.asarray(xy, dtype=np.float64)
        out = np.full_like(xy, 0.5)
        spread = self.width > 0
        out[:, spread] = (xy[:, spread] - self.low[spread]) / self.width[spread]
        # clipping the raw position to [low, low + width] first gives the same result
        return np.clip(out, 0.0, 1.0).astype(np.float32)


def fit_normalization(xy: np.ndarray, clip_percentile: float = 1.0, margin: float = 0.1) -> Normalization:
    """The scaling of `normalize_layout` for these positions (see there)."""
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or len(xy) == 0:
        raise ValueError(f"xy must be a non-empty (n, d) array, got shape {xy.shape}")
    lo = np.percentile(xy, clip_percentile, axis=0)
    hi = np.percentile(xy, 100 - clip_percentile, axis=0)
    span = hi - lo
    clipped = np.clip(xy, lo - margin * span, hi + margin * span)
    return Normalization(clipped.min(axis=0), np.ptp(clipped, axis=0))


def fit_inside(xy: np.ndarray) -> Normalization:
    """The scaling that brings positions into the unit square with the least change: none when
    they are inside it, else one scale for both axes about its centre (so shapes and
    neighbourhoods are kept, unlike `normalize_layout`'s per-axis stretch)."""
    half = max(0.5, float(np.abs(np.asarray(xy, np.float64) - 0.5).max(initial=0.0)))
    return Normalization(np.full(2, 0.5 - half), np.full(2, 2 * half))


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
    return fit_normalization(xy, clip_percentile, margin)(xy)


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


@dataclasses.dataclass
class LayoutFit:
    """A layout and what placing new samples on it needs (atlas.place, through layout.h5)."""

    xy: np.ndarray  # (n, dims) float32 in [0, 1]
    info: dict[str, Any]  # the reducer's parameters, trustworthiness and `norm_low`, `norm_width`
    fit_rows: np.ndarray  # (m,) int64 sorted rows of `acts` the reducer was fitted on
    fit_raw: np.ndarray  # (m, dims) float32 their positions as the reducer gave them (before normalising)
    projection: Projection | None  # the PCA the fit samples went through, if any
    normalization: Normalization  # raw positions -> [0, 1]


def layout_2d(acts: Any, **options: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """`fit_layout`'s positions and info (its arguments and the info keys are documented there)."""
    fit = fit_layout(acts, **options)
    return fit.xy, fit.info


def fit_layout(acts: Any, *, n_neighbors: int = 20, min_dist: float = 0.01, metric: str = "cosine",
               pca_dims: int = 0, fit_samples: int = 100_000, clip_percentile: float = 1.0, margin: float = 0.1,
               seed: int = 0, trust_samples: int = 2000, trust_neighbors: int = 10, dims: int = 2,
               backend: str = "umap-learn", device: str = "auto") -> LayoutFit:
    """Lays out activation samples in 2-D (or `dims`-D) with UMAP and normalises the result to [0, 1].

    Fits UMAP (after the optional PCA) on at most `fit_samples` samples drawn with `seed` and
    places the others, TRANSFORM_ROWS at a time: umap-learn with the fitted model's `transform`,
    torchdr with `atlas.placement.place_samples` (the weighted mean of each sample's nearest fit
    samples). Same input and arguments, same output (torchdr: on the CPU).

    Degenerate input: fewer than MIN_SAMPLES samples, NaN or inf anywhere, or all fit samples the
    same point for the metric raise AtlasError before UMAP runs. Fewer fit samples than
    `n_neighbors` + 1 is not an error: n_neighbors is lowered to n_fit - 1 (recorded in info).

    Args:
        acts: (n, C) float16/float32 array or h5py dataset; read in float32 blocks.
        n_neighbors: UMAP's neighbourhood size, >= 2; default 20 (Lucid's notebooks).
        min_dist: UMAP's minimum distance; default 0.01.
        metric: one of METRICS (torchdr: one of TORCHDR_METRICS); default "cosine".
        pca_dims: PCA to this many dimensions first (uncentred for cosine and correlation, so
            angles are kept); 0 = none.
        fit_samples: fit on at most this many samples, place the rest; 0 = all.
        clip_percentile, margin: see `normalize_layout`.
        seed: seeds the subsamples and UMAP.
        trust_samples: samples to measure trustworthiness on (O(m^2)); 0 = skip (NaN).
        trust_neighbors: the trustworthiness neighbourhood size.
        dims: output dimensions; 1 for the y axis of a two-class view.
        backend: "umap-learn" or "torchdr" (atlas.reducers).
        device: torchdr's device, "auto", "cpu", "cuda" or "cuda:N" (umap-learn: "auto" or "cpu").

    Returns:
        A LayoutFit: `xy` (n, dims) float32 in [0, 1]; `info`, the reducer's parameters and
        trustworthiness (the keys listed in the module docstring); the fit rows, their raw
        positions, the PCA and the normalisation (what `place_samples` needs to place new samples).
    """
    t0 = time.perf_counter()
    n = len(acts)
    if len(acts.shape) != 2:
        raise ValueError(f"acts must be (n, C), got shape {acts.shape}")
    _check_metric(metric)
    where = _check_backend(backend, device, metric)
    if n < MIN_SAMPLES:
        raise AtlasError(f"{n} samples are too few for a layout (UMAP needs at least {MIN_SAMPLES}); "
                         "collect more images or raise collect.samples_per_image")
    fit_idx, trust_idx = pick_samples(n, fit_samples, trust_samples, seed)
    (fit_x, trust_x), n_bad, first_bad = scan_rows(acts, [fit_idx, trust_idx])
    if n_bad:
        raise AtlasError(f"{n_bad} of {n} activation rows contain NaN or inf (first: row {first_bad}); "
                         "float16 storage overflows above 65504, so recollect with collect.dtype = \"float32\"")
    check_spread(fit_x, metric)

    projection = fit_projection(fit_x, pca_dims, center=metric not in ("cosine", "correlation"))
    fit_x = projection(fit_x) if projection else fit_x
    n_fit = len(fit_idx)
    n_used = min(n_neighbors, n_fit - 1)  # the documented fallback: UMAP needs k < n
    raw = np.empty((n, dims), np.float32)
    rest = np.ones(n, bool)
    rest[fit_idx] = False
    if backend == "umap-learn":
        approximate = n * n_fit > EXACT_KNN_PAIRS
        reducer = make_umap_learn(n_used, min_dist, metric, seed, approximate, dims)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="n_jobs value .* overridden")  # we seed on purpose
            raw[fit_idx] = reducer.fit_transform(fit_x)
            t_fit = time.perf_counter()
            for rows_idx, rows in iter_selected(acts, rest, TRANSFORM_ROWS):
                raw[rows_idx] = reducer.transform(projection(rows) if projection else rows)
        fitted = {"knn": "nn-descent" if approximate else "exact", "epochs": umap_epochs(n_fit),
                  "placement": "transform" if rest.any() else "none"}
    else:
        fit_xy, fitted = fit_torchdr(fit_x, n_neighbors=n_used, min_dist=min_dist, metric=metric, seed=seed,
                                     dims=dims, device=where)
        raw[fit_idx] = fit_xy
        t_fit = time.perf_counter()
        n_used = fitted.pop("n_neighbors")
        for rows_idx, rows in iter_selected(acts, rest, TRANSFORM_ROWS):
            raw[rows_idx] = place_samples(fit_x, fit_xy, projection(rows) if projection else rows,
                                          n_neighbors=n_used, metric=metric, device=where)
        fitted.update(knn="exact", placement="nearest-fit-mean" if rest.any() else "none")
    del fit_x
    fit_raw = raw[fit_idx]
    t_transform = time.perf_counter()
    if not np.isfinite(raw).all():
        raise AtlasError("UMAP produced non-finite positions; try another layout.seed or layout.metric = \"euclidean\"")

    normalization = fit_normalization(raw, clip_percentile, margin)
    xy = normalization(raw)
    trust = (trustworthiness_of(trust_x, xy[trust_idx], trust_neighbors, metric)
             if len(trust_idx) else float("nan"))
    info = {
        "n_samples": n, "n_fit": n_fit, "n_neighbors": n_used, "n_neighbors_requested": n_neighbors,
        "min_dist": min_dist, "metric": metric, **fitted,
        "pca_dims": projection.components.shape[1] if projection else 0,
        "pca_variance": projection.kept if projection else 1.0, "seed": seed,
        "clip_percentile": clip_percentile, "margin": margin, "trustworthiness": trust,
        "trust_samples": len(trust_idx), "trust_neighbors": trust_neighbors, "backend": backend,
        "backend_version": backend_version(backend), "device": _device_name(where),
        "fit_seconds": t_fit - t0, "transform_seconds": t_transform - t_fit,
        "norm_low": normalization.low, "norm_width": normalization.width,
    }
    return LayoutFit(xy, info, fit_idx.astype(np.int64), fit_raw, projection, normalization)


def pick_samples(n: int, fit_samples: int, trust_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The sorted rows UMAP is fitted on and the rows trustworthiness is measured on.

    The fit rows are `np.random.default_rng(seed).choice(n, n_fit, replace=False)` (all rows when
    n_fit = n; fit_samples 0 = all), the trust rows the same draw from `default_rng([seed, 1])`.
    """
    n_fit = n if fit_samples == 0 else min(n, max(fit_samples, MIN_SAMPLES))
    fit_idx = np.arange(n) if n_fit == n else np.sort(np.random.default_rng(seed).choice(n, n_fit, replace=False))
    n_trust = min(n, trust_samples)
    trust_idx = (np.arange(n) if n_trust == n else
                 np.sort(np.random.default_rng([seed, 1]).choice(n, n_trust, replace=False)))
    return fit_idx, trust_idx


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        close = difflib.get_close_matches(metric, METRICS, n=1)
        raise AtlasError(f"layout.metric {metric!r} is not supported"
                         + (f"; did you mean {close[0]!r}?" if close else f"; use one of {', '.join(METRICS)}"))


def _check_backend(backend: str, device: str, metric: str) -> torch.device:
    """The device a backend computes on; AtlasError for a backend, device or metric it cannot take."""
    # the same rules LayoutConfig checks, for callers of layout_2d that pass plain arguments
    LayoutConfig(backend=backend, device=device, metric=metric)
    return pick_device(device, "layout.device") if backend == "torchdr" else torch.device("cpu")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


# ---------------------------------------------------------------------------------------------
# Stage


@dataclasses.dataclass
class LayoutSummary:
    """What a layout run did."""

    skipped: bool  # True when layout.h5 was up to date
    path: Path  # RUN/layout.h5
    samples: dict[str, int]  # samples laid out per map
    trustworthiness: dict[str, float]  # per map (NaN when not computed)
    seconds: float


def layout_options(cfg: LayoutConfig) -> dict[str, Any]:
    """The keyword arguments of `layout_2d` that the `[layout]` table sets."""
    return {"n_neighbors": cfg.n_neighbors, "min_dist": cfg.min_dist, "metric": cfg.metric, "pca_dims": cfg.pca_dims,
            "fit_samples": cfg.fit_samples, "clip_percentile": cfg.clip_percentile, "margin": cfg.margin,
            "seed": cfg.seed, "trust_samples": cfg.trust_samples, "trust_neighbors": cfg.trust_neighbors,
            "backend": cfg.backend, "device": cfg.device}


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
    store = Run(config.run_dir, config)
    expected = store.expected_layout_fingerprint()
    out_path = store.layout_path
    if not force and store.is_current(out_path, expected):
        log(f"layout: up to date, skipped ({out_path})")
        return LayoutSummary(True, out_path, {}, {}, 0.0)

    cfg = config.layout
    options = layout_options(cfg)
    maps: dict[str, MapLayout] = {}
    with store.activations("layout") as acts:
        specs = plan_maps(config.layers, cfg.classes, cfg.pairs, acts.class_names, acts.class_wnids, cfg.focus_layers)
        unknown = sorted(set(config.render.sizes_for) - {m.name for m in specs})
        if unknown:  # said now rather than after the layouts and grids are made
            raise AtlasError(f"render.sizes_for names {unknown[0]!r}, which is not a map of this run; its maps are "
                             f"{', '.join(m.name for m in specs)}")
        progress = _progress(len(specs))
        for name in config.layers:
            samples = acts.layer(name)
            t_layer = time.perf_counter()
            progress.set_postfix_str(name)
            try:
                fit = fit_layout(samples.acts, **options)
            except AtlasError as exc:
                raise AtlasError(f"layout of layer {name!r}: {exc}") from None
            fit.info["aligned"] = False
            maps[name] = MapLayout(fit.xy, fit.info, None, kept_for_placing(fit))
            log(_layer_line(name, fit.info, time.perf_counter() - t_layer))
            progress.update(1)
            focus = [m for m in specs if m.layer == name and m.kind != "layer"]
            if focus:
                maps.update(layout_focus_maps(samples, focus, options, cfg.class_top, log, progress))
        progress.close()
        if len(config.layers) > 1:
            align_layer_maps(acts, config.layers, maps, options, cfg.align, log)
        acts_fp = acts.fingerprint

    store.write_layout(Layout(maps, expected, acts_fp, config, specs))
    seconds = time.perf_counter() - t0
    total = sum(len(maps[n].xy) for n in config.layers)
    extra = f" and {len(specs) - len(config.layers)} focus map(s)" if len(specs) > len(config.layers) else ""
    log(f"layout: {len(config.layers)} layer(s){extra}, {total} samples in {seconds:.1f} s; wrote {out_path} "
        f"({out_path.stat().st_size / 2**20:.1f} MiB)")
    return LayoutSummary(False, out_path, {k: len(v.xy) for k, v in maps.items()},
                         {k: v.info["trustworthiness"] for k, v in maps.items()}, seconds)


def _progress(total: int):
    """A progress bar over the maps on a terminal: done/total, rate and time left (layout runs on one process)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="map", desc="layout", disable=None, dynamic_ncols=True)


def layout_focus_maps(samples: LayerSamples, specs: Sequence[MapSpec], options: dict[str, Any], class_top: int,
                      log: Callable[[str], None], progress: Any = None) -> dict[str, MapLayout]:
    """Lays out one layer's class atlases and two-class views (see atlas.focus).

    Args:
        samples: the layer's samples (`acts`, `attr`).
        specs: the layer's focus maps.
        options: `layout_2d`'s keyword arguments.
        class_top: samples most attributed to a class added to its map (`layout.class_top`).
        progress: a tqdm bar advanced by one per map (None: none).
    """
    layer = specs[0].layer
    if samples.attr is None:
        raise AtlasError(f"layout.classes and layout.pairs need each sample's attribution, which layer {layer!r} "
                         "lacks; collect with collect.attribution = true")
    columns = sorted({c for m in specs for c in m.classes})
    top, scores = class_scores(samples.attr, columns)
    selected = {c: class_rows(top, scores[:, columns.index(c)], c, class_top) for c in columns}
    out = {}
    for m in specs:
        t_map = time.perf_counter()
        if progress is not None:
            progress.set_postfix_str(m.name)
        rows = selected[m.classes[0]] if m.kind == "class" else np.union1d(*(selected[c] for c in m.classes))
        # what decides whether a new sample belongs to the map (atlas.place): per class, the
        # attribution that got a sample in for being among the most attributed
        thresholds = [class_threshold(scores[:, columns.index(c)], class_top) for c in m.classes]
        try:
            if m.kind == "class":
                fit = fit_layout(take_rows(samples.acts, rows), **options)
                xy, info = fit.xy, fit.info
            else:
                fit = fit_layout(take_rows(samples.acts, rows), **options, dims=1)
                a, b = (columns.index(c) for c in m.classes)
                diff = scores[rows, b] - scores[rows, a]
                scale = pair_scale(diff)
                xy = np.column_stack([pair_axis(diff, scale=scale), fit.xy[:, 0]]).astype(np.float32)
                info = {**fit.info, "pair_scale": scale}
        except AtlasError as exc:
            raise AtlasError(f"layout of {m.name!r} ({len(rows)} samples for {' and '.join(m.class_names)}): {exc}; "
                             "or raise layout.class_top") from None
        info.update(kind=m.kind, classes=list(m.classes), class_names=list(m.class_names), layer=layer,
                    class_top=class_top, class_threshold=np.array(thresholds), aligned=False)
        out[m.name] = MapLayout(xy, info, rows, kept_for_placing(fit, rows))
        log(_layer_line(m.name, info, time.perf_counter() - t_map))
        if progress is not None:
            progress.update(1)
    return out


def kept_for_placing(fit: LayoutFit, rows: np.ndarray | None = None) -> MapPlacement:
    """What layout.h5 keeps of a fit for placing new samples (atlas.place); `rows`: a focus map's
    layer rows, so the fit rows are stored as rows of the layer."""
    fit_rows = fit.fit_rows if rows is None else np.asarray(rows, np.int64)[fit.fit_rows]
    pca = fit.projection
    return MapPlacement(fit_rows, fit.fit_raw, pca.mean if pca else None, pca.components if pca else None)


def map_positions(raw: np.ndarray, info: dict[str, Any], pair_diff: np.ndarray | None = None) -> np.ndarray:
    """Where samples at raw reducer positions land on a map, by the steps the layout stage took
    for its own samples: the normalisation (`norm_low`, `norm_width`), for a two-class view the
    attribution axis (`pair_scale`; x = the scaled `pair_diff`, y = the normalised 1-D position),
    and for an aligned layer the alignment (`align_*`).

    Args:
        raw: (n, d) float positions in the reducer's own frame (d = 1 for a two-class view).
        info: the map's info (`MapLayout.info`, arrays or lists).
        pair_diff: (n,) attr[b] - attr[a], for a two-class view.

    Returns:
        (n, 2) float32 in [0, 1]; the layout's own fit samples get exactly their `xy`.
    """
    xy = Normalization(np.asarray(info["norm_low"], np.float64), np.asarray(info["norm_width"], np.float64))(raw)
    if info.get("kind") == "pair":
        if pair_diff is None:
            raise ValueError("a two-class view places samples by their attribution: pass pair_diff")
        xy = np.column_stack([pair_axis(pair_diff, scale=info["pair_scale"]), xy[:, 0]]).astype(np.float32)
    if info.get("align_to"):
        from .align import Similarity

        move = Similarity(np.asarray(info["align_rotation"], np.float64), float(info["align_scale"]),
                          np.asarray(info["align_shift"], np.float64))
        xy = Normalization(np.asarray(info["align_low"], np.float64),
                           np.asarray(info["align_width"], np.float64))(move(xy))
    return xy


def align_layer_maps(acts: Activations, layers: Sequence[str], maps: dict[str, MapLayout], options: dict[str, Any],
                     align: bool, log: Callable[[str], None]) -> None:
    """Measures, and with `align` removes, how far apart each image's samples land from one layer's
    map to the next (atlas.align); updates the layer maps in `maps` in place.

    Every layer after the first is moved by the rotation or mirror and shift that carry its image
    centroids onto the layer before's (already moved) ones, scaled to their spread
    (`atlas.align.align_layouts`), into the first layer's frame, and brought inside [0, 1] by
    `fit_inside` (one scale for both axes, only when it reaches outside) rather than stretched per
    axis by `normalize_layout(xy, 0, 0)`, which bends neighbourhoods; the price is that a rotated
    map can leave a margin of the square empty. Records on each layer map `aligned`, and with align `align_to`
    (the layer before; "" for the first), the transform (`align_rotation` (2, 2), `align_scale`,
    `align_shift` (2,)), the scaling back (`align_low`, `align_width`) and the trustworthiness before
    it (`trustworthiness_independent`; `trustworthiness` is then the aligned layout's, measured on
    the same samples). On each layer after the first: `centroid_distance_independent` and, with
    align, `centroid_distance_aligned`, the median distance in [0, 1] map units between an image's
    centroids on this map and on the layer before's.
    """
    from .align import align_layouts, centroid_distance

    n_images = len(acts.images)
    images = [acts.layer(name).image for name in layers]
    before = [maps[name].xy for name in layers]
    moved: list[np.ndarray] = before
    if align:
        try:
            aligned, moves = align_layouts(before, images, n_images)
        except ValueError as exc:
            raise AtlasError(f"layout.align: {exc} (layers {', '.join(layers)})") from None
        moved = [before[0]]
        maps[layers[0]].info.update(aligned=True, align_to="")
        for name, xy, move, previous in zip(layers[1:], aligned[1:], moves[1:], layers):
            assert move is not None
            back = fit_inside(xy)
            moved.append(back(xy))
            info = maps[name].info
            samples = acts.layer(name).acts
            _, trust_idx = pick_samples(len(samples), options["fit_samples"], options["trust_samples"],
                                        options["seed"])
            trust = (trustworthiness_of(take_rows(samples, trust_idx), moved[-1][trust_idx],
                                        options["trust_neighbors"], options["metric"])
                     if len(trust_idx) else float("nan"))
            info.update(aligned=True, align_to=previous, align_rotation=move.rotation, align_scale=move.scale,
                        align_shift=move.shift, align_low=back.low, align_width=back.width,
                        trustworthiness_independent=info["trustworthiness"], trustworthiness=trust)
            maps[name].xy = moved[-1]
    for k in range(1, len(layers)):
        info = maps[layers[k]].info
        info["centroid_distance_independent"] = centroid_distance(before[k - 1], images[k - 1], before[k], images[k],
                                                                  n_images)
        if align:
            info["centroid_distance_aligned"] = centroid_distance(moved[k - 1], images[k - 1], moved[k], images[k],
                                                                  n_images)
        log(_align_line(layers[k - 1], layers[k], info))


def _align_line(previous: str, name: str, info: dict[str, Any]) -> str:
    apart = f"median image-centroid distance {info['centroid_distance_independent']:.3f}"
    if "centroid_distance_aligned" not in info:
        return (f"layout: {previous} -> {name}: {apart} (map units; independent layouts, layout.align = true "
                "aligns them)")
    rotation = np.asarray(info["align_rotation"])
    angle = float(np.degrees(np.arctan2(rotation[0, 1], rotation[0, 0])))
    how = f"rotated {angle:.0f} deg{', mirrored' if np.linalg.det(rotation) < 0 else ''}, scale {info['align_scale']:.2f}"
    line = f"layout: aligned {name} to {previous} ({how}): {apart} -> {info['centroid_distance_aligned']:.3f} (map units)"
    before, after = info["trustworthiness_independent"], info["trustworthiness"]
    if np.isfinite(before) and np.isfinite(after):
        line += f", trustworthiness {before:.3f} -> {after:.3f}"
    return line


def _layer_line(name: str, info: dict[str, Any], seconds: float) -> str:
    parts = [f"layout: {'map' if '/' in name else 'layer'} {name}: {info['n_samples']} samples "
             f"({info['backend']} on {info['device']})"]
    if info["n_fit"] < info["n_samples"]:
        how = "transform" if info["placement"] == "transform" else "their nearest fit samples"
        parts.append(f"fitted on {info['n_fit']}, rest placed by {how}")
    if info["n_neighbors"] < info["n_neighbors_requested"]:
        parts.append(f"n_neighbors lowered to {info['n_neighbors']} (fewer "
                     + ("distinct " if info["backend"] == "torchdr" else "") + "samples than asked for)")
    if info["pca_dims"]:
        parts.append(f"PCA to {info['pca_dims']} dims keeps {100 * info['pca_variance']:.0f}%")
    trust = info["trustworthiness"]
    if np.isfinite(trust):
        parts.append(f"trustworthiness {trust:.3f} (k={info['trust_neighbors']}, {info['trust_samples']} samples)")
    parts.append(f"{seconds:.1f} s")
    return ", ".join(parts)
