"""Looking inside one cell of an atlas, and at the dataset patches that drive one channel.

`atlas inspect RUN --layer L --grid N --cell I J` (I = column x, J = row y, as in grid.h5's
`cell`) prints the cell's sample count, its top classes by mean attribution, the label mix of its
member images and its icon's path, and writes `RUN/<layer>/inspect/cell-N-I-J.png` (the icon, if
rendered, beside the receptive-field patches (the map position's own stride cell outlined in red) of the 9 members most aligned (cosine) with the
cell's direction, each captioned with its image's class; a header with the top classes) and
`cell-N-I-J.json` (the same facts). `--class NAME` instead of `--cell` lists the 5 cells of grid N
with the largest mean attribution to that class and writes the panel of the first.

`atlas patches RUN --layer L --channel K` writes `RUN/<layer>/patches/channel-K.png`: the 9
samples of activations.h5 with the largest activation of channel K, cut from their source images
to the receptive field of their map position.

Receptive fields are measured on the model (`atlas.receptive`) and cached in
`RUN/<layer>/receptive-field.json`; when the model cannot be loaded, the mosaic preview's
two-stride window is used instead and the output says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image, ImageDraw

from .artifacts import atomic_path
from .config import Config, load_config
from .corpus import BadImage, load_image
from .errors import AtlasError
from .focus import find_class, read_maps
from .grid import GRID_NAME, Grid, load_class_names, load_grid, top_classes
from .layout import open_activations
from .mosaic import font, input_pixels, patch_box, window_patch, wrap_label
from .receptive import ReceptiveField, box_for, receptive_field

TILE_PX = 112  # side of one patch tile in the panel
CAPTION_PX = 28  # caption band under a tile (two lines)
HEADER_LINE_PX = 16
MARGIN = 8
N_PATCHES = 9


# ---------------------------------------------------------------------------------------------
# Pure core


def class_name(c: int, class_names: Sequence[str] | None) -> str:
    """Name of class c ("class c" when unknown, "unlabelled" for -1)."""
    if c < 0:
        return "unlabelled"
    if class_names is not None and c < len(class_names):
        return str(class_names[c])
    return f"class {c}"


def top_classes_text(attr_row: np.ndarray, class_names: Sequence[str] | None, k: int = 5
                     ) -> list[tuple[int, str, float]]:
    """The k classes with the largest mean attribution of one cell: (class, name, value), largest first."""
    cls, val = top_classes(np.asarray(attr_row, np.float32).reshape(1, -1), k)
    return [(int(c), class_name(int(c), class_names), float(v)) for c, v in zip(cls[0], val[0])]


def label_mix(labels: np.ndarray, class_names: Sequence[str] | None, k: int = 5
              ) -> list[tuple[int, str, int]]:
    """The k most frequent labels: (label, name, count), most frequent first, ties by label.

    Args:
        labels: (n,) int labels, one per member image (-1 = unlabelled).
    """
    counts = Counter(int(v) for v in np.asarray(labels).ravel())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [(c, class_name(c, class_names), n) for c, n in ranked]


def pick_aligned_members(members: np.ndarray, acts: np.ndarray, direction: np.ndarray, k: int = N_PATCHES
                         ) -> tuple[np.ndarray, np.ndarray]:
    """The k members whose activation is most aligned (cosine) with the direction, best first.

    Args:
        members: (n,) sample rows.
        acts: (n, C) their activations.
        direction: (C,) the cell's direction.

    Returns:
        (k',) rows and (k',) their cosines, k' = min(k, n); ties keep the earlier member.
    """
    acts = np.asarray(acts, np.float32)
    d = np.asarray(direction, np.float32)
    cos = acts @ d / np.maximum(np.linalg.norm(acts, axis=1) * np.linalg.norm(d), 1e-12)
    order = np.lexsort((np.arange(len(cos)), -cos.astype(np.float64)))[:k]
    return np.asarray(members)[order], cos[order]


def nearest_kept_cell(cells: np.ndarray, x: int, y: int) -> tuple[int, int]:
    """The kept cell (x, y) closest to (x, y) (Euclidean; ties: the first in grid order)."""
    d = (cells[:, 0].astype(np.int64) - x) ** 2 + (cells[:, 1].astype(np.int64) - y) ** 2
    i = int(np.argmin(d))
    return int(cells[i, 0]), int(cells[i, 1])


def cells_for_class(attr: np.ndarray, c: int, k: int = 5) -> np.ndarray:
    """Indices of the k cells with the largest mean attribution to class c, largest first."""
    values = np.asarray(attr)[:, c].astype(np.float64)
    return np.lexsort((np.arange(len(values)), -values))[:k]


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


# ---------------------------------------------------------------------------------------------
# I/O


@dataclasses.dataclass
class _Run:
    config: Config
    layer: str
    acts_path: Path
    class_names: list[str] | None
    wnids: list[str] | None
    map: str = ""  # the map shown: the layer, or one of its focus maps (`<layer>/class-<slug>`, ...)

    def __post_init__(self) -> None:
        self.map = self.map or self.layer


def _open_run(run: str | Path, layer: str) -> _Run:
    """Opens a run for one layer, or for one focus map given by name (then `layer` is its layer)."""
    if not Path(run).is_dir():
        raise AtlasError(f"run directory {run} not found; pass the run_dir of a config that `atlas run` has built")
    config = load_config(run)
    name = layer
    if layer not in config.layers:
        maps = _focus_maps(config.run_dir / GRID_NAME)
        if layer not in maps:
            known = list(config.layers) + list(maps)
            close = difflib.get_close_matches(layer, known, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise AtlasError(f"unknown layer {layer!r} for run {config.run_dir}; {hint}the run has "
                             f"{', '.join(known)}")
        layer = maps[layer]
    acts_path, _ = open_activations(config.run_dir)
    names = wnids = None
    with h5py.File(acts_path, "r") as h5:
        if f"layers/{layer}/acts" not in h5:
            raise AtlasError(f"layer {layer!r} is missing from {acts_path}; run `atlas collect {config.run_dir}` again")
        if "classes/name" in h5:
            names = list(h5["classes/name"].asstr()[()])
        if "classes/wnid" in h5:
            wnids = list(h5["classes/wnid"].asstr()[()])
    return _Run(config, layer, acts_path, names, wnids, name)


def _focus_maps(grid_path: Path) -> dict[str, str]:
    """{focus map name: its layer} of a run's grid.h5 (empty without one)."""
    if not grid_path.is_file():
        return {}
    with h5py.File(grid_path, "r") as h5:
        return {m.name: m.layer for m in read_maps(h5) if m.kind != "layer"}


