"""Toy run directories for tests: artifacts written through the run store exactly as the stages do.

Import from test files as `from toy_runs import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

from atlas.config import Config, GridConfig, LayoutConfig
from atlas.focus import MapSpec
from atlas.store import Grid, Layout, MapLayout, Run
from atlas.store.fingerprints import icons_fingerprint, layout_fingerprint


def toy_clusters(n: int, channels: int, clusters: int, seed: int = 0, spread: float = 0.05
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated non-negative clusters: (n, channels) float32 samples and (n,) int labels."""
    rng = np.random.default_rng(seed)
    centres = rng.random((clusters, channels)) * 2.0
    labels = np.arange(n) % clusters
    acts = centres[labels] + spread * rng.standard_normal((n, channels))
    return np.abs(acts).astype(np.float32), labels


def toy_config(run_dir: Path, layers: tuple[str, ...] = ("blocks.1",), layout: Mapping | None = None,
               grid: Mapping | None = None, **fields) -> Config:
    """A Config for a toy run; `layout` and `grid` override fields of the stage tables, `fields`
    top-level fields (model, preprocess, render, mosaic, ...)."""
    return Config(run_dir=Path(run_dir), images=Path(run_dir) / "images", model=fields.pop("model", "toy"),
                  layers=layers, weights=fields.pop("weights", "none"), layout=LayoutConfig(**(layout or {})),
                  grid=GridConfig(**(grid or {})), **fields)


def write_activations(run_dir: Path, acts: Mapping[str, np.ndarray], attr: Mapping[str, np.ndarray] | None = None,
                      *, n_images: int = 10, class_names: list[str] | None = None, wnids: list[str] | None = None,
                      fingerprint: str = "toy-activations", complete: bool = True, config: Config | None = None,
                      paths: Sequence[str] | None = None, labels: Sequence[int] | None = None,
                      yx: Mapping[str, np.ndarray] | None = None, shapes: Mapping[str, Sequence[int]] | None = None,
                      preprocess: Mapping | None = None) -> Path:
    """Writes RUN/activations.h5 through the store's writer, as the collect stage does; returns its path.

    Args:
        acts: layer -> (n, C) float16/float32 activations.
        attr: layer -> (n, n_classes) attributions (stored as float16), or None.
        n_images: rows of the images; samples are spread over them round-robin.
        class_names, wnids: the classes, when given.
        config: the config recorded as the one it was collected with (default: `toy_config` over
            the layers); a run's readers refuse activations collected with another config.
        paths, labels: the images' paths and labels (default img<i>.jpg, -1).
        yx: layer -> (n, 2) positions (default all (1, 1)); shapes: layer -> (C, H, W) (default (C, 7, 7)).
        preprocess: the recorded preprocessing (the preview and inspect read its size and resize).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = config or toy_config(run_dir, layers=tuple(acts))
    n_classes = len(class_names) if class_names else (next(iter(attr.values())).shape[1] if attr else 0)
    store = Run(run_dir, config)
    with store.write_activations() as out:
        out.images(list(paths) if paths is not None else [f"img{i}.jpg" for i in range(n_images)],
                   list(labels) if labels is not None else [-1] * n_images)
        out.classes(class_names, wnids)
        for layer, a in acts.items():
            n = len(a)
            out.append(layer, "acts", a)
            out.append(layer, "image", (np.arange(n) % n_images).astype(np.int32))
            out.append(layer, "yx", (yx[layer] if yx is not None else np.ones((n, 2))).astype(np.int16))
            if attr is not None:
                out.append(layer, "attr", attr[layer].astype(np.float16))
        layer_shapes = {layer: list(shapes[layer]) if shapes else [a.shape[1], 7, 7] for layer, a in acts.items()}
        extra = {"preprocess": dict(preprocess)} if preprocess is not None else {}
        out.finish(np.full(n_images, -1, np.int32), ["ok"] * n_images, fingerprint=fingerprint, config=config,
                   model=config.model, weights=config.weights, seed=0, layers=list(acts), layer_shapes=layer_shapes,
                   n_classes=n_classes, **extra)
    path = store.activations_path
    if not complete:
        with h5py.File(path, "a") as h5:  # as a collect killed while assembling would leave it
            h5.attrs["complete"] = False
    return path


def write_layout(config: Config, xy: Mapping[str, np.ndarray], info: Mapping[str, Mapping] | None = None) -> Path:
    """Writes RUN/layout.h5 for given positions (and per map extra `info`, e.g. trustworthiness),
    fingerprinted as the layout stage would for `config`."""
    store = Run(config.run_dir, config)
    acts_fp = store.activations_fingerprint()
    maps = {name: MapLayout(np.asarray(v, np.float32), {"n_samples": len(v), **(info or {}).get(name, {})})
            for name, v in xy.items()}
    return store.write_layout(Layout(maps, layout_fingerprint(config, acts_fp), acts_fp, config,
                                     [MapSpec(name, name) for name in xy]))


def write_icons(config: Config, name: str, grid: Grid, colours: Mapping[tuple[int, int], Sequence[int]],
                px: int = 8, layer: str | None = None) -> Path:
    """Writes a finished icons folder for a map's grid, fingerprinted as render would for `config`:
    a solid icon of the given colour per listed cell."""
    store = Run(config.run_dir, config)
    cells = [tuple(c) for c in grid.cell.tolist() if tuple(c) in colours]
    images = np.stack([np.full((px, px, 3), colours[c], np.uint8) for c in cells]) if cells else \
        np.zeros((0, px, px, 3), np.uint8)
    entries = [{"cell": list(c), "file": f"cell-{c[0]}-{c[1]}.png", "objective": 1.0, "cosine": 0.5,
                "member_cosine": 0.4} for c in cells]
    meta = {"layer": layer or name, "map": name, "size": grid.size, "icon_size": px,
            "fingerprint": icons_fingerprint(config, grid, MapSpec(name, layer or name)), "grid_fingerprint": grid.digest(),
            "icons": entries}
    return store.write_icons(name, grid.size, images, entries, meta).folder


def record_sample_reads(monkeypatch) -> list[int]:
    """Records the rows of every read of a layer's `acts` or `attr` in any activations.h5 from now
    on (monkeypatches h5py.Dataset.__getitem__); returns the list the row counts are appended to."""
    reads: list[int] = []
    original = h5py.Dataset.__getitem__

    def recording(self, key):
        value = original(self, key)
        if self.name.startswith("/layers/") and self.name.rsplit("/", 1)[-1] in ("acts", "attr"):
            reads.append(len(value) if np.ndim(value) else 1)
        return value

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    return reads


def file_attrs(path: Path) -> dict:
    """The file-level attrs of an HDF5 artifact, JSON attrs decoded."""
    with h5py.File(path, "r") as h5:
        out = {}
        for key, value in h5.attrs.items():
            if key in ("config", "layers", "sizes", "layer_shapes"):
                value = json.loads(value)
            out[key] = value.item() if hasattr(value, "item") else value
        return out
