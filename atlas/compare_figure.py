"""The compare figure: one titled, captioned panel per atlas, with the shared-neighbour fraction
between consecutive panels (see atlas.compare for what the figures mean)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .draw import draw_markers, fit_square, font, layout_pixels, text_height, wrap_label

PANEL_PX = 480  # side every panel's atlas image is scaled to
GUTTER_PX = 132  # band between two panels: their shared-neighbour fraction, and image-centroid distances
MARGIN = 16
COLUMNS = 4  # panels per row before the figure wraps to the next row
TITLE_PX = 30  # band above a panel's image for its title
TEXT_FONT_PX = 15
LINE_PX = 20  # caption line spacing
CAPTION_LINES = 6
HEADER_MAX_LINES = 4  # the header is wrapped to the figure's width, then cut


# ---------------------------------------------------------------------------------------------
# Panels


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
    previous_layer: str | None = None  # the layer before this one in its run's config (None: the first)
    aligned_to: str | None = None  # with layout.align, the layer this map was moved onto ("" the first); None: not
    centroid_distance_independent: float = math.nan  # median image-centroid distance to previous_layer's
    # map between the layouts before alignment (layout.h5); NaN for the first layer


def number(value: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def panel_caption(p: PanelFigures) -> list[str]:
    """The CAPTION_LINES lines of figures printed under a panel."""
    source = "icons" if p.kind == "icons" else "preview (image patches; no icons yet)"
    shape = f", {p.map_hw[0]}x{p.map_hw[1]} map" if p.map_hw else ""
    kept = 100 * p.samples_kept / max(p.samples, 1)
    share = (number(p.mean_top_class_share) if math.isfinite(p.mean_top_class_share)
             else "n/a (collected without attribution)")
    trust = number(p.trustworthiness) if math.isfinite(p.trustworthiness) else "not measured"
    return [f"{source}: {Path(p.image).name}",
            f"{p.channels} channels{shape}, {p.samples} samples",
            f"cells kept: {p.cells_kept} of {p.grid}x{p.grid} ({kept:.0f}% of samples)",
            f"layout trustworthiness: {trust}",
            f"mean top-class share: {share}",
            _layout_line(p)]


def _layout_line(p: PanelFigures) -> str:
    if p.aligned_to is None:
        return "layout: independent of the other layers"
    if not p.aligned_to:
        return "layout: aligned (the first layer: the others follow it)"
    return f"layout: aligned to {p.aligned_to} (rotation or mirror, shift)"


@dataclasses.dataclass
class CentroidLink:
    """How far the same images lie apart on two consecutive panels: the median over images of the
    distance between the centroids of an image's samples, in [0, 1] map units."""

    distance: float  # as drawn
    chance: float  # the same with the images of the second panel shuffled (unrelated maps)
    unaligned: float  # before alignment (layout.h5), when the second panel is the next layer of the same
    # run and both are aligned; NaN otherwise


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


def compose_figure(header: Sequence[str], titles: Sequence[str], images: Sequence[np.ndarray],
                   captions: Sequence[Sequence[str]], links: Sequence[float],
                   distances: Sequence[CentroidLink] | None = None,
                   markers: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Draws the comparison: header lines, then each panel's title, image and caption, with the
    shared-neighbour fraction to the previous panel in the gutter before it.

    Args:
        header: lines across the top, wrapped to the figure's width (at most HEADER_MAX_LINES in all).
        titles, images, captions: per panel: a title, an RGB uint8 (h, w, 3) image (scaled to
            PANEL_PX by `fit_square`) and up to CAPTION_LINES lines.
        links: P - 1 fractions, links[i] between panels i and i + 1 (NaN shows as "n/a").
        distances: P - 1 image-centroid distances, between panels i and i + 1, shown under the arrow
            (None: none).
        markers: per panel, (K, 2) layout positions in [0, 1] (y up; NaN: not drawn) of K followed
            images, drawn as numbered markers in FOLLOW_COLOURS, marker k the same image on every panel.

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
        shown = fit_square(picture, PANEL_PX)
        if markers is not None:
            shown = _follow_markers(shown, markers[p])
        canvas.paste(Image.fromarray(shown), (left, top))
        draw.rectangle((left - 1, top - 1, right, bottom), outline=(200, 200, 200))
        for k, line in enumerate(lines[:CAPTION_LINES]):
            draw.text((left, bottom + 6 + k * LINE_PX), _fit_line(draw, line, text, PANEL_PX), fill=(40, 40, 40),
                      font=text)
        if gutters[p] is not None and p - 1 < len(links):
            _draw_link(draw, gutters[p], links[p - 1], text, big,
                       distances[p - 1] if distances is not None else None)
    return np.asarray(canvas)


FOLLOW_COLOURS = ((230, 20, 60), (20, 110, 230), (250, 170, 0), (20, 160, 80), (150, 40, 200), (0, 190, 200),
                  (120, 70, 20), (255, 100, 200))


def _follow_markers(panel: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Numbered markers at layout positions on a PANEL_PX square panel image."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    for k, point in enumerate(xy):
        if np.isfinite(point).all():
            panel = draw_markers(panel, layout_pixels(point[None], panel.shape[:2]), radius=11,
                                 fill=FOLLOW_COLOURS[k % len(FOLLOW_COLOURS)], labels=[str(k + 1)])
    return panel


def _fit_line(draw: ImageDraw.ImageDraw, line: str, font: Any, width: int) -> str:
    lines = wrap_label(line, lambda s: draw.textlength(s, font=font), width, max_lines=1)
    return lines[0] if lines else ""


def _draw_link(draw: ImageDraw.ImageDraw, box: Box, value: float, text: Any, big: Any,
               distances: CentroidLink | None = None) -> None:
    """The gutter between two panels: "shared / neighbours", the fraction, and an arrow to the right;
    under it, with `distances`, the median image-centroid distance, its chance level and before alignment."""
    left, top, right, bottom = box
    mid_x, mid_y = (left + right) // 2, (top + bottom) // 2
    shown = number(value, 2)
    rows = [("shared", text, mid_y - 2 * LINE_PX - 8), ("neighbours", text, mid_y - LINE_PX - 8),
            (shown, big, mid_y + 2)]
    for line, face, y in rows:
        draw.text((mid_x - draw.textlength(line, font=face) / 2, y), line, fill="black", font=face)
    y = mid_y + 8 + text_height(big) + 6  # an arrow drawn, not a glyph: the default font may lack one
    draw.line((left + 14, y, right - 18, y), fill="black", width=2)
    draw.polygon([(right - 10, y), (right - 20, y - 6), (right - 20, y + 6)], fill="black")
    if distances is None:
        return
    rows = ["centroids apart", number(distances.distance, 2), f"chance {number(distances.chance, 2)}"]
    if math.isfinite(distances.unaligned):
        rows.append(f"unaligned {number(distances.unaligned, 2)}")
    for k, line in enumerate(rows):
        draw.text((mid_x - draw.textlength(line, font=text) / 2, y + 14 + k * LINE_PX), line, fill=(40, 40, 40),
                  font=text)