def _open_grid(run: _Run, size: int) -> Grid:
    path = run.config.run_dir / GRID_NAME
    if not path.is_file():
        raise AtlasError(f"{path} not found; run `atlas grid {run.config.run_dir}` first")
    grid = load_grid(path, run.map, size)
    names = load_class_names(path)
    if names is not None:
        run.class_names = names
    return grid


def layer_receptive_field(run: _Run, log=print) -> tuple[ReceptiveField | None, dict[str, Any]]:
    """The layer's receptive field (cached in RUN/<layer>/receptive-field.json), or None when the
    model cannot be loaded; also the geometry {size, resize, interpolation, map_hw}."""
    with h5py.File(run.acts_path, "r") as h5:
        preprocess = json.loads(h5.attrs["preprocess"]) if "preprocess" in h5.attrs else {}
        shapes = json.loads(h5.attrs["layer_shapes"]) if "layer_shapes" in h5.attrs else {}
    if run.layer not in shapes:
        raise AtlasError(f"{run.acts_path} lacks the layer_shapes of {run.layer!r}; "
                         f"run `atlas collect {run.config.run_dir} --force`")
    size = int(preprocess.get("size", 0)) or None
    if size is None:
        raise AtlasError(f"{run.acts_path} lacks the preprocess attribute; run `atlas collect {run.config.run_dir} --force`")
    geometry = {"size": size, "resize": int(preprocess.get("resize", size)),
                "interpolation": preprocess.get("interpolation", "bilinear"),
                "map_hw": tuple(int(v) for v in shapes[run.layer][1:3])}
    cache = run.config.run_dir / run.layer / "receptive-field.json"
    key = {"model": run.config.model, "layer": run.layer, "input_size": size}
    if cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return ReceptiveField(**data["field"]), geometry
        except (ValueError, TypeError, KeyError):
            pass
    from .models import load_model

    try:
        model = load_model(run.config.model, "none", run.config.preprocess)
    except AtlasError as exc:
        log(f"note: cannot load model {run.config.model!r} to measure the receptive field ({exc}); "
            "patches are two map strides wide instead")
        return None, geometry
    rf = receptive_field(model.module, run.layer, size)
    with atomic_path(cache) as tmp:
        tmp.write_text(json.dumps({"key": key, "field": dataclasses.asdict(rf)}, indent=1))
    return rf, geometry


def _boxes(rf: ReceptiveField | None, yx: np.ndarray, geometry: dict[str, Any]) -> np.ndarray:
    if rf is None:
        return patch_box(yx, geometry["map_hw"], geometry["size"], 2.0)
    return square_inside(box_for(rf, yx, geometry["size"], clip=False).astype(np.float64), geometry["size"])


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


