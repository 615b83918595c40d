"""Comparing atlases: several layers of one run, or of several runs over the same images, in one figure.

`compare_runs(runs, layers=None, grid=None, neighbors=10, out=None)` (`atlas compare RUN [RUN ...]`)
reads each run through the store: its config's layers, their activations, layout
trustworthiness, grids and current atlas images (`atlas-<N>.png`, or the preview when the icons'
atlas has not been drawn). It writes a figure (default `RUN1/compare-<N>.png`) and the same facts
as JSON beside it.

One panel per (run, layer): runs in the order given, layers in config order (or in `layers`
order). Each panel is titled with the layer (prefixed by the run's folder name when several runs
are compared) and lists: channels and map size, samples, cells kept of N x N, the layout's
trustworthiness and the mean top-class share: per kept cell, the fraction of its members whose own
top attributed class is the cell's top class, averaged over cells; 1 when every cell is one class.

Between consecutive panels: the shared-neighbour fraction (atlas.neighbors), how much the
neighbourhoods of the same images change from one panel to the next. Images are matched between
runs by their path; only images that are ok and sampled in every panel count. With fewer than
K + 1 such images K is lowered to n - 1 (recorded); with fewer than 2 the fractions are NaN. Up to
`atlas.neighbors.EXACT_MAX_IMAGES` images the neighbours are exact; above, they come from
nearest-neighbour descent, and the figure and JSON say so with each panel's measured recall. A
single panel has no neighbours to share, so none are searched.

Memory: activations and attributions are read a block at a time; what is held whole is per
image or per cell (the images' paths, one (images, C) float32 embedding and each panel's (images,
K) neighbours), never per sample and channel.

Layers are only ever the names listed in a run's config (or `layers`), never discovered from the
files, so focus maps do not become panels.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .align import image_centroids
from .compare_figure import FOLLOW_COLOURS, CentroidLink, PanelFigures, compose_figure, number, panel_caption
from .errors import AtlasError, unknown_name
from .focus import class_scores
from .neighbors import EXACT_MAX_IMAGES, KNN_SEED, Neighbors, effective_neighbors, find_neighbors, image_embeddings, \
    shared_neighbor_matrix
from .store import Run, write_image, write_json

NEIGHBORS = 10  # default K
FOLLOW = 4  # default number of images whose centroids are marked on every panel


# ---------------------------------------------------------------------------------------------
# Pure core: the figures


def top_class_shares(indptr: np.ndarray, index: np.ndarray, cell_top: np.ndarray, sample_top: np.ndarray
                     ) -> np.ndarray:
    """Per cell, the fraction of its members whose own top class is the cell's top class.

    Args:
        indptr: (m + 1,) int CSR row pointers (grid.h5 `indptr`).
        index: (nnz,) int member sample rows (grid.h5 `index`).
        cell_top: (m,) int top class of each cell (grid.h5 `top_class[:, 0]`).
        sample_top: (n,) int top attributed class of each sample (see `sample_top_classes`).

    Returns:
        (m,) float64 in [0, 1]; NaN for a cell without members.
    """
    counts = np.diff(np.asarray(indptr, np.int64))
    cell_of = np.repeat(np.arange(len(counts)), counts)
    hits = np.asarray(sample_top)[np.asarray(index, np.int64)] == np.asarray(cell_top)[cell_of]
    sums = np.bincount(cell_of, weights=hits, minlength=len(counts))
    return np.divide(sums, counts, out=np.full(len(counts), np.nan), where=counts > 0)


def sample_top_classes(attr: Any) -> np.ndarray:
    """The top attributed class of every sample: (n,) int64 argmax over the columns (ties: lowest class).

    Args:
        attr: (n, n_classes) array or h5py dataset (float16 in activations.h5), n_classes >= 1; read
            in float32 blocks, since it can be larger than memory (the class atlases' selection,
            `atlas.focus.class_scores`, does the same pass).
    """
    return class_scores(attr, ())[0]


def mean_or_nan(values: np.ndarray) -> float:
    """The mean of the finite values (each cell counts once), NaN when there are none."""
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")


# ---------------------------------------------------------------------------------------------
# I/O


@dataclasses.dataclass
class _Opened:
    """A run as the user named it, opened through the store."""

    arg: str  # as the user typed it (for the commands suggested in messages)
    store: Run


def _open_run(arg: str | Path) -> _Opened:
    store = Run.open(arg)
    store.grid_fingerprint("mosaic")  # refuses a missing or stale activations, layout or grid up front
    return _Opened(str(arg), store)


def _pick_layers(runs: Sequence[_Opened], wanted: Sequence[str] | None, log: Callable[[str], None]) -> list[list[str]]:
    """The layers compared in each run: all of its config's, or those of `wanted` it has (in that order)."""
    if not wanted:
        return [list(run.store.config.layers) for run in runs]
    known = list(dict.fromkeys(layer for run in runs for layer in run.store.config.layers))
    for name in wanted:
        if name not in known:
            owner = f"run {runs[0].arg} has" if len(runs) == 1 else "the runs have"
            raise unknown_name("layer", name, known, owner)
    picked = []
    for run in runs:
        layers = [name for name in dict.fromkeys(wanted) if name in run.store.config.layers]
        if not layers:
            raise AtlasError(f"run {run.arg} has none of --layers {' '.join(wanted)}; it has "
                             f"{', '.join(run.store.config.layers)}")
        missing = [name for name in wanted if name not in layers]
        if missing:
            log(f"compare: run {run.arg} has no layer {', '.join(missing)}; its panels leave it out")
        picked.append(layers)
    return picked


