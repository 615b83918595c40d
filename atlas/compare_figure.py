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

from .draw import fit_square, font, text_height, wrap_label

PANEL_PX = 480  # side every panel's atlas image is scaled to
GUTTER_PX = 104  # band between two panels that shows their shared-neighbour fraction
MARGIN = 16
COLUMNS = 4  # panels per row before the figure wraps to the next row
TITLE_PX = 30  # band above a panel's image for its title
TEXT_FONT_PX = 15
LINE_PX = 20  # caption line spacing
CAPTION_LINES = 5
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
    shown = number(value, 2)
    rows = [("shared", text, mid_y - 2 * LINE_PX - 8), ("neighbours", text, mid_y - LINE_PX - 8),
            (shown, big, mid_y + 2)]
    for line, face, y in rows:
        draw.text((mid_x - draw.textlength(line, font=face) / 2, y), line, fill="black", font=face)
    y = mid_y + 8 + text_height(big) + 6  # an arrow drawn, not a glyph: the default font may lack one
    draw.line((left + 14, y, right - 18, y), fill="black", width=2)
    draw.polygon([(right - 10, y), (right - 20, y - 6), (right - 20, y + 6)], fill="black")


