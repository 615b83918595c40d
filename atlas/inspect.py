"""Looking inside one cell of an atlas, and at the dataset patches that drive one channel.

`inspect_cell` (`atlas inspect RUN --layer L --grid N --cell I J`; I = column x, J = row y, as in
a Grid's `cell`) prints the cell's sample count, its top classes by mean attribution, the label
mix of its member images and its icon, and writes a panel `RUN/<map>/inspect/cell-N-I-J.png` (the
icon, if rendered, beside the receptive-field patches of the 9 members most aligned
(cosine) with the cell's direction, the map position's own stride cell outlined in red, each
captioned with its image's class; a header with the top classes) and the same facts as JSON.
`inspect_class` (`--class NAME`) lists the 5 cells of grid N most attributed to a class and
inspects the first.

`channel_patches` (`atlas patches RUN --layer L --channel K`) writes
`RUN/<layer>/patches/channel-K.png`: the 9 samples with the largest activation of channel K, cut
from their source images to the receptive field of their map position.

Receptive fields are measured on the model (`atlas.receptive`) and cached in the layer's folder;
when the model cannot be loaded, the mosaic preview's two-stride window is used instead and the
output says so. Everything is read through the run store, so a stale grid, layout or icon folder
is refused (with the stages to run), and so is a source image that changed since collect.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .corpus import BadImage, load_image
from .draw import TILE_PX, compose_panel, cut_patch, patch_box, square_inside
from .errors import AtlasError, unknown_name
from .focus import MapSpec, find_class
from .grid import top_classes
from .layer_maps import maps_from_json
from .models import Preprocess
from .receptive import ReceptiveField, box_for, receptive_field
from .store import Activations, Grid, Run, write_image, write_json

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


# ---------------------------------------------------------------------------------------------
# Receptive fields and patches


def layer_receptive_field(store: Run, acts: Activations, layer: str, log: Callable[[str], None] = print
                          ) -> ReceptiveField | None:
    """The layer's receptive field (cached in the run), or None when the model cannot be loaded."""
    size = _crop(acts).size
    layer_map = maps_from_json(acts.layer_maps, [layer])[layer]
    key = {"model": store.config.model, "layer": layer, "input_size": size,
           **({"map": layer_map.to_json()} if layer_map.layout != "nchw" else {})}
    cached = store.receptive_field(layer, key)
    if cached is not None:
        try:
            return ReceptiveField(**cached)
        except TypeError:
            pass  # a cache of another version: measure again
    from .models import load_model

    try:
        model = load_model(store.config.model, "none", store.config.preprocess)
    except AtlasError as exc:
        log(f"note: cannot load model {store.config.model!r} to measure the receptive field ({exc}); "
            "patches are two map strides wide instead")
        return None
    rf = receptive_field(model.module, layer, size, layer_map)
    store.write_receptive_field(layer, key, dataclasses.asdict(rf))
    return rf


def _crop(acts: Activations) -> Preprocess:
    """The crop that made the network inputs, from the activations' record of it."""
    if acts.preprocess is None:
        raise AtlasError(f"{acts.path} lacks the preprocess attribute; run `atlas collect {acts.path.parent} --force`")
    return Preprocess(**acts.preprocess)