def _grid_sizes(run: _Opened, layer: str) -> list[int]:
    """The grid sizes the run's grid.h5 holds for a layer."""
    return run.store.grid_file("mosaic").sizes(layer)


def _atlas_image(run: _Opened, layer: str, size: int) -> tuple[Path, str] | None:
    """The current atlas image of a layer at grid N, preferring the icons to the preview, and its kind."""
    return run.store.atlas_image(layer, size)


def _pick_grid(runs: Sequence[_Opened], layers: Sequence[Sequence[str]], size: int | None) -> int:
    """--grid N after checking every layer has it and an image for it; by default the largest N
    with icons for every layer, else the largest with an icons or preview image for every layer."""
    pairs = [(run, layer) for run, names in zip(runs, layers) for layer in names]
    sizes = [_grid_sizes(run, layer) for run, layer in pairs]
    if size is not None:
        for (run, layer), have in zip(pairs, sizes):
            if size not in have:
                raise AtlasError(f"layer {layer!r} of run {run.arg} has no {size}x{size} grid (it has "
                                 f"{', '.join(map(str, have)) or 'none'}); pick --grid from those, or add {size} "
                                 f"to grid.sizes: `atlas run {run.arg} --set grid.sizes=[...]`")
            if _atlas_image(run, layer, size) is None:
                raise AtlasError(f"layer {layer!r} of run {run.arg} has no current atlas or preview image at grid "
                                 f"{size}; run `atlas run {run.arg}` (it redoes only what is stale)")
        return size
    common = set(sizes[0]).intersection(*sizes[1:])
    # Icons in every panel before a larger grid: panels of one kind compare better.
    for wanted in ({"icons"}, {"icons", "preview"}):
        for n in sorted(common, reverse=True):
            found = [_atlas_image(run, layer, n) for run, layer in pairs]
            if all(f is not None and f[1] in wanted for f in found):
                return n
    if not common:
        have = "; ".join(f"{layer}: {', '.join(map(str, s)) or 'none'}" for (_, layer), s in zip(pairs, sizes))
        raise AtlasError(f"the compared layers have no grid size in common ({have}); run `atlas run "
                         f"{runs[0].arg}` or compare fewer layers with --layers")
    largest = max(common)
    run, layer = next((r, name) for r, name in pairs if _atlas_image(r, name, largest) is None)
    raise AtlasError(f"no grid size has a current atlas image for every compared layer (layer {layer!r} of run "
                     f"{run.arg} has none at grid {largest}); run `atlas run {run.arg}` (it redoes only what is "
                     "stale)")


