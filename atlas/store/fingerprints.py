"""What each artifact's content depends on, as fingerprints that chain from stage to stage.

An artifact is current when the fingerprint it carries equals the one computed here from the
run's config and the fingerprints of its inputs as they are now. Because each recipe includes the
fingerprints of its inputs, a change anywhere upstream changes every fingerprint downstream of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..artifacts import fingerprint, to_jsonable

if TYPE_CHECKING:
    from ..config import Config
    from ..corpus import ImageRecord
    from ..focus import MapSpec
    from .maps import Grid

LABEL_MIN_PX = 32  # cells narrower than this get no label in the labelled atlas (no font is legible in less)


COLLECT_KEYS = ("samples_per_image", "border", "batch_size", "attribution", "attribution_batch", "predict", "dtype",
                "seed", "max_images", "max_image_pixels")  # the [collect] settings that change activations.h5
# [collect] settings that change activations.h5 only when set: at their defaults they read every
# layer as before they existed, so runs collected earlier stay current.
COLLECT_KEYS_IF_SET = {"layout": "auto", "prefix_tokens": "auto"}


def _collect_values(table: Any) -> dict[str, Any]:
    out = {key: table.get(key) for key in COLLECT_KEYS}
    out.update({key: table[key] for key, default in COLLECT_KEYS_IF_SET.items()
                if table.get(key, default) != default})
    return out


def collect_settings(table: Any) -> dict[str, Any]:
    """The part of a config (a Config or its JSON table) that decides activations.h5 besides the
    images themselves: model, weights, preprocessing overrides, layers and COLLECT_KEYS, as
    dotted key -> JSON value."""
    table = to_jsonable(table)
    out = {key: table.get(key) for key in ("model", "weights", "preprocess", "layers")}
    out.update({f"collect.{key}": value for key, value in _collect_values(table.get("collect", {})).items()})
    return out


def setting(settings: dict[str, Any], key: str) -> Any:
    """A value of `collect_settings`, with the default of a key left out at its default."""
    default = COLLECT_KEYS_IF_SET.get(key.removeprefix("collect."))
    return settings.get(key, default)


def image_stats(records: Sequence[ImageRecord]) -> np.ndarray:
    """(n, 2) int64 size and modification time (ns) of each image file; -1, -1 where unreadable."""
    out = np.full((len(records), 2), -1, np.int64)
    for i, r in enumerate(records):
        try:
            st = r.path.stat()
            out[i] = st.st_size, st.st_mtime_ns
        except OSError:
            pass
    return out


def collect_fingerprint(config: Config, preprocess: Any, records: Sequence[ImageRecord], stats: np.ndarray) -> str:
    """Everything that decides the content of activations.h5: the model and its preprocessing, the
    layers, the [collect] settings that change samples (COLLECT_KEYS), and each image's path, size
    and mtime (`image_stats`; not workers, threads or device)."""
    c = config.collect
    images = [(r.relpath, int(size), int(mtime)) for r, (size, mtime) in zip(records, stats)]
    return fingerprint("collect", config.model, config.weights, preprocess, config.layers,
                       *_collect_values(to_jsonable(c)).values(), images)


# [layout] settings left out of its fingerprint: where the layout is computed, not what it is (as
# collect leaves out its device).
LAYOUT_KEYS_IGNORED = ("device",)
# [layout] settings that change layout.h5 only when set: at their defaults they lay out as before
# they existed, so runs laid out earlier stay current.
LAYOUT_KEYS_IF_SET = {"backend": "umap-learn", "align": False}


def layout_fingerprint(config: Config, activations: str) -> str:
    """layout.h5: the [layout] config (less LAYOUT_KEYS_IGNORED, and LAYOUT_KEYS_IF_SET at their
    defaults), the layers and the activations it lays out."""
    table = to_jsonable(config.layout)
    for key in LAYOUT_KEYS_IGNORED:
        del table[key]
    for key, default in LAYOUT_KEYS_IF_SET.items():
        if table[key] == default:
            del table[key]
    return fingerprint("layout", table, config.layers, activations)


def grid_fingerprint(config: Config, layout: str, activations: str) -> str:
    """grid.h5: the [grid] config, the layout and the activations it bins."""
    return fingerprint("grid", config.grid, layout, activations)


def icons_fingerprint(config: Config, grid: Grid, spec: MapSpec) -> str:
    """One map's icons at one grid size: the [render] settings that shape this map's icons (less
    which sizes are rendered, other maps' icon sizes and `compile`, which changes speed only), the
    grid's cells and directions (`Grid.digest`), the layer, the model and its preprocessing."""
    r = config.render
    # the map's own icon size stands in for the whole table, so tuning one map redoes only its icons
    settings = dataclasses.replace(r, sizes=(), sizes_for={}, icon_size_for={}, icon_size=r.icon_size_of(spec.name),
                                   compile=False)
    return fingerprint("render", settings, grid.digest(), spec.layer, config.model, config.weights,
                       config.preprocess)


AUTO_TILE_PX = 64  # pixels per cell of the atlas images when icon sizes are automatic (they differ by layer)


def tile_px(config: Config) -> int:
    """Pixels per cell in the atlas images: `mosaic.icon_px`, else a fixed `render.icon_size`, else
    AUTO_TILE_PX, so every map's atlas and preview share one geometry whatever its icons' size."""
    return config.mosaic.icon_px or config.render.icon_size or AUTO_TILE_PX


def _drawing(config: Config) -> dict[str, Any]:
    mc = config.mosaic
    return {"px": tile_px(config), "scale_by_density": mc.scale_by_density,
            "density_floor": mc.density_floor if mc.scale_by_density else None}


def atlas_png_fingerprint(config: Config, name: str, size: int, grid: str, icons: str) -> str:
    """atlas-N.png of a map: how it is drawn, the grid file and the icons it shows."""
    return fingerprint("mosaic", name, size, _drawing(config), grid, icons)


def preview_png_fingerprint(config: Config, name: str, size: int, grid: str) -> str:
    """atlas-preview-N.png of a map: how it is drawn, which members and images, and the grid file
    (whose fingerprint chains the activations' positions)."""
    mc = config.mosaic
    preview = {"members": mc.preview_members, "patch": mc.preview_patch, "images": str(config.images),
               "max_image_pixels": config.collect.max_image_pixels, "version": 1}
    return fingerprint("mosaic-preview", name, size, _drawing(config), preview, grid)


def labels_png_fingerprint(image: str) -> str:
    """The labelled copy of an atlas image: the image's fingerprint and how labels are drawn."""
    return fingerprint("mosaic-labels", image, {"min_px": LABEL_MIN_PX, "version": 1})


def view_fingerprint(config: Config, grid: str, icons: dict[str, str | None], assets: str, settings: Any) -> str:
    """RUN/viewer: the grid file, each (map, size)'s icons (None: preview tiles), the images, the
    preview settings, the viewer's own settings and files (`assets`, a hash of them)."""
    mc = config.mosaic
    preview = {"members": mc.preview_members, "patch": mc.preview_patch, "px": tile_px(config),
               "images": str(config.images), "max_image_pixels": config.collect.max_image_pixels}
    return fingerprint("view", grid, icons, preview, settings, assets)
