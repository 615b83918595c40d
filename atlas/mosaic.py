"""Mosaic stage: the atlas image of each grid, from the rendered icons or, as a preview, from image patches.

Reads  `RUN/grid.h5` (cells, counts, directions, members, top classes, class names) and, per map
(each layer, and each focus map `<layer>/class-<slug>`, `<layer>/pair-<a>-<b>` of atlas.focus) and
grid size N:
- for the atlas: `RUN/<layer>/icons-<N>/icons.json` and its PNGs (the render stage's icons);
- for the preview: `RUN/activations.h5` (`/images/path`, `/layers/<layer>/image`, `yx`, `acts`,
  attrs `layer_shapes` and `preprocess`) and the source images under `config.images`.
Writes, atomically, into `RUN/<map>/`:
- `atlas-<N>.png`: one icon per kept cell, when `icons-<N>/icons.json` exists;
- `atlas-preview-<N>.png` (when `mosaic.preview`): each cell shown by the mean of the image patches
  around its members' positions; needs no optimisation, so users can look before rendering;
- `atlas-<N>-labels.png`, `atlas-preview-<N>-labels.png` (when `mosaic.labels`): the same image
  with each cell's top class printed on it. A separate file, so the plain atlas stays unmarked
  for zooming and the two can be flipped between (they have the same geometry).

Geometry: the canvas is white, N * px square, px = `mosaic.icon_px` (0 = `render.icon_size`);
cell (x, y) of grid.h5 covers columns [x * px, (x + 1) * px) and rows [(N - 1 - y) * px, ...), so
y grows upwards as in the layout. Empty cells stay white. With `mosaic.scale_by_density` a cell's
icon is drawn smaller and centred (see `cell_scale`).

Each PNG carries text chunks `atlas-fingerprint` (everything that decides its pixels: the tile
size and the mosaic settings that apply to it, the grid's fingerprint and, for the atlas, the icons'
fingerprint), `atlas-stage`, `atlas-layer`, `atlas-grid` and `atlas-version`. An image whose
fingerprint matches is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from . import __version__
from .artifacts import atomic_path, fingerprint
from .config import Config
from .corpus import BadImage, load_image
from .errors import AtlasError
from .focus import MapSpec, read_maps
from .grid import GRID_NAME, Grid, cosine_to_direction, grid_fingerprint, load_class_names, load_grid
from .layout import open_activations

ICONS_JSON = "icons.json"
FINGERPRINT_KEY = "atlas-fingerprint"
LABEL_MIN_PX = 32  # cells narrower than this get no label: no font is legible in less


# ---------------------------------------------------------------------------------------------
# Pure core: placing and composing


def place_cells(cells: np.ndarray, size: int, icon_px: int) -> np.ndarray:
    """Returns the pixel (left, top) of every cell's square in the atlas image.

    Args:
        cells: (m, 2) int (x, y) cells of an N x N grid, y growing upwards.
        size: N.
        icon_px: pixels per cell.

    Returns:
        (m, 2) int64 (left, top) = (x * icon_px, (N - 1 - y) * icon_px): row y = N - 1 is the top.
    """
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
    if len(cells) and (cells.min() < 0 or cells.max() >= size):
        raise ValueError(f"cells must lie in [0, {size}), got values in [{cells.min()}, {cells.max()}]")
    return np.stack([cells[:, 0] * icon_px, (size - 1 - cells[:, 1]) * icon_px], axis=1)


def cell_scale(count: np.ndarray, floor: float = 0.3) -> np.ndarray:
    """Icon side per cell as a fraction of the cell: floor + (1 - floor) * sqrt(count / max(count)).

    The square root makes the drawn area grow linearly with the count (as in the article's
    density-scaled atlas); the floor keeps the sparsest cells visible. The busiest cell fills its
    square (1.0).

    Args:
        count: (m,) samples per cell, >= 0.
        floor: side of a cell with (nearly) no samples, in (0, 1].

    Returns:
        (m,) float64 in [floor, 1].
    """
    count = np.asarray(count, dtype=np.float64)
    if not 0 < floor <= 1:
        raise ValueError(f"floor must be in (0, 1], got {floor}")
    top = count.max(initial=0.0)
    if top <= 0:
        return np.ones_like(count)
    return floor + (1.0 - floor) * np.sqrt(np.clip(count, 0, None) / top)


def compose_mosaic(tiles: Sequence[np.ndarray | None], cells: np.ndarray, size: int, icon_px: int,
                   scale: np.ndarray | None = None) -> np.ndarray:
    """Draws one tile per cell onto a white N * icon_px square canvas.

    Args:
        tiles: m RGB uint8 (h, w, 3) images, any size (resized to the drawn side), or None for a
            cell with nothing to draw (it stays white).
        cells: (m, 2) int (x, y), see `place_cells`.
        size: N.
        icon_px: pixels per cell.
        scale: (m,) fractions of icon_px for each tile's side (see `cell_scale`), or None for full
            cells. A smaller tile is centred in its cell.

    Returns:
        (N * icon_px, N * icon_px, 3) uint8.
    """
    if len(tiles) != len(cells):
        raise ValueError(f"{len(tiles)} tiles for {len(cells)} cells")
    corners = place_cells(cells, size, icon_px)
    canvas = np.full((size * icon_px, size * icon_px, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        if tile is None:
            continue
        side = icon_px if scale is None else int(np.clip(round(float(scale[i]) * icon_px), 1, icon_px))
        offset = (icon_px - side) // 2
        left, top = corners[i] + offset
        canvas[top:top + side, left:left + side] = _fit(tile, side)
    return canvas


def _fit(tile: np.ndarray, side: int) -> np.ndarray:
    """An RGB uint8 tile resized to side x side (Lanczos: icons are mostly shrunk)."""
    tile = np.asarray(tile)
    if tile.ndim == 2:
        tile = np.repeat(tile[:, :, None], 3, axis=2)
    tile = tile[:, :, :3]
    if tile.shape[:2] == (side, side):
        return tile
    return np.asarray(Image.fromarray(tile.astype(np.uint8)).resize((side, side), Image.Resampling.LANCZOS))


def draw_labels(canvas: np.ndarray, cells: np.ndarray, size: int, icon_px: int, labels: Sequence[str | None],
                min_px: int = LABEL_MIN_PX) -> np.ndarray:
    """Returns a copy of an atlas image with each cell's label printed in a band at its bottom.

    The band is white at 75% opacity, so the text is legible on any icon while the icon still shows
    through. Labels are wrapped on words into up to two lines and cut with "…" where they do not fit.
    The font (PIL's default) is about icon_px / 6 pixels high, at least 9.

    Args:
        canvas: (N * icon_px, N * icon_px, 3) uint8 atlas, from `compose_mosaic`.
        cells, size, icon_px: as for `compose_mosaic`.
        labels: m strings, or None for a cell without a label.
        min_px: cells narrower than this get no label (returned unchanged).

    Returns:
        (N * icon_px, N * icon_px, 3) uint8.
    """
    if len(labels) != len(cells):
        raise ValueError(f"{len(labels)} labels for {len(cells)} cells")
    image = Image.fromarray(np.asarray(canvas, dtype=np.uint8)).convert("RGBA")
    if icon_px < min_px:
        return np.asarray(image.convert("RGB"))
    face = font(max(9, icon_px // 6))
    line_h = text_height(face) + 1
    overlay = Image.new("RGBA", image.size, (255, 255, 255, 0))
    draw = ImageDraw.Draw(overlay)
    for (left, top), text in zip(place_cells(cells, size, icon_px), labels):
        if not text:
            continue
        lines = wrap_label(text, lambda s: draw.textlength(s, font=face), icon_px - 4, max_lines=2)
        band = len(lines) * line_h + 2
        bottom = int(top) + icon_px
        draw.rectangle([int(left), bottom - band, int(left) + icon_px - 1, bottom - 1], fill=(255, 255, 255, 190))
        for k, line in enumerate(lines):
            width = draw.textlength(line, font=face)
            x = int(left) + (icon_px - width) / 2
            draw.text((x, bottom - band + 1 + k * line_h), line, font=face, fill=(0, 0, 0, 255))
    return np.asarray(Image.alpha_composite(image, overlay).convert("RGB"))


def wrap_label(text: str, measure: Callable[[str], float], width: float, max_lines: int = 2) -> list[str]:
    """Splits `text` on spaces into at most `max_lines` lines of at most `width` (as `measure`d).

    Words longer than a line, and whatever does not fit in the last line, are cut with "…".
    """
    words = text.split()
    lines: list[str] = []
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and measure(line + " " + words[0]) <= width:
            line += " " + words.pop(0)
        if len(lines) == max_lines - 1 and words:  # the last line takes the rest, cut
            line += " " + " ".join(words)
            words = []
        lines.append(_cut(line, measure, width))
    return lines


def _cut(text: str, measure: Callable[[str], float], width: float) -> str:
    if measure(text) <= width:
        return text
    while text and measure(text + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…"


def font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)  # scalable when Pillow has FreeType
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def text_height(font: Any) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return int(bottom)


# ---------------------------------------------------------------------------------------------
# Pure core: the preview's image patches


def patch_box(yx: np.ndarray, map_hw: tuple[int, int], input_px: int, side: float = 2.0) -> np.ndarray:
    """The square window of the network input around each sample's map position.

    A position (y, x) of an H x W map over a `input_px` square input is centred at
    ((y + 0.5) * input_px / H, (x + 0.5) * input_px / W); its window has a side of `side` map
    strides (input_px / H vertically, input_px / W horizontally). Two strides is a rough stand-in
    for the receptive field until a proper one is computed. The window is not clipped: the part
    that falls outside the input is left blank by `window_patch`, so a patch at the border keeps
    its scale and its place in the tile.

    Args:
        yx: (n, 2) int (row, column) map positions.
        map_hw: (H, W) of the activation map.
        input_px: side of the square network input (after resize and centre crop), pixels.
        side: window side in map strides, > 0.

    Returns:
        (n, 4) float64 (left, top, right, bottom) in input pixels.
    """
    yx = np.asarray(yx, dtype=np.float64).reshape(-1, 2)
    if side <= 0:
        raise ValueError(f"side must be > 0 map strides, got {side}")
    stride = np.array([input_px / map_hw[0], input_px / map_hw[1]])
    centre = (yx + 0.5) * stride
    half = side * stride / 2
    top_left, bottom_right = centre - half, centre + half
    return np.stack([top_left[:, 1], top_left[:, 0], bottom_right[:, 1], bottom_right[:, 0]], axis=1)


def window_patch(image: np.ndarray | Image.Image, box: Sequence[float], out_px: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Resamples a window of an image to out_px x out_px; the part outside the image is masked.

    Args:
        image: (h, w, 3) uint8 RGB array, or a PIL RGB image (cheaper when cutting many windows).
        box: (left, top, right, bottom) window in pixel-edge coordinates, possibly beyond the image.
        out_px: side of the patch.

    Returns:
        (out_px, out_px, 3) float32 patch (0 where masked) and (out_px, out_px) bool mask of the
        pixels that came from inside the image.
    """
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    width, height = pil.size
    left, top, right, bottom = (float(v) for v in box)
    patch = np.zeros((out_px, out_px, 3), np.float32)
    mask = np.zeros((out_px, out_px), bool)
    if right <= left or bottom <= top:
        return patch, mask
    sx, sy = out_px / (right - left), out_px / (bottom - top)
    inside = (max(left, 0.0), max(top, 0.0), min(right, float(width)), min(bottom, float(height)))
    dest = (round((inside[0] - left) * sx), round((inside[1] - top) * sy),
            round((inside[2] - left) * sx), round((inside[3] - top) * sy))
    if dest[2] <= dest[0] or dest[3] <= dest[1]:
        return patch, mask
    region = pil.resize((dest[2] - dest[0], dest[3] - dest[1]), Image.Resampling.BILINEAR, box=inside)
    patch[dest[1]:dest[3], dest[0]:dest[2]] = np.asarray(region, dtype=np.float32)[:, :, :3]
    mask[dest[1]:dest[3], dest[0]:dest[2]] = True
    return patch, mask


def mean_patch(patches: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """The pixelwise mean of patches over the patches that cover each pixel; white where none does.

    Args:
        patches: (k, P, P, 3) float or uint8.
        masks: (k, P, P) bool, True where a patch has a pixel; None = all.

    Returns:
        (P, P, 3) uint8 (all white when k = 0).
    """
    patches = np.asarray(patches, dtype=np.float32)
    weights = np.ones(patches.shape[:3], np.float32) if masks is None else np.asarray(masks, np.float32)
    total = (patches * weights[..., None]).sum(axis=0)
    return _finish_mean(total, weights.sum(axis=0))


def _finish_mean(total: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """(..., P, P, 3) sums and (..., P, P) weights -> uint8 means, white where the weight is 0."""
    mean = np.divide(total, weight[..., None], out=np.full(total.shape, 255.0, np.float32),
                     where=weight[..., None] > 0)
    return np.clip(np.rint(mean), 0, 255).astype(np.uint8)


def pick_members(indptr: np.ndarray, index: np.ndarray, score: np.ndarray, m: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Keeps the m members of each cell with the highest score (ties: the earlier member).

    Args:
        indptr: (cells + 1,) int64 CSR row pointers.
        index: (nnz,) int64 member rows.
        score: (nnz,) float score of each entry of `index` (e.g. cosine to the cell's direction).
        m: members kept per cell, >= 1.

    Returns:
        (indptr, index) of the kept members as CSR, best first within each cell.
    """
    indptr = np.asarray(indptr, np.int64)
    counts = np.diff(indptr)
    cell_of = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((np.arange(len(index)), -np.asarray(score, np.float64), cell_of))
    rank = np.arange(len(index)) - indptr[cell_of[order]]
    keep = order[rank < m]
    new_indptr = np.zeros_like(indptr)
    np.cumsum(np.minimum(counts, m), out=new_indptr[1:])
    return new_indptr, np.asarray(index, np.int64)[keep]


def member_cosine(acts: Any, grid: Grid) -> np.ndarray:
    """Cosine similarity of every member to its cell's direction, aligned with `grid.index`.

    Args:
        acts: (n, C) array or h5py dataset of the layer's activations (read in float32 blocks).
        grid: the cells, with `direction` (m, C).

    Returns:
        (nnz,) float32.
    """
    return cosine_to_direction(acts, [grid])[0]


# ---------------------------------------------------------------------------------------------
# Stage


@dataclasses.dataclass
class MosaicSummary:
    """What a mosaic run did."""

    written: list[Path]  # images written
    skipped: list[Path]  # images already up to date
    missing_icons: int  # kept cells drawn white because their icon was missing or unreadable
    skipped_images: int  # source images the preview could not read
    seconds: float


@dataclasses.dataclass
class _Job:
    """One image to (maybe) write: its path, fingerprint and how to make its tiles."""

    layer: str  # the map's name: a layer or a focus map (`<layer>/class-<slug>`, `<layer>/pair-<a>-<b>`)
    source: str  # the layer whose samples the map shows (activations.h5 `/layers/<source>`)
    size: int
    kind: str  # "atlas" or "preview"
    path: Path
    fingerprint: str
    labels_path: Path | None  # the labelled copy, when mosaic.labels
    labels_fingerprint: str
    icons_dir: Path | None = None


def run(config: Config, *, force: bool = False, log: Callable[[str], None] = print) -> MosaicSummary:
    """Runs the mosaic stage: grid.h5 (+ icons, + images for the preview) -> RUN/<layer>/atlas-*.png.

    Args:
        config: the run's config (`config.mosaic`, `config.render.icon_size`, `config.layers`,
            `config.grid.sizes`, `config.images`, `config.run_dir`).
        force: redraw images that are up to date.
        log: receives one line per image written or skipped, and one overall.

    Raises:
        AtlasError: grid.h5 missing, incomplete or made with another [grid] config; icons.json
            unreadable or made for another grid; activations.h5 or the images folder missing when
            a preview is asked for.
    """
    t0 = time.perf_counter()
    mc = config.mosaic
    run_dir = config.run_dir
    grid_path = run_dir / GRID_NAME
    grid_fp, maps = _check_grid(config, grid_path)
    px = mc.icon_px or config.render.icon_size
    loaded: dict[tuple[str, int], Grid] = {}

    def grid_of(name: str, size: int) -> Grid:  # read once, for the icons' check and for drawing
        if (name, size) not in loaded:
            loaded[(name, size)] = load_grid(grid_path, name, size)
        return loaded[(name, size)]

    jobs = _plan(config, grid_fp, maps, px, grid_of, log)
    class_names = load_class_names(grid_path) if mc.labels else None

    if not jobs:
        log(f"mosaic: nothing to draw: no finished icons under {run_dir}/<layer>/icons-<N>/ "
            "(run `atlas render` first) and mosaic.preview = false")
    summary = MosaicSummary([], [], 0, 0, 0.0)
    todo = []
    for job in jobs:
        paths = [(job.path, job.fingerprint)]
        if job.labels_path is not None:
            paths.append((job.labels_path, job.labels_fingerprint))
        if not force and all(_png_fingerprint(p) == fp for p, fp in paths):
            summary.skipped.extend(p for p, _ in paths)
            log(f"mosaic: up to date, skipped {job.path}" + (" (and its labels)" if len(paths) > 1 else ""))
        else:
            todo.append(job)

    grids = {(j.layer, j.size): grid_of(j.layer, j.size) for j in todo}
    previews = [j for j in todo if j.kind == "preview"]
    preview_tiles: dict[tuple[str, int], list[np.ndarray | None]] = {}
    if previews:
        preview_tiles, summary.skipped_images = _preview_tiles(config, previews, grids, px, log)
    for job in todo:
        grid = grids[(job.layer, job.size)]
        if job.kind == "atlas":
            tiles, missing = _icon_tiles(job, grid)
            summary.missing_icons += missing
        else:
            tiles, missing = preview_tiles[(job.layer, job.size)], 0
        scale = cell_scale(grid.count, mc.density_floor) if mc.scale_by_density else None
        canvas = compose_mosaic(tiles, grid.cell, job.size, px, scale)
        note = f", {missing} icon(s) missing (left white)" if missing else ""
        _save_png(canvas, job.path, job.fingerprint, job, log, len(grid), note)
        summary.written.append(job.path)
        if job.labels_path is not None:
            labelled = draw_labels(canvas, grid.cell, job.size, px, _cell_labels(grid, class_names))
            _save_png(labelled, job.labels_path, job.labels_fingerprint, job, log, len(grid), "")
            summary.written.append(job.labels_path)
    summary.seconds = time.perf_counter() - t0
    log(f"mosaic: wrote {len(summary.written)} image(s), {len(summary.skipped)} up to date, "
        f"in {summary.seconds:.1f} s")
    return summary


def _check_grid(config: Config, grid_path: Path) -> tuple[str, list[MapSpec]]:
    """Returns grid.h5's fingerprint and maps, or raises AtlasError if it is missing, incomplete or stale."""
    run_dir = config.run_dir
    if not grid_path.is_file():
        raise AtlasError(f"{grid_path} not found; run `atlas grid {run_dir}` first")
    try:
        with h5py.File(grid_path, "r") as h5:
            complete = bool(h5.attrs.get("complete", False))
            fp = str(h5.attrs.get("fingerprint", ""))
            layout_fp = str(h5.attrs.get("inputs", ""))
            acts_fp = str(h5.attrs.get("activations_fingerprint", ""))
            layers = set(json.loads(h5.attrs.get("layers", "[]")))
            maps = read_maps(h5)
    except (OSError, ValueError) as exc:
        raise AtlasError(f"cannot read {grid_path} ({exc}); run `atlas grid {run_dir}` again") from None
    if not complete or not fp:
        raise AtlasError(f"{grid_path} is incomplete; run `atlas grid {run_dir}` first")
    if fp != grid_fingerprint(config, layout_fp, acts_fp) or not set(config.layers) <= layers:
        raise AtlasError(f"{grid_path} is out of date (made with another [grid] config or other layers); "
                         f"run `atlas grid {run_dir}` first")
    return fp, maps


def _plan(config: Config, grid_fp: str, maps: Sequence[MapSpec], px: int, grid_of: Callable[[str, int], Grid],
          log: Callable[[str], None]) -> list[_Job]:
    """Every image this config asks for, with the fingerprint of what decides its pixels.

    `grid_of(map, size)` reads a grid (the icons are checked against its digest)."""
    mc = config.mosaic
    grid_path = config.run_dir / GRID_NAME
    labels = mc.labels and _has_labels(grid_path, [m.name for m in maps], config.grid.sizes)
    if mc.labels and not labels:
        log(f"mosaic: {GRID_NAME} has no class labels (collect.attribution = false); no labelled images")
    drawing = {"px": px, "scale_by_density": mc.scale_by_density,
               "density_floor": mc.density_floor if mc.scale_by_density else None}
    labelling = {"min_px": LABEL_MIN_PX, "version": 1}
    jobs = []
    for m in maps:
        layer = m.name
        folder = config.run_dir / layer
        for size in config.grid.sizes:
            icons_dir = folder / f"icons-{size}"
            if icons_dir.is_dir():
                icons_fp = _icons_fingerprint(icons_dir, layer, size, grid_of(layer, size).digest())
                if icons_fp is None:
                    log(f"mosaic: {icons_dir} has no {ICONS_JSON} yet (render unfinished); atlas-{size}.png not drawn")
                    continue
                fp = fingerprint("mosaic", layer, size, drawing, grid_fp, icons_fp)
                jobs.append(_Job(layer, m.layer, size, "atlas", folder / f"atlas-{size}.png", fp,
                                 folder / f"atlas-{size}-labels.png" if labels else None,
                                 fingerprint("mosaic-labels", fp, labelling), icons_dir))
            if mc.preview:
                preview = {"members": mc.preview_members, "patch": mc.preview_patch, "images": str(config.images),
                           "max_image_pixels": config.collect.max_image_pixels, "version": 1}
                fp = fingerprint("mosaic-preview", layer, size, drawing, preview, grid_fp)
                jobs.append(_Job(layer, m.layer, size, "preview", folder / f"atlas-preview-{size}.png", fp,
                                 folder / f"atlas-preview-{size}-labels.png" if labels else None,
                                 fingerprint("mosaic-labels", fp, labelling)))
    return jobs


def _has_labels(grid_path: Path, layers: Sequence[str], sizes: Sequence[int]) -> bool:
    """Whether grid.h5 has top classes for every layer and size (it has them for all or none)."""
    with h5py.File(grid_path, "r") as h5:
        return all(f"{layer}/{size}/top_class" in h5 for layer in layers for size in sizes)


def _icons_fingerprint(icons_dir: Path, layer: str, size: int, grid_digest: str) -> str | None:
    """The fingerprint of a finished icons folder; None (with no error) while it has no icons.json.

    `layer` is the map's name and `grid_digest` its grid's `Grid.digest()`.
    """
    path = icons_dir / ICONS_JSON
    if not path.is_file():
        return None  # render has not finished this size; the atlas waits for it
    meta = _read_icons_json(path)
    made_for = meta.get("map", meta.get("layer", layer))
    if made_for != layer or int(meta.get("size", size)) != size:
        raise AtlasError(f"{path} is for {made_for!r} size {meta.get('size')}, not {layer!r} "
                         f"size {size}; run `atlas render {icons_dir.parent.parent}` again")
    made_from = meta.get("grid_fingerprint")
    if made_from is not None and made_from != grid_digest:
        raise AtlasError(f"{path} was rendered from another grid.h5; run `atlas render {icons_dir.parent.parent}` "
                         "again")
    # Without a fingerprint, the file's own content stands for it.
    return str(meta.get("fingerprint") or fingerprint(meta))


def _read_icons_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AtlasError(f"cannot read {path} ({exc}); run `atlas render` again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("icons", []), list):
        raise AtlasError(f"{path} is not an icons.json (no \"icons\" list); run `atlas render` again")
    return meta


def _icon_tiles(job: _Job, grid: Grid) -> tuple[list[np.ndarray | None], int]:
    """Each kept cell's icon (None where it has none) and the number of cells left without one."""
    assert job.icons_dir is not None
    meta = _read_icons_json(job.icons_dir / ICONS_JSON)
    tiles: list[np.ndarray | None] = [None] * len(grid)
    for entry in meta.get("icons", []):
        try:
            x, y = (int(v) for v in entry["cell"])
        except (KeyError, TypeError, ValueError):
            continue
        i = grid.find(x, y)
        if i is None:
            continue  # an icon for a cell the grid no longer keeps
        try:
            with Image.open(job.icons_dir / entry.get("file", f"cell-{x}-{y}.png")) as icon:
                tiles[i] = np.asarray(icon.convert("RGB"))
        except OSError:
            pass  # counted as missing below; the cell stays white
    return tiles, sum(t is None for t in tiles)


def _preview_tiles(config: Config, jobs: Sequence[_Job], grids: dict[tuple[str, int], Grid], px: int,
                   log: Callable[[str], None]) -> tuple[dict[tuple[str, int], list[np.ndarray | None]], int]:
    """The preview tile of every cell of the given jobs (None for a cell no image could show).

    Each cell averages the patches of its `mosaic.preview_members` members most similar to its
    direction (the most typical ones). The picks of all jobs are sorted by source image, so each
    image is decoded and preprocessed once and only one is held at a time; memory is the per-cell
    sums (cells x px x px x 4 floats). Images that cannot be read are skipped and counted.
    """
    mc = config.mosaic
    acts_path, _ = open_activations(config.run_dir)
    if not config.images.is_dir():
        raise AtlasError(f"images folder {config.images} does not exist, and the preview is made of its images; "
                         "--set images=DIR, or set mosaic.preview = false")
    job_of, cell_of, image_of, boxes = [], [], [], []
    with h5py.File(acts_path, "r") as h5:
        if "layer_shapes" not in h5.attrs or "preprocess" not in h5.attrs:
            raise AtlasError(f"{acts_path} lacks the layer_shapes or preprocess attribute the preview needs; "
                             f"run `atlas collect {config.run_dir} --force`, or set mosaic.preview = false")
        shapes = json.loads(h5.attrs["layer_shapes"])
        preprocess = json.loads(h5.attrs["preprocess"])
        geometry = (int(preprocess["size"]), int(preprocess["resize"]), preprocess.get("interpolation", "bilinear"))
        relpaths = h5["images/path"].asstr()[()]
        for k, job in enumerate(jobs):
            source = job.source
            if f"layers/{source}/acts" not in h5 or source not in shapes:
                raise AtlasError(f"layer {source!r} is missing from {acts_path}; "
                                 f"run `atlas collect {config.run_dir}` again")
            group = h5[f"layers/{source}"]
            grid = grids[(job.layer, job.size)]
            indptr, rows = pick_members(grid.indptr, grid.index, member_cosine(group["acts"], grid),
                                        mc.preview_members)
            job_of.append(np.full(len(rows), k))
            cell_of.append(np.repeat(np.arange(len(grid)), np.diff(indptr)))
            image_of.append(group["image"][()][rows])
            boxes.append(patch_box(group["yx"][()][rows], tuple(shapes[source][1:3]), geometry[0],
                                   mc.preview_patch))
    job_of, cell_of, boxes = np.concatenate(job_of), np.concatenate(cell_of), np.concatenate(boxes)
    image_of = np.concatenate(image_of).astype(np.int64)
    sums = [np.zeros((len(grids[(j.layer, j.size)]), px, px, 3), np.float32) for j in jobs]
    weights = [np.zeros(s.shape[:3], np.float32) for s in sums]

    order = np.argsort(image_of, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(image_of[order]) != 0]) if len(order) else np.zeros(0, np.int64)
    stops = np.r_[starts[1:], len(order)]
    bad = 0
    for begin, stop in _progress(zip(starts, stops), len(starts)):
        picked = order[begin:stop]
        try:
            source = load_image(config.images / relpaths[image_of[picked[0]]], config.collect.max_image_pixels)
            pixels = input_pixels(source, *geometry)
        except (BadImage, OSError, ValueError):
            bad += 1
            continue
        for j in picked:
            patch, mask = window_patch(pixels, boxes[j], px)
            sums[job_of[j]][cell_of[j]] += patch
            weights[job_of[j]][cell_of[j]] += mask
    if bad:
        log(f"mosaic: preview: {bad} of {len(starts)} source image(s) could not be read and were left out")
    tiles = {}
    for k, job in enumerate(jobs):
        means = _finish_mean(sums[k], weights[k])
        shown = weights[k].any(axis=(1, 2))
        tiles[(job.layer, job.size)] = [means[i] if shown[i] else None for i in range(len(means))]
    return tiles, bad


_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST}


def input_pixels(image: Image.Image, size: int, resize: int, interpolation: str = "bilinear") -> Image.Image:
    """The network input before normalisation: shorter side resized to `resize`, centre crop `size`.

    The same pixels as `atlas.models.Preprocess` (tested against it) without the float tensors,
    so the preview needs neither torch nor the time of normalising and undoing it.

    Args:
        image: RGB PIL image.
        size, resize, interpolation: the `preprocess` attributes of activations.h5.

    Returns:
        size x size RGB PIL image.
    """
    width, height = image.size
    if width <= height:  # the same integer rounding as Preprocess (and torchvision)
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), _FILTERS[interpolation])
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def _progress(items: Iterable, total: int) -> Iterable:
    from tqdm import tqdm

    return tqdm(items, total=total, unit="img", desc="mosaic preview", disable=None, dynamic_ncols=True,
                leave=False)


def _cell_labels(grid: Grid, class_names: Sequence[str] | None) -> list[str | None]:
    """Each cell's top class name (None for every cell when grid.h5 has no attribution)."""
    if grid.top_class is None or grid.top_class.shape[1] == 0:
        return [None] * len(grid)
    top = grid.top_class[:, 0]
    if class_names is None:
        return [f"class {int(c)}" for c in top]
    return [class_names[int(c)] if 0 <= c < len(class_names) else f"class {int(c)}" for c in top]


def _png_fingerprint(path: Path) -> str | None:
    """The `atlas-fingerprint` text chunk of a PNG, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:
            return getattr(image, "text", {}).get(FINGERPRINT_KEY)
    except (OSError, ValueError):
        return None


def _save_png(canvas: np.ndarray, path: Path, fp: str, job: _Job, log: Callable[[str], None], cells: int,
              note: str) -> None:
    """Writes the image atomically with its fingerprint and provenance as PNG text chunks."""
    info = PngInfo()
    info.add_text(FINGERPRINT_KEY, fp)
    info.add_text("atlas-stage", "mosaic")
    info.add_text("atlas-layer", job.layer)
    info.add_text("atlas-grid", str(job.size))
    info.add_text("atlas-version", __version__)
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG", pnginfo=info)
    log(f"mosaic: wrote {path} ({cells} cells, {canvas.shape[1]}x{canvas.shape[0]} px{note})")
