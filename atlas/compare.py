"""Comparing atlases: several layers of one run, or of several runs over the same images, in one figure.

`atlas compare RUN [RUN ...] [--layers L [L ...]] [--grid N] [--neighbors K] [--out PATH]`

Reads, per run: `RUN/config.toml` (its `layers`), `RUN/activations.h5` (`/images/path`,
`/images/status`, `/layers/<layer>/acts`, `image`, `attr`, file attr `layer_shapes`),
`RUN/layout.h5` (attr `trustworthiness` of `/<layer>`), `RUN/grid.h5` (`/<layer>/<N>/cell`,
`indptr`, `index`, `top_class`) and the atlas image `RUN/<layer>/atlas-<N>.png`, or
`atlas-preview-<N>.png` when the icons' atlas has not been drawn.
Writes `PATH` (default `RUN1/compare-<N>.png`) and the same path with the suffix `.json`.

One panel per (run, layer): runs in the order given, layers in config order (or in `--layers`
order). Each panel is titled with the layer (prefixed by the run's folder name when several runs
are compared) and lists: channels and map size, samples, cells kept of N x N, the layout's
trustworthiness and the mean top-class share: per kept cell, the fraction of its members whose own
top attributed class is the cell's top class, averaged over cells; 1 when every cell is one class.

Between consecutive panels: the shared-neighbour fraction, how much the neighbourhoods of the same
images change from one panel to the next. Each image is the L2-normalised mean of its samples'
activations; its K nearest other images by cosine are found in each panel, and the fraction is the
mean over images of |kNN_A ∩ kNN_B| / K: 1 for the same neighbours, about K / (n - 1) by chance.
Images are matched between runs by their path; only images that are ok and sampled in every panel
count. With fewer than K + 1 such images K is lowered to n - 1 (recorded); with fewer than 2 the
fractions are NaN. The JSON holds every figure and the full panel x panel matrix of fractions.

Layers are only ever the names listed in a run's config (or `--layers`), never discovered from the
HDF5 groups, so other groups under a layer's group (focus maps) do not become panels.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image, ImageDraw

from .artifacts import atomic_path, read_fingerprint
from .config import CONFIG_NAME, Config, load_config
from .errors import AtlasError
from .focus import class_scores
from .grid import GRID_NAME, sum_by_cell, load_grid
from .layout import ACTIVATIONS_NAME, LAYOUT_NAME, Layout, open_activations
from .mosaic import font, text_height, wrap_label

PANEL_PX = 480  # side every panel's atlas image is scaled to
GUTTER_PX = 104  # band between two panels that shows their shared-neighbour fraction
MARGIN = 16
COLUMNS = 4  # panels per row before the figure wraps to the next row
TITLE_PX = 30  # band above a panel's image for its title
TEXT_FONT_PX = 15
LINE_PX = 20  # caption line spacing
CAPTION_LINES = 5
HEADER_MAX_LINES = 3  # the header is wrapped to the figure's width, then cut
KNN_BLOCK_BYTES = 1 << 26  # similarity rows computed at a time: 64 MiB of float32
NEIGHBORS = 10  # default K


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
# Pure core: neighbourhoods of images


def effective_neighbors(n_images: int, k: int) -> int:
    """The neighbourhood size used among n images: k, lowered to n - 1 when there are fewer; 0 when n < 2."""
    return max(0, min(k, n_images - 1))


def image_embeddings(acts: Any, image: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Each listed image as the L2-normalised mean of its samples' activations.

    Args:
        acts: (n, C) activations, array or h5py dataset (read in float32 blocks).
        image: (n,) int image index of each sample (`/layers/<layer>/image`).
        images: (m,) distinct int image indices; row j of the result is image `images[j]`.

    Returns:
        (m, C) float32 with unit rows; a zero row for an image without samples (or a zero mean).
    """
    image = np.asarray(image, np.int64)
    images = np.asarray(images, np.int64)
    slot = np.full(max(int(image.max(initial=-1)), int(images.max(initial=-1))) + 1, -1, np.int64)
    slot[images] = np.arange(len(images))
    # The sum has the direction of the mean, and the direction is all that is kept.
    sums = sum_by_cell(acts, [slot[image]], [len(images)])[0]
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0).astype(np.float32)