def sample_patches(store: Run, acts: Activations, layer: str, rows: np.ndarray, log: Callable[[str], None] = print,
                   tile_px: int = TILE_PX, mark: bool = True
                   ) -> tuple[list[np.ndarray | None], list[dict[str, Any]], ReceptiveField | None]:
    """The receptive-field patch of each sample row (tile_px square, the map position's own stride
    cell outlined unless `mark` is False; None where the image cannot be read), per row its facts
    (image, path, label, prediction, position, box), and the field used. Each source image is
    decoded once."""
    samples = acts.layer(layer)
    if samples.shape is None:
        raise AtlasError(f"{acts.path} lacks the layer_shapes of {layer!r}; run `atlas collect {store.root} --force`")
    crop = _crop(acts)
    rf = layer_receptive_field(store, acts, layer, log)
    rows = np.asarray(rows, np.int64)
    image, yx = samples.image[rows].astype(np.int64), samples.yx[rows].astype(np.int64)
    if rf is None:
        boxes = patch_box(yx, samples.shape[1:3], crop.size, 2.0)
        marks: Sequence[Any] = [None] * len(rows)
    else:
        boxes = square_inside(box_for(rf, yx, crop.size, clip=False).astype(np.float64), crop.size)
        marks = patch_box(yx, samples.shape[1:3], crop.size, 1.0) if mark else [None] * len(rows)
    images = acts.images
    facts = []
    for k, row in enumerate(rows):
        i = int(image[k])
        label = int(images.label[i])
        facts.append({"row": int(row), "image": i, "path": str(images.path[i]), "label": label,
                      "label_name": class_name(label, acts.class_names) if label >= 0 else None,
                      "pred": int(images.pred[i]), "yx": [int(v) for v in yx[k]],
                      "box": [float(v) for v in boxes[k]]})
    tiles: list[np.ndarray | None] = [None] * len(rows)
    order = np.argsort(image, kind="stable")
    unreadable = 0
    for group in np.split(order, np.flatnonzero(np.diff(image[order])) + 1) if len(order) else []:
        try:
            source = load_image(store.source_image(acts, int(image[group[0]])), store.config.collect.max_image_pixels)
            pixels = crop.crop(source)
        except (BadImage, OSError, ValueError):
            unreadable += 1
            continue  # its tiles stay None: the panel shows an empty frame
        for k in group:
            tiles[k] = cut_patch(pixels, boxes[k], tile_px, mark=marks[k])
    if unreadable:
        if all(t is None for t in tiles):
            raise AtlasError(f"none of the {unreadable} source image(s) could be read under {store.config.images}; "
                             "if the images moved, pass --set images=DIR")
        log(f"note: {unreadable} source image(s) could not be read under {store.config.images}; their patches "
            "are left empty")
    return tiles, facts, rf


def _caption(fact: dict[str, Any], class_names: Sequence[str] | None, value: str) -> str:
    if fact["label"] >= 0:
        name = fact["label_name"]
    elif fact["pred"] >= 0:
        name = "pred: " + class_name(fact["pred"], class_names)
    else:
        name = Path(fact["path"]).stem
    return f"{name} ({value})"


# ---------------------------------------------------------------------------------------------
# The commands


def inspect_cell(store: Run, spec: MapSpec, grid: Grid, i: int, log: Callable[[str], None] = print
                 ) -> dict[str, Any]:
    """Prints the summary of cell i of a map's grid and writes its panel and JSON; returns the facts."""
    x, y = (int(v) for v in grid.cell[i])
    size = grid.size
    members = grid.members(i)
    icons = store.icons(spec, grid, upto="render")
    icon = icons.read(x, y) if icons is not None else None
    with store.activations("grid") as acts:
        samples = acts.layer(spec.layer)
        member_acts = samples.acts[members].astype(np.float32)
        images = np.unique(samples.image[members])
        class_names = acts.class_names
        mix = label_mix(acts.images.label[images], class_names)
        rows, cosines = pick_aligned_members(members, member_acts, grid.direction[i], N_PATCHES)
        tiles, facts, rf = sample_patches(store, acts, spec.layer, rows, log)
    tops = top_classes_text(grid.attr[i], class_names) if grid.attr is not None else []
    for fact, c in zip(facts, cosines):
        fact["cosine"] = float(c)
    header = [f"{spec.name}  grid {size}  cell ({x}, {y})  {int(grid.count[i])} samples from {len(images)} images",
              "top classes: " + (", ".join(f"{n} {v:.3g}" for _, n, v in tops) if tops else "(no attribution)"),
              "labels: " + ", ".join(f"{n} x{c}" for _, n, c in mix)]
    panel = compose_panel(header, icon, tiles, [_caption(f, class_names, f"cos {f['cosine']:.2f}") for f in facts])
    png = store.inspect_path(spec.name, size, x, y)
    write_image(panel, png)
    icon_path = icons.path(x, y) if icons is not None and icon is not None else None
    info = {"layer": spec.layer, "map": spec.name, "grid": size, "cell": [x, y], "count": int(grid.count[i]),
            "images": int(len(images)),
            "top_classes": [{"class": c, "name": n, "attribution": v} for c, n, v in tops],
            "label_mix": [{"label": c, "name": n, "images": k} for c, n, k in mix],
            "icon": str(icon_path) if icon_path is not None else None,
            "receptive_field": dataclasses.asdict(rf) if rf is not None else None,
            "members": facts, "panel": str(png)}
    write_json(info, png.with_suffix(".json"))
    log(f"cell ({x}, {y}) of the {size}x{size} grid of {spec.name}: {int(grid.count[i])} samples from "
        f"{len(images)} images")
    log("  top classes (mean attribution): " +
        (", ".join(f"{n} {v:.4g}" for _, n, v in tops) if tops else "none (collected without attribution)"))
    log("  label mix (images): " + ", ".join(f"{n} {c}" for _, n, c in mix))
    log(f"  icon: {icon_path if icon_path is not None else 'not rendered'}")
    log(f"  wrote {png} and {png.with_suffix('.json').name}")
    return info


