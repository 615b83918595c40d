"""atlas: activation atlases and feature visualisation for PyTorch vision models.

The public API (everything below is importable as `from atlas import NAME`):

Runs and stages (files in a run directory; see README for their format):
    load_config(source, overrides=())   a Config from a TOML file or a run directory
    Run(run_dir) / Run.open(run_dir)    a run's artifacts: activations(), layout(), grid(map, N),
                                        maps(), icons(...), atlas_image(map, N); refuses stale ones
    run_stages(config, stages=...)      every stage in order (what `atlas run` does)
    run_collect, run_layout, run_grid, run_render, run_mosaic, run_view   one stage each

In-memory cores (arrays in, arrays out, no files):
    load_model(name, weights)           efficientnet_lite0, torchvision names, package.module:factory
    resolve_maps(model, shapes, layers) -> {layer: LayerMap}: how outputs read as (C, H, W) maps
                                        (channels first, channels last, ViT tokens)
    collect_activations(model, images, layers, ...)   -> Samples (acts, image, yx, attr, pred)
    layout_2d(acts, ...)                -> (xy in [0, 1], info)
    place_samples(fit_acts, fit_xy, new_acts, ...)    -> positions of new samples on a layout
    bin_grid(xy, acts, attr, size, ...) -> Grid (cells, counts, directions, members, top classes)
    render_icons(model, layer, directions, ...)       -> IconBatch (images, objective, cosine)
    compose_atlas(icons, cells, size, ...)            -> the atlas image
    paste(image, patch, Placement(corner, size))      -> the image with a patch in one corner
    try_patches(predict, images, patches, placements, target)  -> Outcome (top-1, P(B)) per trial
    flip_counts(before, after, attacked, target, placement)    -> flips per patch, rates, P(B)

Readers and experiments over a run: compare_runs (`atlas compare`), patch_attack (`atlas attack`).

Readers over a run:
    compare_runs(runs, ...)             layers (or runs) side by side with figures (`atlas compare`)
    place_images(run, images)           -> PlaceSummary: new images' samples on every map (`atlas place`)

Names are loaded on first use, so `import atlas` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AtlasError": "atlas.errors",
    "Config": "atlas.config", "CollectConfig": "atlas.config", "LayoutConfig": "atlas.config",
    "GridConfig": "atlas.config", "RenderConfig": "atlas.config", "MosaicConfig": "atlas.config",
    "load_config": "atlas.config",
    "Run": "atlas.store", "Activations": "atlas.store", "Layout": "atlas.store", "MapLayout": "atlas.store",
    "Grid": "atlas.store", "GridSet": "atlas.store", "IconSet": "atlas.store",
    "run_stages": "atlas.pipeline", "run_collect": "atlas.pipeline", "run_layout": "atlas.pipeline",
    "run_grid": "atlas.pipeline", "run_render": "atlas.pipeline", "run_mosaic": "atlas.pipeline",
    "run_view": "atlas.pipeline",
    "load_model": "atlas.models", "LoadedModel": "atlas.models", "Preprocess": "atlas.models",
    "LayerMap": "atlas.layer_maps", "resolve_maps": "atlas.layer_maps",
    "collect_activations": "atlas.collect", "Samples": "atlas.collect",
    "layout_2d": "atlas.layout", "place_samples": "atlas.placement",
    "bin_grid": "atlas.grid", "bin_grids": "atlas.grid",
    "render_icons": "atlas.render", "IconBatch": "atlas.render",
    "compose_atlas": "atlas.mosaic",
    "compare_runs": "atlas.compare",
    "place_images": "atlas.place", "PlaceSummary": "atlas.place",
    "patch_attack": "atlas.attack", "paste": "atlas.attack", "try_patches": "atlas.attack",
    "flip_counts": "atlas.attack", "Placement": "atlas.attack",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'atlas' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
