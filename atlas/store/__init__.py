"""The run store: the only code that knows a run directory's files, their HDF5 keys, and whether
an artifact is current.

A run directory holds:

    config.toml                  the effective config (atlas.config)
    activations.h5               collect: samples, their images and positions, attribution
    layout.h5                    layout: every map's 2-D positions
    grid.h5                      grid: every map's cells per grid size
    <map>/icons-<N>/             render: an icon per cell, icons.json
    <map>/atlas-<N>.png          mosaic: the atlas (and atlas-preview-<N>.png, -labels variants)
    <map>/inspect/, patches/     readers' outputs; receptive-field.json (cached)
    <map>/place/                 atlas place: <image>-<N>.png (markers on the atlas), <image>.json
    <map>/attack/                atlas attack: attack-<N>.png and .json
    compare-<N>.png              atlas compare

`<map>` is a layer, or a focus map `<layer>/class-<slug>` or `<layer>/pair-<a>-<b>`. Every
stage and reader opens its inputs through `Run`, which refuses (one line, naming the command to
run) what is missing or stale; see `atlas.store.run` for the rule.
"""

from .activations import Activations, ActivationsWriter, Images, LayerSamples
from .images import FINGERPRINT_KEY, ICONS_JSON, IconSet, icon_file, png_fingerprint, write_image, write_json
from .maps import Grid, GridFile, GridSet, Layout, MapLayout, MapPlacement, maps_from_json, maps_to_json
from .run import Run

__all__ = ["Activations", "ActivationsWriter", "FINGERPRINT_KEY", "Grid", "GridFile", "GridSet", "ICONS_JSON",
           "IconSet", "Images", "LayerSamples", "Layout", "MapLayout", "MapPlacement", "Run", "icon_file", "maps_from_json",
           "maps_to_json", "png_fingerprint", "write_image", "write_json"]
