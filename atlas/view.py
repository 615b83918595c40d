"""View stage: RUN/viewer/, the interactive atlas that opens straight from disk.

Reads the run's current grids, icons, activations and images (atlas.store); writes a folder with
the viewer's page and scripts (package data, atlas/viewer/) and its data:

- per map and grid size, a sprite sheet of every kept cell's tile (its icon, or where that size has
  no icons its preview tile: the mean of its most typical members' patches), and a script with the
  cells, counts, top classes, label mix, icon cosines, the 9 members most aligned with each cell's
  direction, each cell's distinct images (for the side-by-side linked hover) and the cells' mean
  attribution to every class (int8 with a scale, for the class filter);
- sheets of member patches, each member cut to the receptive field of its map position, shared by
  every cell that shows it.

Data are classic scripts calling `ATLAS.run(...)` / `ATLAS.grid(...)`, because Chromium lets a page
opened from file:// load scripts and images but not fetch files or load ES modules. The folder is
written under a temporary name and swapped in; its fingerprint (`view_fingerprint`) covers the
grids, the icons, the preview and patch settings and the viewer's own files, so it is rebuilt only
when one of them changes. `serve` puts it on a local HTTP server.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.server
import importlib.resources
import json
import math
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .config import Config
from .errors import AtlasError
from .focus import MapSpec
from .inspect import label_mix, sample_patches
from .preview import member_cosine, preview_tiles, rank_members
from .store import Activations, Grid, GridFile, IconSet, Run
from .store import fingerprints as fp

VIEWER_VERSION = 2  # bump when the data written here changes shape
ASSETS = ("index.html", "viewer.js", "viewer.css")  # the page, shipped as package data in atlas/viewer/
MEMBERS = 9  # members shown per cell (as `atlas inspect`)
PATCH_PX = 64  # side of a member patch in the sheets
PATCH_COLS = 16  # patches per sheet row; a sheet holds PATCH_COLS ** 2
TILE_QUALITY = 88  # JPEG quality of the sprite sheets
PATCH_QUALITY = 80  # JPEG quality of the patch sheets (the bulk of the folder)


# ---------------------------------------------------------------------------------------------
# Pure core


def pack_tiles(tiles: Sequence[np.ndarray | None], px: int) -> tuple[np.ndarray, int]:
    """Packs tiles into one sheet, `cols` to a row in order: tile i at column i % cols, row i // cols.

    Args:
        tiles: RGB uint8 tiles of any size (resized to px), None for a blank (white) one.
        px: side of each tile in the sheet.

    Returns:
        (rows * px, cols * px, 3) uint8 sheet and cols = ceil(sqrt(len(tiles))) (at least 1).
    """
    from .draw import fit_tile

    cols = max(1, math.ceil(math.sqrt(len(tiles))))
    rows = max(1, math.ceil(len(tiles) / cols))
    sheet = np.full((rows * px, cols * px, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        if tile is not None:
            r, c = divmod(i, cols)
            sheet[r * px:(r + 1) * px, c * px:(c + 1) * px] = fit_tile(tile, px)
    return sheet, cols


def quantize_attr(attr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(m, n) mean attributions -> int8 values and each class's scale (value * scale[class]).

    Each class (column) gets its own scale, mapping its largest magnitude to 127: the class filter
    compares the cells of one class with each other, and a shared scale would leave a class whose
    attributions are small next to another's with only a few levels.
    """
    attr = np.asarray(attr, np.float64)
    peak = np.abs(attr).max(axis=0, initial=0.0)
    scale = np.where(peak > 0, peak / 127, 1.0)
    return np.clip(np.rint(attr / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def cell_images(grid: Grid, image_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's distinct member images as CSR: (indptr (m + 1,) int64, images (nnz,) int64)."""
    out, indptr = [], [0]
    for i in range(len(grid)):
        distinct = np.unique(image_of[grid.members(i)])
        out.append(distinct)
        indptr.append(indptr[-1] + len(distinct))
    return np.asarray(indptr, np.int64), (np.concatenate(out) if out else np.zeros(0, np.int64)).astype(np.int64)


def b64(array: np.ndarray) -> str:
    """The little-endian bytes of an array as base64 text (how the viewer reads packed arrays)."""
    return base64.b64encode(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()).decode()


# ---------------------------------------------------------------------------------------------
# Stage


@dataclasses.dataclass
class ViewSummary:
    """What a view run did."""

    skipped: bool  # True when the viewer was up to date
    path: Path  # RUN/viewer/index.html
    grids: int  # (map, size) pairs written
    patches: int  # member patches cut
    bytes: int  # size of the viewer folder
    seconds: float


@dataclasses.dataclass
class _Sheet:
    """One (map, size) of the viewer: its grid, where its tiles come from, and its data."""

    spec: MapSpec
    grid: Grid
    icons: IconSet | None
    key: str


def assets_digest() -> str:
    """A hash of the viewer's page and scripts, so a new version of them rebuilds the folder."""
    h = hashlib.sha256()
    for name in ASSETS:
        h.update(_asset(name))
    return h.hexdigest()[:20]


def _asset(name: str) -> bytes:
    return importlib.resources.files("atlas").joinpath("viewer", name).read_bytes()


def view_fingerprint(config: Config, grid_fp: str, sheets: Sequence[_Sheet]) -> str:
    """What the viewer folder depends on (atlas.store.fingerprints.view_fingerprint)."""
    icons = {s.key: s.icons.fingerprint if s.icons is not None else None for s in sheets}
    settings = {"members": MEMBERS, "patch_px": PATCH_PX, "version": VIEWER_VERSION,
                "run": str(config.run_dir)}  # the page names the run (title, inspect command)
    return fp.view_fingerprint(config, grid_fp, icons, assets_digest(), settings)


def run(config: Config, *, force: bool = False, log: Callable[[str], None] = print) -> ViewSummary:
    """Runs the view stage: the current grids and icons (+ images) -> RUN/viewer/, skipped when up to date.

    Args:
        config: the run's config.
        force: rebuild the viewer even when it is up to date.
        log: receives a line per step and a summary.

    Raises:
        AtlasError: grid.h5 missing or stale; icons made for another grid; the images folder missing.
    """
    t0 = time.perf_counter()
    store = Run(config.run_dir, config)
    grid_fp = store.grid_fingerprint("view")
    grid_file = store.grid_file("view")
    sheets = _plan(store, grid_file)
    fingerprint = view_fingerprint(config, grid_fp, sheets)
    index = store.viewer_dir / ASSETS[0]
    if not force and store.viewer_fingerprint() == fingerprint:
        log(f"view: up to date, skipped ({index})")
        return ViewSummary(True, index, 0, 0, _folder_bytes(store.viewer_dir), time.perf_counter() - t0)
    if not config.images.is_dir():
        raise AtlasError(f"images folder {config.images} does not exist, and the viewer shows its images; "
                         "--set images=DIR")

    with store.activations("view") as acts, store.write_viewer(fingerprint) as folder:
        tiles = _tiles(store, acts, sheets, log)
        members = {s.key: _members(acts, s) for s in sheets}
        patch_of, n_patches = _write_patches(store, acts, sheets, members, folder, log)
        for sheet in sheets:
            _write_grid(folder, acts, sheet, tiles[sheet.key], members[sheet.key], patch_of)
        _write_run(folder, store, acts, grid_file, sheets)
        for name in ASSETS:
            (folder / name).write_bytes(_asset(name))
    seconds = time.perf_counter() - t0
    size = _folder_bytes(store.viewer_dir)
    log(f"view: {len(sheets)} grid(s) of {len(grid_file.specs)} map(s), {n_patches} member patches, "
        f"{size / 2**20:.1f} MiB in {seconds:.1f} s; open {index}")
    return ViewSummary(False, index, len(sheets), n_patches, size, seconds)


def _plan(store: Run, grid_file: GridFile) -> list[_Sheet]:
    """Every (map, size) of the run, with its current icons where render makes them (None: the
    preview tiles are shown; an icons folder of a size render no longer makes is ignored, as
    mosaic ignores it)."""
    sheets = []
    for spec in grid_file.specs:
        rendered = set(store.config.render.sizes_of(spec.name, store.config.grid.sizes))
        for size in grid_file.sizes(spec.name):
            grid = grid_file.grid(spec.name, size)
            icons = store.icons(spec, grid, upto="view") if size in rendered else None  # stale ones refused
            sheets.append(_Sheet(spec, grid, icons, f"{_slug(spec.name)}-{size}"))
    return sheets


def _slug(name: str) -> str:
    """A file-name-safe form of a map name (a focus map's "/" becomes "~")."""
    return name.replace("/", "~")


def _tiles(store: Run, acts: Activations, sheets: Sequence[_Sheet], log: Callable[[str], None]
           ) -> dict[str, list[np.ndarray | None]]:
    """Each (map, size)'s tiles in cell order: the icons where rendered, else the preview tiles."""
    out: dict[str, list[np.ndarray | None]] = {}
    previews = [s for s in sheets if s.icons is None]
    config = store.config
    if previews:
        mc = config.mosaic
        tiles, _ = preview_tiles(acts, lambda i: store.source_image(acts, i), [(s.spec.layer, s.grid) for s in previews],
                                 px=fp.tile_px(config), members=mc.preview_members, patch=mc.preview_patch,
                                 max_pixels=config.collect.max_image_pixels, log=log)
        out.update({s.key: t for s, t in zip(previews, tiles)})
    for s in sheets:
        if s.icons is not None:
            out[s.key] = [s.icons.read(x, y) for x, y in s.grid.cell.tolist()]
    return out


def _members(acts: Activations, sheet: _Sheet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The MEMBERS members of each cell most aligned with its direction: CSR (indptr, rows, cosines)."""
    grid = sheet.grid
    cosine = member_cosine(acts.layer(sheet.spec.layer).acts, grid)
    indptr, kept = rank_members(grid.indptr, cosine, MEMBERS)
    return indptr, grid.index[kept], cosine[kept]


def _write_patches(store: Run, acts: Activations, sheets: Sequence[_Sheet],
                   members: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], folder: Path,
                   log: Callable[[str], None]) -> tuple[dict[tuple[str, int], int], int]:
    """Cuts every shown member's receptive-field patch once per (layer, sample) and packs them into
    sheets; returns {(layer, row): patch index, -1 where the image could not be read} and the count."""
    wanted: dict[str, set[int]] = {}
    for s in sheets:
        wanted.setdefault(s.spec.layer, set()).update(int(r) for r in members[s.key][1])
    patch_of: dict[tuple[str, int], int] = {}
    tiles: list[np.ndarray] = []
    for layer, rows in wanted.items():
        rows_sorted = np.array(sorted(rows), np.int64)
        cut, _, _ = sample_patches(store, acts, layer, rows_sorted, log, PATCH_PX)
        for row, tile in zip(rows_sorted, cut):
            patch_of[(layer, int(row))] = len(tiles) if tile is not None else -1
            if tile is not None:
                tiles.append(tile)
    per_sheet = PATCH_COLS * PATCH_COLS
    (folder / "patches").mkdir()
    for k in range(0, len(tiles), per_sheet):
        sheet = np.full((PATCH_COLS * PATCH_PX, PATCH_COLS * PATCH_PX, 3), 255, np.uint8)
        for slot, tile in enumerate(tiles[k:k + per_sheet]):
            r, c = divmod(slot, PATCH_COLS)
            sheet[r * PATCH_PX:(r + 1) * PATCH_PX, c * PATCH_PX:(c + 1) * PATCH_PX] = tile
        used_rows = -(-min(per_sheet, len(tiles) - k) // PATCH_COLS)  # the last sheet is cut to its rows
        Image.fromarray(sheet[:used_rows * PATCH_PX]).save(folder / "patches" / f"{k // per_sheet}.jpg",
                                                          quality=PATCH_QUALITY)
    return patch_of, len(tiles)


def _write_grid(folder: Path, acts: Activations, sheet: _Sheet, tiles: Sequence[np.ndarray | None],
                members: tuple[np.ndarray, np.ndarray, np.ndarray], patch_of: dict[tuple[str, int], int]) -> None:
    """The sprite sheet and the data script of one (map, size)."""
    grid, spec = sheet.grid, sheet.spec
    px = next((t.shape[0] for t in tiles if t is not None), 64)
    picture, cols = pack_tiles(tiles, px)
    (folder / "sprites").mkdir(exist_ok=True)
    Image.fromarray(picture).save(folder / "sprites" / f"{sheet.key}.jpg", quality=TILE_QUALITY)
    samples = acts.layer(spec.layer)
    image_of = samples.image
    labels = acts.images.label
    indptr, rows, cosines = members
    shown = [[[int(image_of[r]), patch_of[(spec.layer, int(r))], round(float(c), 3)]
              for r, c in zip(rows[a:b], cosines[a:b])] for a, b in zip(indptr[:-1], indptr[1:])]
    images_indptr, images = cell_images(grid, image_of)
    dtype = np.uint16 if len(acts.images) < 65536 else np.uint32
    by_cell = {}
    if sheet.icons is not None:
        by_cell = {tuple(e["cell"]): e for e in sheet.icons.entries}
    entries = [by_cell.get((x, y), {}) for x, y in grid.cell.tolist()]
    k = grid.top_class.shape[1] if grid.top_class is not None else 0
    attr, scale = quantize_attr(grid.attr) if grid.attr is not None else (None, None)
    data = {
        "map": spec.name, "size": grid.size, "key": sheet.key, "sprite": f"sprites/{sheet.key}.jpg", "tile": px,
        "cols": cols, "icons": sheet.icons is not None, "cell": grid.cell.ravel().tolist(),
        "count": grid.count.tolist(), "max_count": int(grid.count.max(initial=0)), "k": k,
        "top_class": grid.top_class.ravel().tolist() if k else [],
        "top_attr": [round(float(v), 5) for v in grid.top_attr.ravel()] if k else [],
        "label_mix": [[[c, n] for c, _, n in label_mix(labels[images[a:b]], None)]
                      for a, b in zip(images_indptr[:-1], images_indptr[1:])],
        "cosine": [e.get("cosine") for e in entries], "member_cosine": [e.get("member_cosine") for e in entries],
        "members": shown, "paths": _member_paths(acts, shown), "images": b64(images.astype(dtype)), "images_indptr": images_indptr.tolist(),
        "images_dtype": np.dtype(dtype).name, "attr": b64(attr) if attr is not None else None,
        "attr_scale": [float(f"{v:.4g}") for v in scale] if scale is not None else None, "n_classes": int(grid.attr.shape[1]) if grid.attr is not None else 0,
    }
    _write_script(folder / "data" / f"{sheet.key}.js", "ATLAS.grid", data)


def _member_paths(acts: Activations, shown: list[list[list[Any]]]) -> dict[str, str]:
    """{image index: path} of the members shown: run.js holds no list of every image, which
    would grow with the corpus and load before the first paint."""
    return {str(i): str(acts.images.path[i]) for i in sorted({member[0] for cell in shown for member in cell})}


def _write_run(folder: Path, store: Run, acts: Activations, grid_file: GridFile, sheets: Sequence[_Sheet]) -> None:
    """The run's script: its maps with their grids, class names and images."""
    maps = []
    for spec in grid_file.specs:
        grids = [{"size": s.grid.size, "key": s.key, "cells": len(s.grid), "icons": s.icons is not None}
                 for s in sheets if s.spec.name == spec.name]
        maps.append({"name": spec.name, "layer": spec.layer, "kind": spec.kind, "title": spec.title,
                     "class_names": list(spec.class_names), "grids": grids})
    data = {"version": VIEWER_VERSION, "title": store.root.name, "model": store.config.model,
            "classes": grid_file.class_names, "n_images": len(acts.images), "maps": maps,
            "patch": {"tile": PATCH_PX, "cols": PATCH_COLS, "per_sheet": PATCH_COLS * PATCH_COLS},
            "inspect": f"atlas inspect {shlex.quote(str(store.root))}"}
    _write_script(folder / "data" / "run.js", "ATLAS.run", data)


def _write_script(path: Path, call: str, data: dict[str, Any]) -> None:
    """A classic script that hands `data` to the viewer: `call({...});`. JSON is valid JavaScript;
    ensure_ascii keeps every class name's quotes and non-ASCII characters escaped."""
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"{call}({json.dumps(data, ensure_ascii=True, separators=(',', ':'))});\n")


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


# ---------------------------------------------------------------------------------------------
# Serving


def serve(run_dir: str | Path, port: int = 8000, log: Callable[[str], None] = print) -> None:
    """Serves RUN/viewer/ on http://127.0.0.1:PORT/ until interrupted (the page also works from disk)."""
    store = Run.open(run_dir)
    folder = store.viewer_dir
    if not (folder / ASSETS[0]).is_file():
        raise AtlasError(f"{folder} has no viewer yet; run `atlas view {store.root}` first")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            pass

    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Quiet)
    except OSError as exc:
        raise AtlasError(f"cannot serve on port {port} ({exc.strerror}); pick another with --port") from None
    log(f"view: serving {folder} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C to stop)")
    with server:
        server.serve_forever()