def _panel_figures(run: _Opened, layer: str, size: int, label: str) -> PanelFigures:
    store = run.store
    grid = store.grid(layer, size, upto="mosaic")
    info = store.layout([layer], upto="mosaic").maps[layer].info
    found = _atlas_image(run, layer, size)
    assert found is not None, "_pick_grid checks that every layer has an image"
    image, kind = found
    with store.activations("mosaic") as acts:
        samples = acts.layer(layer)
        n, channels = samples.acts.shape
        share = float("nan")
        if samples.attr is not None and samples.attr.shape[1] > 0 and grid.top_class is not None \
                and grid.top_class.shape[1]:
            shares = top_class_shares(grid.indptr, grid.index, grid.top_class[:, 0], sample_top_classes(samples.attr))
            share = mean_or_nan(shares)
        shape = samples.shape
    layers = list(store.config.layers)
    previous = layers[layers.index(layer) - 1] if layers.index(layer) > 0 else None
    aligned_to = str(info.get("align_to", "")) if info.get("aligned", False) else None
    independent = float(info.get("centroid_distance_independent", float("nan")))
    return PanelFigures(str(store.root), layer, label, str(image), kind, int(channels),
                        [int(shape[1]), int(shape[2])] if shape and len(shape) == 3 else None, int(n), size, len(grid),
                        int(grid.indptr[-1]), float(info.get("trustworthiness", float("nan"))), share,
                        previous_layer=previous, aligned_to=aligned_to, centroid_distance_independent=independent)


def _common_images(runs: Sequence[_Opened], layers: Sequence[Sequence[str]]) -> tuple[int, list[np.ndarray]]:
    """How many images are ok in every run and sampled in every compared layer, and per run their rows
    of the run's images, in the order of their paths.

    Paths stay one numpy object array per run (no dict or list of them), since a run may hold millions."""
    keys, kept = [], []
    for run, names in zip(runs, layers):
        with run.store.activations("mosaic") as acts:
            paths = acts.images.path
            ok = acts.images.status == "ok"
            for layer in names:
                ok &= np.bincount(acts.layer(layer).image, minlength=len(paths))[:len(paths)] > 0
        kept.append(np.flatnonzero(ok))
        keys.append(paths[kept[-1]])
    common = keys[0]
    for other in keys[1:]:
        common = np.intersect1d(common, other, assume_unique=True)
    if not len(common) and len(runs) > 1:
        raise AtlasError(f"runs {', '.join(run.arg for run in runs)} have no images in common (images are matched "
                         "by their path under `images` and must be ok in every run); compare runs made over the "
                         "same images")
    # Sorted by path, so row j is the same image in every run.
    rows = [rows[np.intersect1d(common, key, assume_unique=True, return_indices=True)[2]].astype(np.int64)
            for key, rows in zip(keys, kept)]
    return len(common), rows


def _panel_centroids(run: _Opened, layer: str, rows: np.ndarray) -> np.ndarray:
    """(len(rows), 2) centroids of the given images' samples on a layer's layout (NaN: none)."""
    xy = run.store.layout([layer], upto="mosaic").maps[layer].xy
    with run.store.activations("mosaic") as acts:
        return image_centroids(xy, acts.layer(layer).image, len(acts.images.path))[rows]


def farthest_points(xy: np.ndarray, k: int) -> np.ndarray:
    """Indices of k rows of xy (finite ones only) spread over the map: the one farthest from the
    mean first, then each time the one farthest from those picked (deterministic)."""
    finite = np.flatnonzero(np.isfinite(xy).all(axis=1))
    if not len(finite) or k < 1:
        return np.zeros(0, np.int64)
    points = xy[finite]
    picked = [int(np.argmax(np.linalg.norm(points - points.mean(0), axis=1)))]
    gap = np.linalg.norm(points - points[picked[0]], axis=1)
    while len(picked) < min(k, len(points)):
        picked.append(int(np.argmax(gap)))
        gap = np.minimum(gap, np.linalg.norm(points - points[picked[-1]], axis=1))
    return finite[picked]