def _patches(run: _Run, rows: np.ndarray, rf: ReceptiveField | None, geometry: dict[str, Any]
             ) -> tuple[list[np.ndarray | None], list[dict[str, Any]]]:
    """The receptive-field patch of each sample row, and per row its facts (image, path, label, yx, box)."""
    with h5py.File(run.acts_path, "r") as h5:
        group = h5[f"layers/{run.layer}"]
        order = np.argsort(rows)
        image = np.empty(len(rows), np.int64)
        yx = np.empty((len(rows), 2), np.int64)
        image[order] = group["image"][np.asarray(rows)[order]] if len(rows) else []
        yx[order] = group["yx"][np.asarray(rows)[order]] if len(rows) else np.zeros((0, 2))
        paths = h5["images/path"].asstr()[()]
        labels = h5["images/label"][()]
        preds = h5["images/pred"][()] if "images/pred" in h5 else np.full(len(labels), -1)
    boxes = _boxes(rf, yx, geometry)
    marks = patch_box(yx, geometry["map_hw"], geometry["size"], 1.0) if rf is not None else [None] * len(rows)
    tiles: list[np.ndarray | None] = []
    facts = []
    for k, row in enumerate(rows):
        i = int(image[k])
        label = int(labels[i])
        facts.append({"row": int(row), "image": i, "path": str(paths[i]), "label": label,
                      "label_name": class_name(label, run.class_names) if label >= 0 else None,
                      "pred": int(preds[i]), "yx": [int(v) for v in yx[k]],
                      "box": [float(v) for v in boxes[k]]})
        try:
            source = load_image(run.config.images / paths[i], run.config.collect.max_image_pixels)
            pixels = input_pixels(source, geometry["size"], geometry["resize"], geometry["interpolation"])
            tiles.append(cut_patch(pixels, boxes[k], mark=marks[k]))
        except (BadImage, OSError, ValueError):
            tiles.append(None)
    return tiles, facts


def _caption(fact: dict[str, Any], run: _Run, value: str) -> str:
    if fact["label"] >= 0:
        name = fact["label_name"]
    elif fact["pred"] >= 0:
        name = "pred: " + class_name(fact["pred"], run.class_names)
    else:
        name = Path(fact["path"]).stem
    return f"{name} ({value})"


