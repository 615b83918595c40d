"""Drawing: fonts and text, fitting tiles, cutting image patches, and the inspect panel.

Every picture atlas makes (the atlas mosaic and its labels, the preview, inspect and patches
panels, the compare figure, the classic views) draws with these helpers, on PIL images or
(H, W, 3) uint8 arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TILE_PX = 112  # side of one patch tile in a panel
CAPTION_PX = 28  # caption band under a tile (two lines)
HEADER_LINE_PX = 16
MARGIN = 8


# ---------------------------------------------------------------------------------------------
# Text


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
# Tiles and patches


def fit_tile(tile: np.ndarray, side: int) -> np.ndarray:
    """An RGB uint8 tile resized to side x side (Lanczos: icons are mostly shrunk)."""
    tile = np.asarray(tile)
    if tile.ndim == 2:
        tile = np.repeat(tile[:, :, None], 3, axis=2)
    tile = tile[:, :, :3]
    if tile.shape[:2] == (side, side):
        return tile
    return np.asarray(Image.fromarray(tile.astype(np.uint8)).resize((side, side), Image.Resampling.LANCZOS))


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


def cut_patch(pixels: Image.Image, box: Sequence[float], tile_px: int = TILE_PX,
              mark: Sequence[float] | None = None) -> np.ndarray:
    """A window of the network input as a uint8 tile, white where the window leaves the image.

    `mark` (left, top, right, bottom in input pixels), when given, is outlined in red: the map
    position's own stride cell, since a deep layer's field can span the whole image.
    """
    patch, mask = window_patch(pixels, box, tile_px)
    patch[~mask] = 255
    tile = np.clip(np.rint(patch), 0, 255).astype(np.uint8)
    if mark is not None:
        left, top, right, bottom = (float(v) for v in box)
        sx, sy = tile_px / max(right - left, 1e-9), tile_px / max(bottom - top, 1e-9)
        outline = [(mark[0] - left) * sx, (mark[1] - top) * sy, (mark[2] - left) * sx - 1, (mark[3] - top) * sy - 1]
        image = Image.fromarray(tile)
        ImageDraw.Draw(image).rectangle(outline, outline=(255, 0, 0))
        tile = np.asarray(image)
    return tile


def square_inside(boxes: np.ndarray, size: int) -> np.ndarray:
    """Square boxes (left, top, right, bottom) shrunk to at most the input's side and moved inside it.

    What a field covers beyond the image is padding; a deep layer's field can be wider than the
    whole input (Lite0's blocks.15), and showing it whole would shrink the image to a corner of
    its tile. Boxes already inside the input are unchanged.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    side = np.minimum(boxes[:, 2] - boxes[:, 0], size)
    out = np.empty_like(boxes)
    for axis in (0, 1):
        centre = (boxes[:, axis] + boxes[:, axis + 2]) / 2
        out[:, axis] = np.clip(centre - side / 2, 0, size - side)
        out[:, axis + 2] = out[:, axis] + side
    return out


# ---------------------------------------------------------------------------------------------
# Panels: a header, an icon and captioned tiles


def panel_boxes(n_tiles: int, has_icon: bool, header_lines: int, tile_px: int = TILE_PX
                ) -> tuple[tuple[int, int], tuple[int, int, int, int] | None, list[tuple[int, int, int, int]]]:
    """Geometry of a panel: (height, width), the icon's box and each tile's box (left, top, right, bottom).

    The header spans the top; the icon (2 x 2 tiles) is on the left; the tiles are 3 to a row.
    """
    top = MARGIN + header_lines * HEADER_LINE_PX + MARGIN
    icon_side = 2 * tile_px
    left = MARGIN + (icon_side + MARGIN if has_icon else 0)
    icon = (MARGIN, top, MARGIN + icon_side, top + icon_side) if has_icon else None
    cols = 3
    rows = max(1, -(-n_tiles // cols))
    cell_h = tile_px + CAPTION_PX
    tiles = [(left + (i % cols) * (tile_px + MARGIN), top + (i // cols) * cell_h,
              left + (i % cols) * (tile_px + MARGIN) + tile_px, top + (i // cols) * cell_h + tile_px)
             for i in range(n_tiles)]
    width = left + cols * (tile_px + MARGIN)
    height = top + max(rows * cell_h, icon_side + CAPTION_PX if has_icon else 0) + MARGIN
    return (height, width), icon, tiles


def compose_panel(header: Sequence[str], icon: np.ndarray | None, tiles: Sequence[np.ndarray | None],
                  captions: Sequence[str], tile_px: int = TILE_PX) -> np.ndarray:
    """Draws the panel: header lines, the icon (scaled to 2 x 2 tiles), the tiles with captions.

    Args:
        header: text lines at the top.
        icon: (h, w, 3) uint8 or None.
        tiles: (tile_px, tile_px, 3) uint8 each, or None for a blank (unreadable) tile.
        captions: one per tile.

    Returns:
        (H, W, 3) uint8 on white (geometry from `panel_boxes`).
    """
    (height, width), icon_box, boxes = panel_boxes(len(tiles), icon is not None, len(header), tile_px)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    face = font(12)
    measure = lambda s: draw.textlength(s, font=face)  # noqa: E731
    for k, line in enumerate(header):
        draw.text((MARGIN, MARGIN + k * HEADER_LINE_PX), wrap_label(line, measure, width - 2 * MARGIN, 1)[0]
                  if line else "", fill="black", font=face)
    if icon is not None and icon_box is not None:
        side = icon_box[2] - icon_box[0]
        canvas.paste(Image.fromarray(np.asarray(icon, np.uint8)).convert("RGB").resize((side, side),
                     Image.Resampling.NEAREST), icon_box[:2])
        draw.text((icon_box[0], icon_box[3] + 2), "icon", fill="black", font=face)
    for tile, caption, box in zip(tiles, captions, boxes):
        if tile is not None:
            canvas.paste(Image.fromarray(np.asarray(tile, np.uint8)), box[:2])
        else:
            draw.rectangle(box, outline="gray")
        for k, line in enumerate(wrap_label(caption, measure, tile_px, 2)):
            draw.text((box[0], box[3] + 1 + k * 13), line, fill="black", font=face)
    return np.asarray(canvas)


# ---------------------------------------------------------------------------------------------
# Markers


def layout_pixels(xy: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Pixel positions (x, y down) on a picture of a whole map, shape (H, W, ...), of layout
    positions in [0, 1] (y up), as the mosaic lays out grid cells."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    return np.column_stack([xy[:, 0] * shape[1], (1 - xy[:, 1]) * shape[0]])


def draw_markers(canvas: np.ndarray, points: np.ndarray, radius: int | None = None,
                 fill: tuple[int, int, int] = (230, 20, 60), labels: Sequence[str] | None = None) -> np.ndarray:
    """Round markers (filled, white ring) at pixel positions on a copy of an RGB picture.

    Args:
        canvas: (H, W, 3) uint8.
        points: (n, 2) float (x, y) pixel positions, y downwards.
        radius: marker radius in pixels; default about 1/120 of the picture's side, at least 3.
        fill: the markers' colour.
        labels: n short texts written in white inside the markers (None: none).

    Returns:
        (H, W, 3) uint8, the picture with the markers.
    """
    image = Image.fromarray(np.asarray(canvas, np.uint8)).convert("RGB")
    r = radius or max(3, round(max(image.size) / 120))
    pen = ImageDraw.Draw(image)
    face = font(max(8, round(1.4 * r))) if labels is not None else None
    for k, (x, y) in enumerate(np.asarray(points, np.float64).reshape(-1, 2)):
        pen.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=(255, 255, 255), width=max(1, r // 3))
        if labels is not None:
            pen.text((x, y), labels[k], fill=(255, 255, 255), font=face, anchor="mm")
    return np.asarray(image)