def centroid_links(panels: Sequence[PanelFigures], centroids: Sequence[np.ndarray], shuffles: int = 20,
                   seed: int = 0) -> list[CentroidLink]:
    """Per pair of consecutive panels, the median distance between the same images' centroids, its
    chance level (the median over `shuffles` seeded shufflings of the second panel's images) and,
    when the second panel is the next aligned layer of the same run, the distance before alignment.

    Args:
        panels: P panels.
        centroids: per panel, (n, 2) centroids of the same n images in the same order (NaN: none).
    """
    rng = np.random.default_rng(seed)
    links = []
    for k, (a, b) in enumerate(zip(panels, panels[1:])):
        both = np.isfinite(centroids[k]).all(1) & np.isfinite(centroids[k + 1]).all(1)
        xy_a, xy_b = centroids[k][both], centroids[k + 1][both]
        if not len(xy_a):
            links.append(CentroidLink(math.nan, math.nan, math.nan))
            continue
        chance = [np.median(np.linalg.norm(xy_a - xy_b[rng.permutation(len(xy_b))], axis=1)) for _ in range(shuffles)]
        next_layer = a.run == b.run and b.previous_layer == a.layer and bool(b.aligned_to)
        links.append(CentroidLink(float(np.median(np.linalg.norm(xy_a - xy_b, axis=1))), float(np.median(chance)),
                                  b.centroid_distance_independent if next_layer else math.nan))
    return links


def _follow(runs: Sequence[_Opened], rows: Sequence[np.ndarray], centroids: Sequence[np.ndarray], k: int
            ) -> tuple[list[str], list[np.ndarray]]:
    """The followed images (paths) and per panel their centroids, (k, 2): images spread over the
    first panel's map among those with samples on every panel."""
    everywhere = np.isfinite(np.stack(centroids)).all(axis=(0, 2))
    chosen = farthest_points(np.where(everywhere[:, None], centroids[0], np.nan), k)
    with runs[0].store.activations("mosaic") as acts:
        paths = [str(path) for path in acts.images.path[rows[0][chosen]]]
    return paths, [c[chosen] for c in centroids]


def _neighbors(run: _Opened, layer: str, rows: np.ndarray, k: int) -> Neighbors:
    with run.store.activations("mosaic") as acts:
        samples = acts.layer(layer)
        embedding = image_embeddings(samples.acts, samples.image, rows)
    return find_neighbors(embedding, k, exact_max=EXACT_MAX_IMAGES)


@dataclasses.dataclass
class Comparison:
    """What `compare_runs` measured and wrote."""

    panels: list[PanelFigures]
    grid: int  # N
    neighbors: int  # K asked for
    neighbors_used: int  # K used (lowered to images - 1 when there are fewer images; 0 below 2)
    images: int  # images common to every panel
    knn_method: str | None  # "exact" or "nn-descent"; None when no neighbours were searched (one panel, K = 0)
    knn_recall: list[float]  # per panel, the share of the exact neighbours found (1.0 exact; NaN: not searched)
    knn_recall_rows: int  # images the recall was measured on (all of them when exact)
    shared: np.ndarray  # (P, P) float64 shared-neighbour fractions
    png: Path
    json: Path
    centroids: list[CentroidLink]  # per pair of consecutive panels
    followed: list[str] = dataclasses.field(default_factory=list)  # paths of the images marked on every panel
    follow_xy: list[np.ndarray] = dataclasses.field(default_factory=list)  # per panel, (K, 2) their centroids


