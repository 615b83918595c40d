"""activations.h5: every sampled activation of a run, its image, position and attribution.

Schema (documented for users in README):
- `/images/path` (n_images,) str (relative to `images`, sorted), `/images/label` int32 (-1 if
  unknown), `/images/pred` int32 (top-1, -1 if not computed), `/images/status` str (`ok` or why
  the image was skipped), `/images/stat` (n_images, 2) int64 (file size, modification time in
  ns at collect; -1 where the file could not be read).
- `/classes/name`, `/classes/wnid` (n_classes,) str, for models with known classes.
- `/layers/<layer>/acts` (n, C) float16/float32, `image` (n,) int32, `yx` (n, 2) int16, and with
  attribution `attr` (n, n_classes) float16; all chunked and growable along the first axis.
- file attrs: provenance, `model`, `weights`, `seed`, `layers`, `layer_shapes` (each layer's (C, H, W)
  map), `layer_maps` (how each layer's output was read as that map), `preprocess`,
  `n_classes`, `package_version`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..artifacts import atomic_path
from ..errors import AtlasError
from .maps import read_classes, write_classes
from .provenance import mark_complete, write_provenance

SAMPLE_ARRAYS = ("acts", "image", "yx", "attr")
CHUNK_BYTES = 1 << 20  # growable datasets are chunked in about 1 MiB pieces


@dataclasses.dataclass(frozen=True)
class Images:
    """The images of a run, row i = image index i."""

    path: np.ndarray  # (n_images,) str, relative to the config's `images`
    label: np.ndarray  # (n_images,) int32, -1 if unknown
    pred: np.ndarray  # (n_images,) int32 top-1 prediction, -1 if not computed
    status: np.ndarray  # (n_images,) str, "ok" or why the image was skipped
    stat: np.ndarray | None = None  # (n_images, 2) int64 file size and modification time (ns) at collect

    def __len__(self) -> int:
        return len(self.path)


class LayerSamples:
    """One layer's samples in an open activations.h5. `acts` and `attr` are read lazily (h5py
    datasets: index them, or read them in blocks with atlas.blocks); `image` and `yx` on first use."""

    def __init__(self, group: h5py.Group, name: str, shape: Sequence[int] | None):
        self.name = name
        self.acts = group["acts"]  # (n, C) float16/float32
        self.attr = group["attr"] if "attr" in group else None  # (n, n_classes) float16, or None
        self.shape = tuple(int(v) for v in shape) if shape else None  # (C, H, W) of the layer's map
        self._group = group
        self._image: np.ndarray | None = None
        self._yx: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.acts)

    @property
    def channels(self) -> int:
        return int(self.acts.shape[1])

    @property
    def image(self) -> np.ndarray:
        """(n,) int32 image index of each sample."""
        if self._image is None:
            self._image = self._group["image"][()]
        return self._image

    @property
    def yx(self) -> np.ndarray:
        """(n, 2) int16 (row, column) of each sample in the layer's map."""
        if self._yx is None:
            self._yx = self._group["yx"][()]
        return self._yx


