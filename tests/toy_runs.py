"""Toy run directories for tests: activations.h5 (and layout.h5) written exactly as the stages do.

Import from test files as `from toy_runs import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from atlas.artifacts import write_provenance
from atlas.config import Config, GridConfig, LayoutConfig
from atlas.layout import ACTIVATIONS_NAME, LAYOUT_NAME, LayerLayout, Layout, layout_fingerprint


def toy_clusters(n: int, channels: int, clusters: int, seed: int = 0, spread: float = 0.05
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated non-negative clusters: (n, channels) float32 samples and (n,) int labels."""
    rng = np.random.default_rng(seed)
    centres = rng.random((clusters, channels)) * 2.0
    labels = np.arange(n) % clusters
    acts = centres[labels] + spread * rng.standard_normal((n, channels))
    return np.abs(acts).astype(np.float32), labels


def toy_config(run_dir: Path, layers: tuple[str, ...] = ("blocks.1",), layout: Mapping | None = None,
               grid: Mapping | None = None) -> Config:
    """A Config for a toy run; `layout` and `grid` override fields of the stage tables."""
    config = Config(run_dir=Path(run_dir), images=Path(run_dir) / "images", model="toy", layers=layers,
                    weights="none", layout=LayoutConfig(**(layout or {})), grid=GridConfig(**(grid or {})))
    config.validate()
    return config


def write_activations(run_dir: Path, acts: Mapping[str, np.ndarray], attr: Mapping[str, np.ndarray] | None = None,
                      *, n_images: int = 10, class_names: list[str] | None = None, wnids: list[str] | None = None,
                      fingerprint: str = "toy-activations", complete: bool = True) -> Path:
    """Writes RUN/activations.h5 in the collect stage's format; returns its path.

    Args:
        acts: layer -> (n, C) float16/float32 activations.
        attr: layer -> (n, n_classes) attributions (stored as float16), or None.
        n_images: rows of /images; samples are spread over them round-robin.
        class_names, wnids: /classes/name and /classes/wnid, when given.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ACTIVATIONS_NAME
    str_dt = h5py.string_dtype()
    n_classes = len(class_names) if class_names else (next(iter(attr.values())).shape[1] if attr else 0)
    with h5py.File(path, "w") as h5:
        images = h5.create_group("images")
        images.create_dataset("path", data=np.array([f"img{i}.jpg" for i in range(n_images)], dtype=object),
                              dtype=str_dt)
        images.create_dataset("label", data=np.full(n_images, -1, np.int32))
        images.create_dataset("pred", data=np.full(n_images, -1, np.int32))
        images.create_dataset("status", data=np.array(["ok"] * n_images, dtype=object), dtype=str_dt)
        if class_names is not None:
            h5.create_dataset("classes/name", data=np.array(class_names, dtype=object), dtype=str_dt)
        if wnids is not None:
            h5.create_dataset("classes/wnid", data=np.array(wnids, dtype=object), dtype=str_dt)
        shapes = {}
        for layer, a in acts.items():
            n, c = a.shape
            group = h5.create_group(f"layers/{layer}")
            group.create_dataset("acts", data=a, maxshape=(None, c), chunks=(max(1, min(n, 4096)), c))
            group.create_dataset("image", data=(np.arange(n) % n_images).astype(np.int32))
            group.create_dataset("yx", data=np.ones((n, 2), np.int16))
            if attr is not None:
                group.create_dataset("attr", data=attr[layer].astype(np.float16))
            shapes[layer] = [c, 7, 7]
        write_provenance(h5, stage="collect", fingerprint_=fingerprint, config={"toy": True}, inputs="",
                         model="toy", weights="none", seed=0, layers=list(acts), layer_shapes=shapes,
                         n_classes=n_classes)
        h5.attrs["complete"] = complete
    return path


def write_layout(config: Config, xy: Mapping[str, np.ndarray]) -> Path:
    """Writes RUN/layout.h5 for given positions, fingerprinted as the layout stage would for `config`."""
    with h5py.File(config.run_dir / ACTIVATIONS_NAME, "r") as h5:
        acts_fp = str(h5.attrs["fingerprint"])
    layers = {name: LayerLayout(np.asarray(v, np.float32), {"n_samples": len(v)}) for name, v in xy.items()}
    path = config.run_dir / LAYOUT_NAME
    Layout(layers, layout_fingerprint(config, acts_fp), acts_fp, dataclasses.asdict(config.layout)).save(path)
    return path


def file_attrs(path: Path) -> dict:
    """The file-level attrs of an HDF5 artifact, JSON attrs decoded."""
    with h5py.File(path, "r") as h5:
        out = {}
        for key, value in h5.attrs.items():
            if key in ("config", "layers", "sizes", "layer_shapes"):
                value = json.loads(value)
            out[key] = value.item() if hasattr(value, "item") else value
        return out