def compare_runs(runs: Sequence[str | Path], layers: Sequence[str] | None = None, grid: int | None = None,
                 neighbors: int = NEIGHBORS, out: str | Path | None = None, follow: int = FOLLOW,
                 log: Callable[[str], None] = print) -> Comparison:
    """Measures and draws the comparison of the layers of one or more runs; writes the PNG and JSON.

    Args:
        runs: run directories, one or more (several must share images).
        layers: compare only these layers (in this order); None = every layer of each run's config.
        grid: grid size N; None = the largest N that every layer has with an atlas image.
        neighbors: K of the shared-neighbour fraction, >= 1.
        out: the PNG to write; None = RUN1/compare-N.png. The JSON goes beside it (suffix .json).
        follow: mark this many images on every panel, numbered, at the centroid of their samples
            (images spread over the first panel, with samples on every panel); 0 = none.
        log: receives the table of figures and the paths written.

    Raises:
        AtlasError: a run or its artifacts missing or out of date, an unknown layer, a grid size
            a layer lacks, a layer without an atlas image at N, runs without images in common.
    """
    if neighbors < 1:
        raise AtlasError(f"--neighbors must be >= 1, got {neighbors}")
    if not 0 <= follow <= len(FOLLOW_COLOURS):
        raise AtlasError(f"--follow must be between 0 and {len(FOLLOW_COLOURS)} images, got {follow}")
    if grid is not None and grid < 1:
        raise AtlasError(f"--grid must be a positive grid size, got {grid}")
    opened = [_open_run(run) for run in runs]
    picked = _pick_layers(opened, layers, log)
    size = _pick_grid(opened, picked, grid)
    several = len(opened) > 1
    panels, found = [], []
    n_images, rows = _common_images(opened, picked)
    k = effective_neighbors(n_images, neighbors)
    search = k >= 1 and sum(map(len, picked)) > 1
    for run, names, image_rows in zip(opened, picked, rows):
        for layer in names:
            label = f"{run.store.root.name}: {layer}" if several else layer
            panels.append(_panel_figures(run, layer, size, label))
            t_knn = time.perf_counter()
            found.append(_neighbors(run, layer, image_rows, k) if search else None)
            if found[-1] is not None and found[-1].method != "exact":  # minutes on big runs: say what took them
                log(f"compare: {label}: the {k} nearest of {n_images} images by nearest-neighbour descent in "
                    f"{time.perf_counter() - t_knn:.0f} s; recall {found[-1].recall:.3f} on {found[-1].recall_rows} "
                    "images")
    centroids = [_panel_centroids(run, layer, image_rows)
                 for run, names, image_rows in zip(opened, picked, rows) for layer in names]
    if search:
        shared = shared_neighbor_matrix([f.index if f is not None else None for f in found])
    else:  # one panel shares all of its neighbours with itself
        shared = np.full((len(panels), len(panels)), 1.0 if k >= 1 else np.nan)
    png = Path(out) if out is not None else opened[0].store.compare_path(size)
    first = next((f for f in found if f is not None), None)
    result = Comparison(panels, size, neighbors, k, n_images, first.method if first else None,
                        [f.recall if f is not None else float("nan") for f in found],
                        first.recall_rows if first else 0, shared, png, png.with_suffix(".json"),
                        centroid_links(panels, centroids))
    if follow:
        result.followed, result.follow_xy = _follow(opened, rows, centroids, follow)
    _write_figure(result)
    _write_json(result, [str(run.store.root) for run in opened])
    for line in _table(result):
        log(line)
    log(f"wrote {result.png} and {result.json.name}")
    return result


def _chance(result: Comparison) -> float:
    """The shared-neighbour fraction of unrelated neighbourhoods: K / (n - 1)."""
    return result.neighbors_used / (result.images - 1) if result.neighbors_used else float("nan")


def _links(result: Comparison) -> list[float]:
    return [float(result.shared[i, i + 1]) for i in range(len(result.panels) - 1)]


def _header(result: Comparison) -> list[str]:
    n, k, p = result.images, result.neighbors_used, len(result.panels)
    runs = ", ".join(dict.fromkeys(Path(panel.run).name for panel in result.panels))
    lines = [f"atlas compare: {p} atlas{'es' if p > 1 else ''} of {runs} at grid {result.grid}x{result.grid}"]
    if p > 1:
        lowered = f" (lowered from {result.neighbors}: only {n} images)" if k < result.neighbors else ""
        lines.append(f"shared neighbours: the fraction of each image's {k} nearest images{lowered} (by cosine of "
                     f"its mean activation, over {n} images) that two panels share; chance {number(_chance(result))}")
        if result.knn_method == "nn-descent":
            lines.append(_approximate_note(result))
    if result.followed:
        lines.append(_follow_line(result))
    return lines


def _follow_line(result: Comparison) -> str:
    aligned = all(p.aligned_to is not None for p in result.panels)
    how = "aligned layouts (layout.align)" if aligned else "layouts laid out independently (layout.align = false)"
    return (f"markers 1-{len(result.followed)}: where {len(result.followed)} images' samples lie on average on each "
            f"map ({how}): {', '.join(f'{k + 1} {Path(p).name}' for k, p in enumerate(result.followed))}")