class Activations:
    """An open activations.h5 (use as a context manager, or call `close`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise AtlasError(f"cannot read {self.path} ({exc}); run `atlas collect` again") from None
        attrs = self._h5.attrs
        self.fingerprint = str(attrs.get("fingerprint", ""))
        self.complete = bool(attrs.get("complete", False))
        self.layers: list[str] = json.loads(attrs.get("layers", "[]"))
        self.layer_shapes: dict[str, list[int]] = json.loads(attrs.get("layer_shapes", "{}"))
        # layer -> {"layout", "prefix", "grid"} (atlas.layer_maps.LayerMap); absent before layouts: all "nchw"
        self.layer_maps: dict[str, dict[str, Any]] = json.loads(attrs.get("layer_maps", "{}"))
        self.preprocess: dict[str, Any] | None = json.loads(attrs["preprocess"]) if "preprocess" in attrs else None
        self.model = str(attrs.get("model", ""))
        self.n_classes = int(attrs.get("n_classes", 0))
        self.class_names, self.class_wnids = read_classes(self._h5)
        self._images: Images | None = None

    def __enter__(self) -> "Activations":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._h5.close()

    @property
    def images(self) -> Images:
        if self._images is None:
            group = self._h5["images"]
            n = len(group["path"])
            self._images = Images(group["path"].asstr()[()], group["label"][()],
                                  group["pred"][()] if "pred" in group else np.full(n, -1, np.int32),
                                  group["status"].asstr()[()] if "status" in group else np.full(n, "ok"),
                                  group["stat"][()] if "stat" in group else None)
        return self._images

    def has_layer(self, layer: str) -> bool:
        return f"layers/{layer}/acts" in self._h5

    def layer(self, layer: str) -> LayerSamples:
        """The samples of one layer; AtlasError when the file has none for it."""
        if not self.has_layer(layer):
            raise AtlasError(f"{self.path} has no layer {layer!r}; run `atlas collect {self.path.parent}`")
        return LayerSamples(self._h5[f"layers/{layer}"], layer, self.layer_shapes.get(layer))


class ActivationsWriter:
    """Writes activations.h5 piece by piece: images and classes, then blocks of samples per layer
    (appended to growable datasets), then `finish` with the predictions, statuses and provenance."""

    def __init__(self, h5: h5py.File):
        self._h5 = h5
        self._datasets: dict[tuple[str, str], h5py.Dataset] = {}
        self.samples: dict[str, int] = {}  # samples written per layer

    def images(self, paths: Sequence[str], labels: Sequence[int], stat: np.ndarray | None = None) -> None:
        """The images, in index order: paths, labels and, when known, (size, mtime_ns) per file
        (readers check it before cutting patches, so new pixels never meet old positions)."""
        group = self._h5.create_group("images")
        group.create_dataset("path", data=np.array(list(paths), dtype=object), dtype=h5py.string_dtype())
        group.create_dataset("label", data=np.asarray(labels, dtype=np.int32))
        if stat is not None:
            group.create_dataset("stat", data=np.asarray(stat, dtype=np.int64).reshape(-1, 2))

    def classes(self, names: Sequence[str] | None, wnids: Sequence[str] | None) -> None:
        write_classes(self._h5, names, wnids)

    def append(self, layer: str, key: str, block: np.ndarray) -> None:
        """Appends rows to `/layers/<layer>/<key>` (key: acts, image, yx or attr), creating it."""
        if key not in SAMPLE_ARRAYS:
            raise ValueError(f"unknown sample array {key!r}; one of {SAMPLE_ARRAYS}")
        ds = self._datasets.get((layer, key))
        if ds is None:
            row_bytes = max(1, block.dtype.itemsize * int(np.prod(block.shape[1:], dtype=np.int64)))
            chunk_rows = int(max(1, min(4096, CHUNK_BYTES // row_bytes)))
            self._datasets[(layer, key)] = self._h5.create_dataset(
                f"layers/{layer}/{key}", data=block, maxshape=(None, *block.shape[1:]),
                chunks=(chunk_rows, *block.shape[1:]))
        elif len(block):
            ds.resize(ds.shape[0] + len(block), axis=0)
            ds[-len(block):] = block
        if key == "acts":
            self.samples[layer] = self.samples.get(layer, 0) + len(block)

    def has(self, layer: str, key: str) -> bool:
        return (layer, key) in self._datasets

    def finish(self, pred: np.ndarray, status: Sequence[str], *, fingerprint: str, config: Any,
               **attrs: Any) -> None:
        """Writes the predictions, statuses and provenance (attrs: model, weights, seed, layers,
        layer_shapes, layer_maps, preprocess, n_classes, package_version) and marks the file complete."""
        group = self._h5["images"]
        group.create_dataset("pred", data=np.asarray(pred, dtype=np.int32))
        group.create_dataset("status", data=np.array([str(s) for s in status], dtype=object),
                             dtype=h5py.string_dtype())
        write_provenance(self._h5, stage="collect", fingerprint=fingerprint, config=config, inputs="", **attrs)
        mark_complete(self._h5)


@contextlib.contextmanager
def write_activations(path: str | Path) -> Iterator[ActivationsWriter]:
    """Yields a writer of activations.h5 at `path`; the file appears there only if the block
    succeeds and `finish` was called."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            writer = ActivationsWriter(h5)
            yield writer
            if not bool(h5.attrs.get("complete", False)):
                raise RuntimeError("activations writer closed without finish()")
