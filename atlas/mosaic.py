"""Mosaic stage: the atlas image of each grid, from the rendered icons or, as a preview, from image patches.

Reads the run's current grids, icons, activations and images (atlas.store); writes per map (each
layer, and each focus map `<layer>/class-<slug>`, `<layer>/pair-<a>-<b>` of atlas.focus):
- `atlas-<N>.png` for each grid size N the map's icons are rendered at: one icon per kept cell;
- `atlas-preview-<N>.png` for each N (when `mosaic.preview`): each cell shown by the mean of the
  image patches around its members' positions (atlas.preview); needs no optimisation;
- `atlas-<N>-labels.png`, `atlas-preview-<N>-labels.png` (when `mosaic.labels`): the same image
  with each cell's top class printed on it. A separate file, so the plain atlas stays unmarked
  for zooming and the two can be flipped between (they have the same geometry).

Geometry: the canvas is white, N * px square, px = `mosaic.icon_px` (0 = `render.icon_size`, or
64 when icon sizes are automatic and differ by layer; icons are resized to px);
cell (x, y) of the grid covers columns [x * px, (x + 1) * px) and rows [(N - 1 - y) * px, ...), so
y grows upwards as in the layout. Empty cells stay white. With `mosaic.scale_by_density` a cell's
icon is drawn smaller and centred (see `cell_scale`).

Each PNG carries its fingerprint (everything that decides its pixels; atlas.store.fingerprints)
and provenance in text chunks; an image whose fingerprint matches is skipped. Icons that are out
of date for the current grid are refused (run render), never drawn.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .config import Config
from .errors import AtlasError
from .draw import fit_tile, font, text_height, wrap_label
from .focus import MapSpec
from .preview import preview_tiles
from .store import Grid, GridFile, IconSet, Run
from .store import fingerprints as fp


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
        canvas[top:top + side, left:left + side] = fit_tile(tile, side)
    return canvas


def draw_labels(canvas: np.ndarray, cells: np.ndarray, size: int, icon_px: int, labels: Sequence[str | None],
                min_px: int = fp.LABEL_MIN_PX) -> np.ndarray:
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


def compose_atlas(icons: Sequence[np.ndarray | None], cells: np.ndarray, size: int, *, icon_px: int | None = None,
                  counts: np.ndarray | None = None, density_floor: float = 0.3,
                  labels: Sequence[str | None] | None = None) -> np.ndarray:
    """The atlas image of one grid: each cell's icon at its place, in memory.

    Args:
        icons: m RGB uint8 (S, S, 3) icons (e.g. `render_icons(...).images`), None for none.
        cells: (m, 2) int (x, y) cells of the N x N grid (a Grid's `cell`), y growing upwards.
        size: N.
        icon_px: pixels per cell; default the first icon's side.
        counts: (m,) samples per cell: icons are then drawn smaller in sparse cells (`cell_scale`);
            default None (every icon fills its cell).
        density_floor: with counts, the side of a nearly empty cell's icon; default 0.3.
        labels: m texts printed at the bottom of their cells (e.g. top classes); default none.

    Returns:
        (N * icon_px, N * icon_px, 3) uint8 on white; row N - 1 - y, column x holds cell (x, y).
    """
    if icon_px is None:
        icon_px = next((int(np.asarray(i).shape[0]) for i in icons if i is not None), 64)
    scale = cell_scale(counts, density_floor) if counts is not None else None
    canvas = compose_mosaic(icons, cells, size, icon_px, scale)
    return draw_labels(canvas, cells, size, icon_px, labels) if labels is not None else canvas


# ---------------------------------------------------------------------------------------------
# Stage


@dataclasses.dataclass
class MosaicSummary:
    """What a mosaic run did."""

    written: list[Path]  # images written
    skipped: list[Path]  # images already up to date
    missing_icons: int  # kept cells drawn white because their icon was unreadable
    skipped_images: int  # source images the preview could not read
    seconds: float


@dataclasses.dataclass
class _Job:
    """One image to (maybe) write: its path, fingerprint and how to make its tiles."""

    spec: MapSpec  # the map: a layer or a focus map
    grid: Grid
    kind: str  # "atlas" or "preview"
    path: Path
    fingerprint: str
    labels_path: Path | None  # the labelled copy, when mosaic.labels and the grid has labels
    icons: IconSet | None = None
    plain: bool = True  # the plain image needs drawing
    labelled: bool = False  # the labelled copy needs drawing


def run(config: Config, *, force: bool = False, log: Callable[[str], None] = print) -> MosaicSummary:
    """Runs the mosaic stage: the current grids (+ icons, + images for the preview) -> RUN/<map>/atlas-*.png.

    Args:
        config: the run's config (`config.mosaic`, `config.render`, `config.grid.sizes`,
            `config.images`, `config.run_dir`).
        force: redraw images that are up to date.
        log: receives one line per image written or skipped, and one overall.

    Raises:
        AtlasError: grid.h5 missing, incomplete or stale; icons out of date for their grid;
            activations.h5 or the images folder missing when a preview is asked for.
    """
    t0 = time.perf_counter()
    mc = config.mosaic
    store = Run(config.run_dir, config)
    grid_fp = store.grid_fingerprint("mosaic")
    grid_file = store.grid_file("mosaic")
    px = fp.tile_px(config)
    jobs = _plan(store, grid_file, grid_fp, log)
    if not jobs:
        log(f"mosaic: nothing to draw: no rendered icons under {store.root} (run `atlas render {store.root}` "
            "first) and mosaic.preview = false")
    summary = MosaicSummary([], [], 0, 0, 0.0)
    todo = []
    for job in jobs:
        job.plain = force or not store.picture_is_current(job.path, job.fingerprint)
        job.labelled = job.labels_path is not None and (
            force or not store.picture_is_current(job.labels_path, fp.labels_png_fingerprint(job.fingerprint)))
        if job.plain or job.labelled:
            todo.append(job)
        else:
            summary.skipped.extend(p for p in (job.path, job.labels_path) if p is not None)
            log(f"mosaic: up to date, skipped {job.path}" + (" (and its labels)" if job.labels_path else ""))

    previews = [j for j in todo if j.kind == "preview"]
    preview_of: dict[int, list[np.ndarray | None]] = {}
    if previews:
        if not config.images.is_dir():
            raise AtlasError(f"images folder {config.images} does not exist, and the preview is made of its images; "
                             "--set images=DIR, or set mosaic.preview = false")
        with store.activations("mosaic") as acts:
            tiles, summary.skipped_images = preview_tiles(
                acts, lambda i: store.source_image(acts, i), [(j.spec.layer, j.grid) for j in previews], px=px,
                members=mc.preview_members, patch=mc.preview_patch, max_pixels=config.collect.max_image_pixels,
                log=log)
        preview_of = {id(j): t for j, t in zip(previews, tiles)}
    for job in todo:
        grid = job.grid
        if job.kind == "atlas":
            tiles, missing = _icon_tiles(job.icons, grid)
            summary.missing_icons += missing
        else:
            tiles, missing = preview_of[id(job)], 0
        scale = cell_scale(grid.count, mc.density_floor) if mc.scale_by_density else None
        canvas = compose_mosaic(tiles, grid.cell, grid.size, px, scale)
        if job.plain:
            note = f", {missing} icon(s) unreadable (left white)" if missing else ""
            _save(store, canvas, job.path, job.fingerprint, job, log, note)
            summary.written.append(job.path)
        if job.labelled:
            labelled = draw_labels(canvas, grid.cell, grid.size, px, _cell_labels(grid, grid_file.class_names))
            _save(store, labelled, job.labels_path, fp.labels_png_fingerprint(job.fingerprint), job, log, "")
            summary.written.append(job.labels_path)
    summary.seconds = time.perf_counter() - t0
    log(f"mosaic: wrote {len(summary.written)} image(s), {len(summary.skipped)} up to date, "
        f"in {summary.seconds:.1f} s")
    return summary


def _plan(store: Run, grid_file: GridFile, grid_fp: str, log: Callable[[str], None]) -> list[_Job]:
    """Every image this config asks for, with the fingerprint of what decides its pixels: the atlas
    at each size the map's icons are rendered at (once they are), the preview at every size."""
    config = store.config
    mc = config.mosaic
    jobs = []
    unlabelled = False
    for spec in grid_file.specs:
        name = spec.name
        rendered = set(config.render.sizes_of(name, config.grid.sizes))
        for size in config.grid.sizes:
            grid = grid_file.grid(name, size)
            labels = mc.labels and grid.top_class is not None
            unlabelled |= mc.labels and not labels
            if size in rendered:
                icons = store.icons(spec, grid, upto="mosaic")  # refuses icons made for another grid
                if icons is not None:
                    jobs.append(_Job(spec, grid, "atlas", store.atlas_png(name, size),
                                     store.atlas_png_fingerprint(spec, grid, grid_fp, icons),
                                     store.atlas_png(name, size, labels=True) if labels else None, icons))
                elif store.atlas_png(name, size).is_file():
                    log(f"mosaic: {name} has no icons at {size}x{size} yet, so its old {store.atlas_png(name, size).name} "
                        f"is out of date and not redrawn (run `atlas render {store.root}`)")
            if mc.preview:
                jobs.append(_Job(spec, grid, "preview", store.preview_png(name, size),
                                 store.preview_png_fingerprint(spec, grid, grid_fp),
                                 store.preview_png(name, size, labels=True) if labels else None))
    if unlabelled:
        log(f"mosaic: {store.grid_path.name} has no class labels (collect.attribution = false); no labelled images")
    return jobs