def _approximate_note(result: Comparison) -> str:
    """The line that says the neighbours are approximate, with the worst panel's measured recall."""
    return (f"neighbours by nearest-neighbour descent (more than {EXACT_MAX_IMAGES} images): recall "
            f"{number(min(result.knn_recall))} or better against exact, on {result.knn_recall_rows} sampled images")


def _write_figure(result: Comparison) -> None:
    images = []
    for panel in result.panels:
        with Image.open(panel.image) as im:
            images.append(np.asarray(im.convert("RGB")))
    figure = compose_figure(_header(result), [p.label for p in result.panels], images,
                            [panel_caption(p) for p in result.panels], _links(result),
                            result.centroids, result.follow_xy or None)
    try:
        write_image(figure, result.png)
    except ValueError as exc:
        raise AtlasError(f"--out {result.png}: {exc}; use .png (or .jpg, .webp)") from None


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None  # JSON has no NaN


def _write_json(result: Comparison, runs: Sequence[str]) -> None:
    labels = [p.label for p in result.panels]
    floats = ("trustworthiness", "mean_top_class_share", "centroid_distance_independent")
    panels = [{**dataclasses.asdict(p), **{key: _finite_or_none(getattr(p, key)) for key in floats}}
              for p in result.panels]
    info = {
        "runs": runs, "grid": result.grid, "neighbors": result.neighbors, "neighbors_used": result.neighbors_used,
        "images": result.images, "chance": _finite_or_none(_chance(result)), "panels": panels,
        "knn": {"method": result.knn_method, "exact_max_images": EXACT_MAX_IMAGES, "seed": KNN_SEED,
                "recall_rows": result.knn_recall_rows,
                "recall": [_finite_or_none(v) for v in result.knn_recall]},  # per panel, in panel order
        "shared_neighbors": {"labels": labels,
                             "matrix": [[_finite_or_none(v) for v in row] for row in result.shared]},
        "consecutive": [{"from": labels[i], "to": labels[i + 1], "fraction": _finite_or_none(v),
                         "centroid_distance": _finite_or_none(d.distance),
                         "centroid_distance_chance": _finite_or_none(d.chance),
                         "centroid_distance_unaligned": _finite_or_none(d.unaligned)}
                        for i, (v, d) in enumerate(zip(_links(result), result.centroids))],
        "followed": [{"image": path, "xy": [[_finite_or_none(v) for v in xy[k]] for xy in result.follow_xy]}
                     for k, path in enumerate(result.followed)],  # xy per panel, in panel order
        "png": str(result.png),
    }
    write_json(info, result.json)


def _table(result: Comparison) -> list[str]:
    """The terminal summary: one line per panel, then the fractions between consecutive panels."""
    width = max(len("panel"), *(len(p.label) for p in result.panels))
    head = f"{'panel':<{width}}  {'image':<7}  {'channels':>8}  {'map':>7}  {'samples':>8}  {'cells kept':>12}  " \
           f"{'trust':>6}  {'top-class share':>15}"
    lines = [head]
    for p in result.panels:
        shape = f"{p.map_hw[0]}x{p.map_hw[1]}" if p.map_hw else "?"
        kept = f"{p.cells_kept} of {p.grid}x{p.grid}"
        lines.append(f"{p.label:<{width}}  {p.kind:<7}  {p.channels:>8}  {shape:>7}  {p.samples:>8}  {kept:>12}  "
                     f"{number(p.trustworthiness):>6}  {number(p.mean_top_class_share):>15}")
    links = _links(result)
    if links:
        lines.append(f"shared neighbours ({result.neighbors_used} nearest of {result.images} images; "
                     f"chance {number(_chance(result))}):")
        for a, b, v, d in zip(result.panels, result.panels[1:], links, result.centroids):
            apart = f"; image centroids {number(d.distance)} apart (chance {number(d.chance)}"
            apart += f", {number(d.unaligned)} before alignment)" if math.isfinite(d.unaligned) else ")"
            lines.append(f"  {a.label} -> {b.label}: {number(v)}{apart}")
        if result.knn_method == "nn-descent":
            lines.append(f"  ({_approximate_note(result)})")
    if result.followed:
        lines.append(_follow_line(result))
    return lines