def _write_png(canvas: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")


def inspect_cell(run: _Run, grid: Grid, i: int, log=print) -> dict[str, Any]:
    """Prints the summary of cell i and writes its panel and JSON; returns the facts."""
    x, y = (int(v) for v in grid.cell[i])
    size = grid.size
    members = grid.members(i)
    with h5py.File(run.acts_path, "r") as h5:
        acts = h5[f"layers/{run.layer}/acts"][members].astype(np.float32)
        member_images = h5[f"layers/{run.layer}/image"][members]
        labels = h5["images/label"][()]
    rows, cosines = pick_aligned_members(members, acts, grid.direction[i], N_PATCHES)
    tops = top_classes_text(grid.attr[i], run.class_names) if grid.attr is not None else []
    images = np.unique(member_images)
    mix = label_mix(labels[images], run.class_names)
    icon_path = run.config.run_dir / run.map / f"icons-{size}" / f"cell-{x}-{y}.png"
    icon = None
    if icon_path.is_file():
        try:
            with Image.open(icon_path) as im:
                icon = np.asarray(im.convert("RGB"))
        except OSError:
            icon = None
    rf, geometry = layer_receptive_field(run, log)
    tiles, facts = _patches(run, rows, rf, geometry)
    for fact, c in zip(facts, cosines):
        fact["cosine"] = float(c)
    header = [f"{run.map}  grid {size}  cell ({x}, {y})  {int(grid.count[i])} samples from {len(images)} images",
              "top classes: " + (", ".join(f"{n} {v:.3g}" for _, n, v in tops) if tops else "(no attribution)"),
              "labels: " + ", ".join(f"{n} x{c}" for _, n, c in mix)]
    panel = compose_panel(header, icon, tiles, [_caption(f, run, f"cos {f['cosine']:.2f}") for f in facts])
    out_dir = run.config.run_dir / run.map / "inspect"
    png = out_dir / f"cell-{size}-{x}-{y}.png"
    _write_png(panel, png)
    info = {"layer": run.layer, "map": run.map, "grid": size, "cell": [x, y], "count": int(grid.count[i]), "images": int(len(images)),
            "top_classes": [{"class": c, "name": n, "attribution": v} for c, n, v in tops],
            "label_mix": [{"label": c, "name": n, "images": k} for c, n, k in mix],
            "icon": str(icon_path) if icon is not None else None,
            "receptive_field": dataclasses.asdict(rf) if rf is not None else None,
            "members": facts, "panel": str(png)}
    with atomic_path(out_dir / f"cell-{size}-{x}-{y}.json") as tmp:
        tmp.write_text(json.dumps(info, indent=1))
    log(f"cell ({x}, {y}) of the {size}x{size} grid of {run.map}: {int(grid.count[i])} samples from "
        f"{len(images)} images")
    log("  top classes (mean attribution): " +
        (", ".join(f"{n} {v:.4g}" for _, n, v in tops) if tops else "none (collected without attribution)"))
    log("  label mix (images): " + ", ".join(f"{n} {c}" for _, n, c in mix))
    log(f"  icon: {icon_path if icon is not None else 'not rendered'}")
    log(f"  wrote {png} and {png.with_suffix('.json').name}")
    return info


def cmd_inspect(args: argparse.Namespace) -> None:
    run = _open_run(args.run, args.layer)
    grid = _open_grid(run, args.grid)
    if args.cell is not None:
        x, y = args.cell
        i = grid.find(x, y) if 0 <= x < grid.size and 0 <= y < grid.size else None
        if i is None:
            nx, ny = nearest_kept_cell(grid.cell, x, y)
            why = (f"outside the {grid.size}x{grid.size} grid (columns and rows 0..{grid.size - 1})"
                   if not (0 <= x < grid.size and 0 <= y < grid.size)
                   else f"not kept (fewer than {grid.min_count} samples)")
            raise AtlasError(f"cell ({x}, {y}) is {why}; the nearest kept cell is --cell {nx} {ny}")
    else:
        if grid.attr is None:
            raise AtlasError("this run was collected without attribution, so cells cannot be found by class; "
                             "use --cell I J")
        c = find_class(args.class_name, run.class_names, run.wnids)
        best = cells_for_class(grid.attr, c)
        print(f"cells of the {grid.size}x{grid.size} grid of {run.map} most attributed to "
              f"{class_name(c, run.class_names)!r}:")
        for j in best:
            print(f"  --cell {int(grid.cell[j, 0])} {int(grid.cell[j, 1])}  attribution {float(grid.attr[j, c]):.4g}"
                  f"  ({int(grid.count[j])} samples)")
        i = int(best[0])
    inspect_cell(run, grid, i)


def channel_patches(run: _Run, channel: int, log=print) -> Path:
    """Writes RUN/<layer>/patches/channel-K.png: the 9 samples with the largest activation of channel K."""
    with h5py.File(run.acts_path, "r") as h5:
        ds = h5[f"layers/{run.layer}/acts"]
        n_channels = ds.shape[1]
        if not 0 <= channel < n_channels:
            raise AtlasError(f"channel {channel} is out of range; layer {run.layer!r} has channels 0..{n_channels - 1}")
        values = ds[:, channel].astype(np.float32)
    rows = np.lexsort((np.arange(len(values)), -values.astype(np.float64)))[:N_PATCHES]
    rf, geometry = layer_receptive_field(run, log)
    tiles, facts = _patches(run, rows, rf, geometry)
    header = [f"{run.layer} channel {channel}: top {len(rows)} of {len(values)} samples"]
    panel = compose_panel(header, None, tiles,
                          [_caption(f, run, f"{values[r]:.3g}") for f, r in zip(facts, rows)])
    path = run.config.run_dir / run.layer / "patches" / f"channel-{channel}.png"
    _write_png(panel, path)
    log(f"channel {channel} of {run.layer}: top activations " + ", ".join(f"{values[r]:.3g}" for r in rows))
    log(f"  wrote {path}")
    return path


def cmd_patches(args: argparse.Namespace) -> None:
    channel_patches(_open_run(args.run, args.layer), args.channel)


def add_inspect_parsers(sub: Any) -> None:
    """Adds the `inspect` and `patches` commands to argparse subparsers (`args.view(args)` runs them)."""
    p = sub.add_parser("inspect", help="one atlas cell: its classes, labels, icon and member patches")
    p.add_argument("run", metavar="RUN", help="a run directory")
    p.add_argument("--layer", required=True, help="layer of the run")
    p.add_argument("--grid", type=int, required=True, metavar="N", help="grid size N (of grid.sizes)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--cell", type=int, nargs=2, metavar=("I", "J"), help="column I (x) and row J (y) of the cell")
    what.add_argument("--class", dest="class_name", metavar="NAME",
                      help="list the cells most attributed to this class and inspect the first")
    p.set_defaults(view=cmd_inspect)

    p = sub.add_parser("patches", help="the dataset patches that activate one channel most")
    p.add_argument("run", metavar="RUN", help="a run directory")
    p.add_argument("--layer", required=True, help="layer of the run")
    p.add_argument("--channel", type=int, required=True, metavar="K", help="channel index")
    p.set_defaults(view=cmd_patches)