def _icon_tiles(icons: IconSet | None, grid: Grid) -> tuple[list[np.ndarray | None], int]:
    """Each kept cell's icon (None where it cannot be read) and the number of such cells."""
    tiles: list[np.ndarray | None] = [None] * len(grid)
    if icons is not None:
        for i, (x, y) in enumerate(grid.cell.tolist()):
            tiles[i] = icons.read(x, y)
    return tiles, sum(t is None for t in tiles)


def _cell_labels(grid: Grid, class_names: Sequence[str] | None) -> list[str | None]:
    """Each cell's top class name (None for every cell when the grid has no attribution)."""
    if grid.top_class is None or grid.top_class.shape[1] == 0:
        return [None] * len(grid)
    top = grid.top_class[:, 0]
    if class_names is None:
        return [f"class {int(c)}" for c in top]
    return [class_names[int(c)] if 0 <= c < len(class_names) else f"class {int(c)}" for c in top]


def _save(store: Run, canvas: np.ndarray, path: Path, fingerprint: str, job: _Job, log: Callable[[str], None],
          note: str) -> None:
    """Writes the image atomically with its fingerprint and provenance as PNG text chunks."""
    store.write_picture(canvas, path, fingerprint, stage="mosaic", layer=job.spec.name, grid=str(job.grid.size))
    log(f"mosaic: wrote {path} ({len(job.grid)} cells, {canvas.shape[1]}x{canvas.shape[0]} px{note})")