def inspect(run: str | Path, layer: str, size: int, *, cell: tuple[int, int] | None = None,
            by_class: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`atlas inspect`: one cell of a map (`layer` is a layer or a focus map) by position or, with
    `by_class`, the cell most attributed to a class (the 5 best are listed). Returns its facts."""
    store = Run.open(run)
    spec = store.find_map(layer)
    grid = store.grid(spec.name, size)
    if cell is not None:
        x, y = cell
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
        grids = store.grid_file()
        c = find_class(str(by_class), grids.class_names, grids.class_wnids)
        best = cells_for_class(grid.attr, c)
        log(f"cells of the {grid.size}x{grid.size} grid of {spec.name} most attributed to "
            f"{class_name(c, grids.class_names)!r}:")
        for j in best:
            log(f"  --cell {int(grid.cell[j, 0])} {int(grid.cell[j, 1])}  attribution {float(grid.attr[j, c]):.4g}"
                f"  ({int(grid.count[j])} samples)")
        i = int(best[0])
    return inspect_cell(store, spec, grid, i, log)


def channel_patches(run: str | Path, layer: str, channel: int, log: Callable[[str], None] = print) -> Path:
    """`atlas patches`: writes RUN/<layer>/patches/channel-K.png, the 9 samples with the largest
    activation of channel K, cut to their receptive fields."""
    store = Run.open(run)
    if layer not in store.config.layers:
        raise unknown_name("layer", layer, list(store.config.layers), f"run {store.root} has")
    with store.activations() as acts:
        samples = acts.layer(layer)
        if not 0 <= channel < samples.channels:
            raise AtlasError(f"channel {channel} is out of range; layer {layer!r} has channels "
                             f"0..{samples.channels - 1}")
        values = samples.acts[:, channel].astype(np.float32)
        rows = np.lexsort((np.arange(len(values)), -values.astype(np.float64)))[:N_PATCHES]
        tiles, facts, _ = sample_patches(store, acts, layer, rows, log)
        class_names = acts.class_names
    header = [f"{layer} channel {channel}: top {len(rows)} of {len(values)} samples"]
    panel = compose_panel(header, None, tiles, [_caption(f, class_names, f"{values[r]:.3g}") for f, r in zip(facts, rows)])
    path = store.patches_path(layer, channel)
    write_image(panel, path)
    log(f"channel {channel} of {layer}: top activations " + ", ".join(f"{values[r]:.3g}" for r in rows))
    log(f"  wrote {path}")
    return path