def nearest_neighbors(x: np.ndarray, k: int) -> np.ndarray:
    """The k rows most similar (cosine) to each row, the row itself excluded.

    Similarities are computed a block of rows at a time (KNN_BLOCK_BYTES), so memory stays bounded
    while the cost is O(n^2 C).

    Args:
        x: (n, C) float; zero rows have cosine 0 with everything.
        k: 1 <= k <= n - 1.

    Returns:
        (n, k) int64 row indices, in no particular order. Which of several rows tied for the k-th
        place is kept is unspecified, but the same for the same input.
    """
    x = np.asarray(x, np.float32)
    n = len(x)
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} rows, got {k}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    out = np.empty((n, k), np.int64)
    rows = max(1, KNN_BLOCK_BYTES // (4 * n))
    for a in range(0, n, rows):
        sim = unit[a:a + rows] @ unit.T
        b = a + len(sim)
        sim[np.arange(b - a), np.arange(a, b)] = -np.inf
        out[a:b] = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    return out


def shared_neighbor_fraction(knn_a: np.ndarray, knn_b: np.ndarray) -> float:
    """The mean over rows of |knn_a[i] ∩ knn_b[i]| / k: 1 when every row has the same neighbours in both.

    Args:
        knn_a, knn_b: (n, k) int neighbour indices of the same n items (distinct within a row), as
            from `nearest_neighbors`.

    Returns:
        A float in [0, 1]; NaN when n or k is 0.
    """
    a, b = np.asarray(knn_a), np.asarray(knn_b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"neighbour arrays must have the same (n, k) shape, got {a.shape} and {b.shape}")
    n, k = a.shape
    if n == 0 or k == 0:
        return float("nan")
    shared = 0
    rows = max(1, (1 << 24) // (k * k))  # bounds the (rows, k, k) comparison
    for s in range(0, n, rows):
        shared += int((a[s:s + rows, :, None] == b[s:s + rows, None, :]).any(axis=2).sum())
    return shared / (n * k)


def shared_neighbor_matrix(knns: Sequence[np.ndarray | None]) -> np.ndarray:
    """The shared-neighbour fraction between every two panels.

    Args:
        knns: P (n, k) neighbour arrays over the same images (None when there are too few images).

    Returns:
        (P, P) float64, symmetric; NaN where a panel has no neighbours.
    """
    p = len(knns)
    out = np.full((p, p), np.nan)
    for i in range(p):
        for j in range(i, p):
            if knns[i] is not None and knns[j] is not None:
                out[i, j] = out[j, i] = shared_neighbor_fraction(knns[i], knns[j])
    return out


# ---------------------------------------------------------------------------------------------
# Pure core: the figure


@dataclasses.dataclass
class PanelFigures:
    """One panel: a layer of a run at grid N, its atlas image and its figures."""

    run: str  # the run directory
    layer: str
    label: str  # the panel's title: the layer, prefixed by the run's folder name when runs are compared
    image: str  # path of the atlas image shown
    kind: str  # "icons" (atlas-N.png) or "preview" (atlas-preview-N.png)
    channels: int  # C
    map_hw: list[int] | None  # (H, W) of the layer's activation map, when activations.h5 records it
    samples: int  # samples of the layer
    grid: int  # N
    cells_kept: int  # kept cells of the N x N grid
    samples_kept: int  # samples in kept cells
    trustworthiness: float  # of the layout; NaN when not measured
    mean_top_class_share: float  # see `top_class_shares`; NaN without attribution


def _number(value: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def panel_caption(p: PanelFigures) -> list[str]:
    """The CAPTION_LINES lines of figures printed under a panel."""
    source = "icons" if p.kind == "icons" else "preview (image patches; no icons yet)"
    shape = f", {p.map_hw[0]}x{p.map_hw[1]} map" if p.map_hw else ""
    kept = 100 * p.samples_kept / max(p.samples, 1)
    share = (_number(p.mean_top_class_share) if math.isfinite(p.mean_top_class_share)
             else "n/a (collected without attribution)")
    trust = _number(p.trustworthiness) if math.isfinite(p.trustworthiness) else "not measured"
    return [f"{source}: {Path(p.image).name}",
            f"{p.channels} channels{shape}, {p.samples} samples",
            f"cells kept: {p.cells_kept} of {p.grid}x{p.grid} ({kept:.0f}% of samples)",
            f"layout trustworthiness: {trust}",
            f"mean top-class share: {share}"]


Box = tuple[int, int, int, int]  # left, top, right, bottom


def figure_boxes(n_panels: int, header_lines: int = 2, columns: int = COLUMNS
                 ) -> tuple[tuple[int, int], list[Box], list[Box | None]]:
    """Geometry of the figure: (height, width), each panel's image box and the gutter before it.

    Panels go left to right, `columns` to a row. A gutter GUTTER_PX wide sits between two panels of a
    row; when the figure has several rows each row also starts with one, so the fraction between the
    last panel of a row and the first of the next has a place. The first panel has no gutter (None).
    Above each image is a TITLE_PX band, below it CAPTION_LINES lines; above everything `header_lines`.
    """
    cols = max(1, min(n_panels, columns))
    rows = max(1, -(-n_panels // cols))
    lead = GUTTER_PX if rows > 1 else 0
    header = MARGIN + header_lines * LINE_PX + MARGIN
    block = TITLE_PX + PANEL_PX + 6 + CAPTION_LINES * LINE_PX + MARGIN
    images: list[Box] = []
    gutters: list[Box | None] = []
    for p in range(n_panels):
        r, c = divmod(p, cols)
        left = MARGIN + lead + c * (PANEL_PX + GUTTER_PX)
        top = header + r * block + TITLE_PX
        images.append((left, top, left + PANEL_PX, top + PANEL_PX))
        gutters.append((left - GUTTER_PX, top, left, top + PANEL_PX) if p > 0 else None)
    width = MARGIN + lead + cols * PANEL_PX + (cols - 1) * GUTTER_PX + MARGIN
    return (header + rows * block, width), images, gutters


def fit_square(image: np.ndarray, side: int) -> np.ndarray:
    """An RGB uint8 image scaled to fit a white side x side square, centred, keeping its aspect.

    Shrinking uses Lanczos; enlarging uses nearest neighbour, which keeps the cells of a small
    atlas crisp.
    """
    pil = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    scale = side / max(pil.size)
    size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
    canvas = Image.new("RGB", (side, side), "white")
    canvas.paste(pil.resize(size, method), ((side - size[0]) // 2, (side - size[1]) // 2))
    return np.asarray(canvas)


def compose_figure(header: Sequence[str], titles: Sequence[str], images: Sequence[np.ndarray],
                   captions: Sequence[Sequence[str]], links: Sequence[float]) -> np.ndarray:
    """Draws the comparison: header lines, then each panel's title, image and caption, with the
    shared-neighbour fraction to the previous panel in the gutter before it.

    Args:
        header: lines across the top, wrapped to the figure's width (at most HEADER_MAX_LINES in all).
        titles, images, captions: per panel: a title, an RGB uint8 (h, w, 3) image (scaled to
            PANEL_PX by `fit_square`) and up to CAPTION_LINES lines.
        links: P - 1 fractions, links[i] between panels i and i + 1 (NaN shows as "n/a").

    Returns:
        (H, W, 3) uint8 on white, geometry from `figure_boxes` with the wrapped header's line count.
    """
    text, title, big = font(TEXT_FONT_PX), font(20), font(24)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = figure_boxes(len(images))[0][1]
    wrapped = [part for line in header
               for part in wrap_label(line, lambda s: measure.textlength(s, font=text), width - 2 * MARGIN, 3)]
    wrapped = wrapped[:HEADER_MAX_LINES]
    (height, width), boxes, gutters = figure_boxes(len(images), len(wrapped))
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(wrapped):
        draw.text((MARGIN, MARGIN + k * LINE_PX), line, fill="black", font=text)
    for p, (box, name, picture, lines) in enumerate(zip(boxes, titles, images, captions)):
        left, top, right, bottom = box
        draw.text((left, top - TITLE_PX + 2), _fit_line(draw, name, title, PANEL_PX), fill="black", font=title)
        canvas.paste(Image.fromarray(fit_square(picture, PANEL_PX)), (left, top))
        draw.rectangle((left - 1, top - 1, right, bottom), outline=(200, 200, 200))
        for k, line in enumerate(lines[:CAPTION_LINES]):
            draw.text((left, bottom + 6 + k * LINE_PX), _fit_line(draw, line, text, PANEL_PX), fill=(40, 40, 40),
                      font=text)
        if gutters[p] is not None and p - 1 < len(links):
            _draw_link(draw, gutters[p], links[p - 1], text, big)
    return np.asarray(canvas)


def _fit_line(draw: ImageDraw.ImageDraw, line: str, font: Any, width: int) -> str:
    lines = wrap_label(line, lambda s: draw.textlength(s, font=font), width, max_lines=1)
    return lines[0] if lines else ""


def _draw_link(draw: ImageDraw.ImageDraw, box: Box, value: float, text: Any, big: Any) -> None:
    """The gutter between two panels: "shared / neighbours", the fraction, and an arrow to the right."""
    left, top, right, bottom = box
    mid_x, mid_y = (left + right) // 2, (top + bottom) // 2
    number = _number(value, 2)
    rows = [("shared", text, mid_y - 2 * LINE_PX - 8), ("neighbours", text, mid_y - LINE_PX - 8),
            (number, big, mid_y + 2)]
    for line, face, y in rows:
        draw.text((mid_x - draw.textlength(line, font=face) / 2, y), line, fill="black", font=face)
    y = mid_y + 8 + text_height(big) + 6  # an arrow drawn, not a glyph: the default font may lack one
    draw.line((left + 14, y, right - 18, y), fill="black", width=2)
    draw.polygon([(right - 10, y), (right - 20, y - 6), (right - 20, y + 6)], fill="black")


# ---------------------------------------------------------------------------------------------
# I/O


@dataclasses.dataclass
class _Run:
    """A run directory whose artifacts are present and agree with each other."""

    arg: str  # as the user typed it (for the commands suggested in messages)
    config: Config
    acts_path: Path


def _open_run(arg: str | Path) -> _Run:
    path = Path(arg)
    if not path.is_dir():
        raise AtlasError(f"run directory {arg} not found; build it with `atlas run CONFIG` (a config's run_dir)")
    if not (path / CONFIG_NAME).is_file():
        raise AtlasError(f"{arg} has no {CONFIG_NAME}, so it is not a run directory; build one with `atlas run CONFIG`")
    config = load_config(path)
    for name in (ACTIVATIONS_NAME, LAYOUT_NAME, GRID_NAME):
        if not (config.run_dir / name).is_file():
            raise AtlasError(f"{config.run_dir / name} not found; run `atlas run {arg}` first")
    acts_path, acts_fp = open_activations(config.run_dir)
    # Figures from a layout or grid of other activations would index the wrong samples. (Whether
    # they match the current config is for `atlas run` to decide; compare reads what is there.)
    layout_fp = read_fingerprint(config.run_dir / LAYOUT_NAME)
    grid_fp = read_fingerprint(config.run_dir / GRID_NAME)
    if (layout_fp is None or grid_fp is None or _attr(config.run_dir / LAYOUT_NAME, "inputs") != acts_fp
            or _attr(config.run_dir / GRID_NAME, "inputs") != layout_fp
            or _attr(config.run_dir / GRID_NAME, "activations_fingerprint") != acts_fp):
        raise AtlasError(f"the layout or grid of {arg} is incomplete or out of date; run `atlas run {arg}` first")
    return _Run(str(arg), config, acts_path)


def _attr(path: Path, key: str) -> str | None:
    with h5py.File(path, "r") as h5:
        value = h5.attrs.get(key)
        return None if value is None else str(value)


def _pick_layers(runs: Sequence[_Run], wanted: Sequence[str] | None, log: Callable[[str], None]) -> list[list[str]]:
    """The layers compared in each run: all of its config's, or those of `wanted` it has (in that order)."""
    if not wanted:
        return [list(run.config.layers) for run in runs]
    known = list(dict.fromkeys(layer for run in runs for layer in run.config.layers))
    for name in wanted:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            owner = f"run {runs[0].arg} has" if len(runs) == 1 else "the runs have"
            raise AtlasError(f"unknown layer {name!r} in --layers; {hint}{owner} {', '.join(known)}")
    picked = []
    for run in runs:
        layers = [name for name in dict.fromkeys(wanted) if name in run.config.layers]
        if not layers:
            raise AtlasError(f"run {run.arg} has none of --layers {' '.join(wanted)}; it has "
                             f"{', '.join(run.config.layers)}")
        missing = [name for name in wanted if name not in layers]
        if missing:
            log(f"compare: run {run.arg} has no layer {', '.join(missing)}; its panels leave it out")
        picked.append(layers)
    return picked


def _grid_sizes(run: _Run, layer: str) -> list[int]:
    """The grid sizes grid.h5 holds for a layer (from the file's `sizes`, not its groups)."""
    with h5py.File(run.config.run_dir / GRID_NAME, "r") as h5:
        sizes = json.loads(h5.attrs.get("sizes", "[]"))
        return sorted(int(s) for s in sizes if f"{layer}/{s}" in h5)


def _atlas_image(run: _Run, layer: str, size: int) -> tuple[Path, str] | None:
    """The atlas image of a layer at grid N, preferring the icons to the preview, and its kind."""
    folder = run.config.run_dir / layer
    for path, kind in ((folder / f"atlas-{size}.png", "icons"), (folder / f"atlas-preview-{size}.png", "preview")):
        if path.is_file():
            return path, kind
    return None


def _pick_grid(runs: Sequence[_Run], layers: Sequence[Sequence[str]], size: int | None) -> int:
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
                raise AtlasError(f"{run.config.run_dir / layer} has no atlas-{size}.png or atlas-preview-{size}.png; "
                                 f"run `atlas mosaic {run.arg}` first")
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
    raise AtlasError(f"no grid size has an atlas image for every compared layer ({run.config.run_dir / layer} has "
                     f"no atlas-{largest}.png or atlas-preview-{largest}.png); run `atlas run {run.arg}` or "
                     f"`atlas mosaic {run.arg}` first")


def _panel_figures(run: _Run, layer: str, size: int, label: str) -> PanelFigures:
    grid = load_grid(run.config.run_dir / GRID_NAME, layer, size)
    info = Layout.load(run.config.run_dir / LAYOUT_NAME, [layer]).layers[layer].info
    found = _atlas_image(run, layer, size)
    assert found is not None, "_pick_grid checks that every layer has an image"
    image, kind = found
    with h5py.File(run.acts_path, "r") as h5:
        group = h5[f"layers/{layer}"]
        n, channels = group["acts"].shape
        shapes = json.loads(h5.attrs["layer_shapes"]) if "layer_shapes" in h5.attrs else {}
        share = float("nan")
        if "attr" in group and group["attr"].shape[1] > 0 and grid.top_class is not None and grid.top_class.shape[1]:
            shares = top_class_shares(grid.indptr, grid.index, grid.top_class[:, 0], sample_top_classes(group["attr"]))
            share = mean_or_nan(shares)
    shape = shapes.get(layer)
    return PanelFigures(str(run.config.run_dir), layer, label, str(image), kind, int(channels),
                        [int(shape[1]), int(shape[2])] if shape and len(shape) == 3 else None, int(n), size, len(grid),
                        int(grid.indptr[-1]), float(info.get("trustworthiness", float("nan"))), share)


def _common_images(runs: Sequence[_Run], layers: Sequence[Sequence[str]]) -> tuple[list[str], list[np.ndarray]]:
    """The paths of the images ok in every run and sampled in every compared layer (sorted), and per run
    their rows of `/images`."""
    rows_by_path = []
    for run, names in zip(runs, layers):
        with h5py.File(run.acts_path, "r") as h5:
            paths = h5["images/path"].asstr()[()]
            ok = (h5["images/status"].asstr()[()] == "ok") if "images/status" in h5 else np.ones(len(paths), bool)
            for layer in names:
                ok &= np.bincount(h5[f"layers/{layer}/image"][()], minlength=len(paths))[:len(paths)] > 0
        rows_by_path.append({str(p): i for i, p in enumerate(paths) if ok[i]})
    common = sorted(set(rows_by_path[0]).intersection(*rows_by_path[1:]))
    if not common and len(runs) > 1:
        raise AtlasError(f"runs {', '.join(run.arg for run in runs)} have no images in common (images are matched "
                         "by their path under `images` and must be ok in every run); compare runs made over the "
                         "same images")
    return common, [np.array([rows[p] for p in common], np.int64) for rows in rows_by_path]


def _neighbors(run: _Run, layer: str, rows: np.ndarray, k: int) -> np.ndarray | None:
    if k < 1:
        return None
    with h5py.File(run.acts_path, "r") as h5:
        group = h5[f"layers/{layer}"]
        embedding = image_embeddings(group["acts"], group["image"][()], rows)
    return nearest_neighbors(embedding, k)


@dataclasses.dataclass
class Comparison:
    """What `compare_runs` measured and wrote."""

    panels: list[PanelFigures]
    grid: int  # N
    neighbors: int  # K asked for
    neighbors_used: int  # K used (lowered to images - 1 when there are fewer images; 0 below 2)
    images: int  # images common to every panel
    shared: np.ndarray  # (P, P) float64 shared-neighbour fractions
    png: Path
    json: Path


def compare_runs(runs: Sequence[str | Path], layers: Sequence[str] | None = None, grid: int | None = None,
                 neighbors: int = NEIGHBORS, out: str | Path | None = None,
                 log: Callable[[str], None] = print) -> Comparison:
    """Measures and draws the comparison of the layers of one or more runs; writes the PNG and JSON.

    Args:
        runs: run directories, one or more (several must share images).
        layers: compare only these layers (in this order); None = every layer of each run's config.
        grid: grid size N; None = the largest N that every layer has with an atlas image.
        neighbors: K of the shared-neighbour fraction, >= 1.
        out: the PNG to write; None = RUN1/compare-N.png. The JSON goes beside it (suffix .json).
        log: receives the table of figures and the paths written.

    Raises:
        AtlasError: a run or its artifacts missing or out of date, an unknown layer, a grid size
            a layer lacks, a layer without an atlas image at N, runs without images in common.
    """
    if neighbors < 1:
        raise AtlasError(f"--neighbors must be >= 1, got {neighbors}")
    if grid is not None and grid < 1:
        raise AtlasError(f"--grid must be a positive grid size, got {grid}")
    opened = [_open_run(run) for run in runs]
    picked = _pick_layers(opened, layers, log)
    size = _pick_grid(opened, picked, grid)
    several = len(opened) > 1
    panels, knns = [], []
    paths, rows = _common_images(opened, picked)
    k = effective_neighbors(len(paths), neighbors)
    for run, names, image_rows in zip(opened, picked, rows):
        for layer in names:
            label = f"{run.config.run_dir.name}: {layer}" if several else layer
            panels.append(_panel_figures(run, layer, size, label))
            knns.append(_neighbors(run, layer, image_rows, k))
    shared = shared_neighbor_matrix(knns)
    png = Path(out) if out is not None else opened[0].config.run_dir / f"compare-{size}.png"
    result = Comparison(panels, size, neighbors, k, len(paths), shared, png, png.with_suffix(".json"))
    _write_figure(result)
    _write_json(result, [str(run.config.run_dir) for run in opened])
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
                     f"its mean activation, over {n} images) that two panels share; chance {_number(_chance(result))}")
    return lines


def _write_figure(result: Comparison) -> None:
    images = []
    for panel in result.panels:
        with Image.open(panel.image) as im:
            images.append(np.asarray(im.convert("RGB")))
    figure = compose_figure(_header(result), [p.label for p in result.panels], images,
                            [panel_caption(p) for p in result.panels], _links(result))
    suffix = result.png.suffix.lower()
    image_format = Image.registered_extensions().get(suffix, "PNG" if suffix in ("", ".png") else None)
    if image_format is None:
        raise AtlasError(f"--out {result.png}: unknown image format {suffix!r}; use .png (or .jpg, .webp)")
    with atomic_path(result.png) as tmp:
        Image.fromarray(figure).save(tmp, format=image_format)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None  # JSON has no NaN


def _write_json(result: Comparison, runs: Sequence[str]) -> None:
    labels = [p.label for p in result.panels]
    panels = [{**dataclasses.asdict(p), "trustworthiness": _finite_or_none(p.trustworthiness),
               "mean_top_class_share": _finite_or_none(p.mean_top_class_share)} for p in result.panels]
    info = {
        "runs": runs, "grid": result.grid, "neighbors": result.neighbors, "neighbors_used": result.neighbors_used,
        "images": result.images, "chance": _finite_or_none(_chance(result)), "panels": panels,
        "shared_neighbors": {"labels": labels,
                             "matrix": [[_finite_or_none(v) for v in row] for row in result.shared]},
        "consecutive": [{"from": labels[i], "to": labels[i + 1], "fraction": _finite_or_none(v)}
                        for i, v in enumerate(_links(result))],
        "png": str(result.png),
    }
    with atomic_path(result.json) as tmp:
        tmp.write_text(json.dumps(info, indent=1))


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
                     f"{_number(p.trustworthiness):>6}  {_number(p.mean_top_class_share):>15}")
    links = _links(result)
    if links:
        lines.append(f"shared neighbours ({result.neighbors_used} nearest of {result.images} images; "
                     f"chance {_number(_chance(result))}):")
        lines += [f"  {a.label} -> {b.label}: {_number(v)}"
                  for a, b, v in zip(result.panels, result.panels[1:], links)]
    return lines


def cmd_compare(args: argparse.Namespace) -> None:
    compare_runs(args.runs, args.layers, args.grid, args.neighbors, args.out)


def add_compare_parser(sub: Any) -> None:
    """Adds the `compare` command to argparse subparsers (`args.view(args)` runs it)."""
    p = sub.add_parser("compare", help="atlases of several layers (or runs over the same images) side by side, "
                                       "with figures to compare")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories; several runs must share images")
    p.add_argument("--layers", nargs="+", metavar="L", default=None,
                   help="compare only these layers, in this order (default: every layer of each run's config)")
    p.add_argument("--grid", type=int, metavar="N", default=None,
                   help="grid size (default: the largest with icons for every layer, else with icons or a preview)")
    p.add_argument("--neighbors", type=int, metavar="K", default=NEIGHBORS,
                   help=f"nearest images compared between panels (default {NEIGHBORS})")
    p.add_argument("--out", metavar="PATH", default=None,
                   help="the PNG to write (default RUN1/compare-N.png); the JSON goes beside it")
    p.set_defaults(view=cmd_compare)
