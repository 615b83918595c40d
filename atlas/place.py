"""Placing new images on a run's atlases: where an image's samples fall on each map, and which
cells (with their top classes) they land in.

`place_images(run, images)` (`atlas place RUN IMAGE [IMAGE ...]`) reads the run through the store (its
config, activations, layout and grid must be current; a stale one is refused with one line). Each
image goes through the run's model at the run's layers and is sampled as collect samples
(`atlas.collect.load_sampler`, `sample_batch`): an image of the run's corpus (same file under the
config's `images`) gets exactly its own positions; any other image positions drawn for an image
index no corpus image has (`image_index`, from its content, so the same file always gets the same
positions).

Each map's samples are placed by the weighted mean of their nearest fit samples in activation space
(`atlas.placement.place_samples`, after the map's PCA), then taken through the steps the layout
stage took for its own samples (`atlas.layout.map_positions`: normalisation, a two-class view's
attribution axis, the alignment). umap-learn runs are placed the same way (umap-learn's own
`transform` starts from this weighted mean), so there is one code path and nothing pickled.
A class atlas takes the samples whose top class is its class or whose attribution to it reaches
the map's `class_threshold`; a two-class view those of either class.

Writes per image and map `RUN/<map>/place/<stem>-<N>.png` for each grid size N with a current
atlas picture (atlas-N.png, else atlas-preview-N.png) with the samples drawn as markers, and
`RUN/<map>/place/<stem>.json` with the samples' positions and, per grid size, the cells they land
in and those cells' top classes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .blocks import take_rows
from .collect import Samples, load_sampler, sample_batch
from .config import check_device
from .corpus import BadImage, load_image
from .draw import draw_markers
from .errors import AtlasError
from .focus import MapSpec
from .grid import bin_layout
from .inspect import class_name
from .layout import map_positions
from .placement import place_samples
from .runtime import pick_device
from .store import Grid, MapPlacement, Run, write_image, write_json

TOP_CELLS = 3  # cells named per map and grid size in the printed lines (the JSON has them all)
TOP_CLASSES = 3  # top classes named per cell in the printed lines


# ---------------------------------------------------------------------------------------------
# Pure core


def image_index(data: bytes, n_images: int) -> int:
    """The image index that seeds a new image's sample positions (`atlas.collect.image_rng`): one
    no corpus image has (>= n_images), fixed by the file's content, below 2**31 (stored as int32)."""
    return n_images + int.from_bytes(hashlib.sha256(data).digest()[:4], "big") % (2 ** 30)


def map_members(info: dict[str, Any], attr: np.ndarray | None) -> np.ndarray:
    """Which new samples belong to a map: all for a layer's map; for a class atlas those whose top
    class is its class or whose attribution to it reaches `class_threshold`; for a two-class view
    those that belong to either class's atlas.

    Args:
        info: the map's info (`kind`, `classes`, `class_threshold`).
        attr: (n, n_classes) attribution of the new samples (None: the run has none; focus maps
            need it).

    Returns:
        (n,) bool.
    """
    kind = info.get("kind", "layer")
    if kind == "layer":
        raise ValueError("a layer's map takes every sample; no membership to decide")
    if attr is None:
        raise ValueError("focus maps place samples by their attribution")
    attr = np.asarray(attr, np.float32)
    top = attr.argmax(axis=1)
    member = np.zeros(len(attr), bool)
    for c, threshold in zip(info["classes"], np.atleast_1d(info["class_threshold"])):
        member |= (top == c) | (attr[:, c] >= threshold)
    return member


def place_on_map(new_acts: np.ndarray, fit_acts: np.ndarray, kept: MapPlacement, info: dict[str, Any],
                 pair_diff: np.ndarray | None = None, device: str | torch.device = "cpu") -> np.ndarray:
    """Positions of new samples on a map that is already laid out.

    Args:
        new_acts: (n, C) float activations of the new samples at the map's layer.
        fit_acts: (m, C) float activations of the map's fit samples (`kept.fit_rows` of the layer).
        kept: what the layout stage kept (raw fit positions, PCA).
        info: the map's info (`n_neighbors`, `metric`, the normalisation and alignment).
        pair_diff: (n,) attr[b] - attr[a] of the new samples, for a two-class view.
        device: where the nearest fit samples are searched.

    Returns:
        (n, 2) float32 in [0, 1], as the layout stage would have put a fit sample at that raw position.
    """
    if kept.pca_components is not None:
        def project(x: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray((x - kept.pca_mean) @ kept.pca_components, dtype=np.float32)
        new_acts, fit_acts = project(new_acts), project(fit_acts)
    raw = place_samples(fit_acts, kept.fit_raw, new_acts, n_neighbors=int(info["n_neighbors"]),
                        metric=str(info["metric"]), device=device)
    return map_positions(raw, info, pair_diff)


def cells_of(xy: np.ndarray, grid: Grid, class_names: Sequence[str] | None) -> list[dict[str, Any]]:
    """The cells of a grid that samples land in, most samples first (ties: lower cell id).

    Args:
        xy: (n, 2) float positions in [0, 1].
        grid: the map's grid of one size.
        class_names: the run's class names (None: "class k").

    Returns:
        Per cell: `cell` [x, y], `samples` (how many of xy), `kept` (whether the grid kept the cell:
        it may hold fewer than grid.min_count of the run's samples), `count` (the run's samples in
        it, 0 when not kept) and `top_classes` [[name, mean attribution], ...] (empty when not kept).
    """
    size = grid.size
    ids = bin_layout(xy, size)
    kept_ids = grid.cell[:, 1].astype(np.int64) * size + grid.cell[:, 0]
    labels = grid.labels(class_names)
    out = []
    unique, counts = np.unique(ids, return_counts=True)
    for cell_id, count in sorted(zip(unique.tolist(), counts.tolist()), key=lambda t: (-t[1], t[0])):
        i = int(np.searchsorted(kept_ids, cell_id))
        kept = i < len(kept_ids) and kept_ids[i] == cell_id
        out.append({"cell": [cell_id % size, cell_id // size], "samples": int(count), "kept": bool(kept),
                    "count": int(grid.count[i]) if kept else 0,
                    "top_classes": [[name, round(value, 6)] for name, value in labels[i]] if kept else []})
    return out


# ---------------------------------------------------------------------------------------------
# I/O


@dataclasses.dataclass
class PlacedImage:
    """One image placed on every map of a run."""

    path: Path  # as given
    stem: str  # names its files
    corpus_index: int | None  # its index in the run's images, when it is one of them
    prediction: str | None  # the model's top-1 class (name), when the run predicts
    probability: float | None  # its softmax probability
    maps: dict[str, dict[str, Any]]  # map name -> the JSON written for it


@dataclasses.dataclass
class PlaceSummary:
    """What `place` did."""

    images: list[PlacedImage]
    written: list[Path]  # PNGs and JSON files
    seconds: float


def place_images(run: str | Path, images: Sequence[str | Path], *, device: str | None = None,
          log: Callable[[str], None] = print) -> PlaceSummary:
    """Places new images on every map of a run (`atlas place RUN IMAGE [IMAGE ...]`).

    Args:
        run: the run directory.
        images: image files (any format `atlas collect` reads).
        device: where the model runs and neighbours are searched; default the run's collect.device.
        log: receives the lines a user reads.

    Raises:
        AtlasError: a missing run, a stale or missing artifact, an unreadable image, two images
            with one file name.
    """
    t0 = time.perf_counter()
    store = Run.open(run)
    config = store.config
    if not images:
        raise AtlasError("name at least one image to place")
    store.grid_fingerprint("grid")  # refuses missing or stale activations, layout or grid, with one line
    paths = [Path(p) for p in images]
    stems = [p.stem for p in paths]
    twice = sorted({s for s in stems if stems.count(s) > 1})
    if twice:
        raise AtlasError(f"two images are named {twice[0]!r} (their outputs would share a name); rename one")
    pictures = []
    for path in paths:
        try:
            pictures.append(load_image(path, config.collect.max_image_pixels or None))
        except BadImage as exc:
            raise AtlasError(f"cannot read image {path}: {exc.reason}") from None
    layout = store.layout(upto="grid", placement=True)
    grids = store.grid_file("grid")
    lacking = [name for name, m in layout.maps.items() if m.placement is None]
    if lacking:
        raise AtlasError(f"{store.layout_path} keeps no fit samples to place new ones by (made before `atlas place` "
                         f"existed); run `atlas layout {store.root} --force` (same layout, same seed)")
    if device is not None:
        check_device(device, "--device")
    where = pick_device(device or config.collect.device, "--device" if device else "collect.device")

    with store.activations("grid") as acts:
        corpus = _corpus_indices(store, acts.images.path, acts.images.status, paths)
        n_images = len(acts.images)
        indices = np.array([corpus[i] if corpus[i] is not None else image_index(paths[i].read_bytes(), n_images)
                            for i in range(len(paths))], np.int64)
        samples, probability = _sample(config, pictures, indices, where)
        class_names = grids.class_names
        placed = [PlacedImage(path, path.stem, corpus[i], *_prediction(samples, probability, i, class_names), {})
                  for i, path in enumerate(paths)]
        for image in placed:
            where_from = (f"image {image.corpus_index} of the run: its own sample positions"
                          if image.corpus_index is not None else "not an image of the run")
            said = f"top-1 {image.prediction!r} ({100 * image.probability:.0f}%)" if image.prediction else "no prediction"
            per_layer = ", ".join(str(len(samples.acts[layer]) // len(placed)) for layer in config.layers)
            log(f"place: {image.path.name}: {said}; {per_layer} samples at {', '.join(config.layers)} ({where_from})")
        written: list[Path] = []
        fit_cache: dict[tuple[str, str], np.ndarray] = {}
        for spec in grids.specs:
            m = layout.maps[spec.name]
            kept = m.placement
            assert kept is not None
            key = (spec.layer, spec.name if m.rows is not None else spec.layer)
            if key not in fit_cache:
                fit_cache = {key: take_rows(acts.layer(spec.layer).acts, kept.fit_rows)}  # one map's at a time
            attr = samples.attr.get(spec.layer)
            try:
                member = (np.ones(len(samples.acts[spec.layer]), bool) if spec.kind == "layer"
                          else map_members(m.info, attr))
            except ValueError:
                raise AtlasError(f"{spec.name} places samples by their attribution, which this run does not collect; "
                                 "set collect.attribution = true") from None
            new = samples.acts[spec.layer].astype(np.float32)
            diff = None
            if spec.kind == "pair":
                a, b = spec.classes
                diff = attr[:, b].astype(np.float32) - attr[:, a].astype(np.float32)
            xy = np.full((len(new), 2), np.nan, np.float32)
            if member.any():
                xy[member] = place_on_map(new[member], fit_cache[key], kept, m.info,
                                          None if diff is None else diff[member], where)
            per_image = len(new) // len(placed)  # sample_batch takes the same number from every image
            for i, image in enumerate(placed):
                rows = slice(i * per_image, (i + 1) * per_image)
                image.maps[spec.name] = _report(store, spec, grids, image, xy[rows], member[rows],
                                                samples.yx[spec.layer][rows], class_names, log, written)
    seconds = time.perf_counter() - t0
    log(f"place: {len(placed)} image(s) on {len(grids.specs)} map(s) in {seconds:.1f} s; wrote {len(written)} files "
        f"under {store.root}/<map>/place/")
    return PlaceSummary(placed, written, seconds)


def _corpus_indices(store: Run, relpaths: np.ndarray, status: np.ndarray, paths: Sequence[Path]) -> list[int | None]:
    """Each image's index in the run's images when it is one of them (the same file under
    config.images, sampled ok), else None."""
    root = store.config.images.resolve()
    index = {str(p): i for i, p in enumerate(relpaths)}
    out: list[int | None] = []
    for path in paths:
        try:
            rel = path.resolve().relative_to(root).as_posix()
        except ValueError:
            out.append(None)
            continue
        i = index.get(rel)
        out.append(i if i is not None and status[i] == "ok" else None)
    return out


def _sample(config: Any, pictures: Sequence[Image.Image], indices: np.ndarray, device: torch.device
            ) -> tuple[Samples, np.ndarray]:
    """The images' samples at every layer as collect takes them (`sample_batch`; the same number
    from every image at a layer, in image order), and (B,) float32 the softmax probability of each image's top-1 class."""
    c = config.collect
    sampler = load_sampler(config, device)
    pixels = torch.stack([torch.as_tensor(sampler.model.preprocess(p), dtype=torch.float32) for p in pictures])
    parts, top = [], []
    for start in range(0, len(pictures), c.batch_size):
        batch = pixels[start:start + c.batch_size].to(device).contiguous(memory_format=torch.channels_last)
        parts.append(sample_batch(sampler.tap, indices[start:start + c.batch_size], batch, sampler.candidates,
                                  samples_per_image=c.samples_per_image, seed=c.seed, attribution=c.attribution,
                                  attribution_batch=c.attribution_batch, predict=True, dtype=c.dtype))
        with torch.no_grad():  # one more pass for the probabilities: a few images, so not worth threading through
            logits = sampler.tap.run(batch, logits=True).logits
        top.append(logits.float().softmax(dim=1).amax(dim=1).cpu().numpy())
    merged = Samples({}, {}, {}, {}, np.concatenate([p.pred for p in parts]))
    for what in ("acts", "image", "yx", "attr"):
        for layer in getattr(parts[0], what):
            getattr(merged, what)[layer] = np.concatenate([getattr(p, what)[layer] for p in parts])
    return merged, np.concatenate(top)


def _report(store: Run, spec: MapSpec, grids: Any, image: PlacedImage, xy: np.ndarray, member: np.ndarray,
            yx: np.ndarray, class_names: Sequence[str] | None, log: Callable[[str], None],
            written: list[Path]) -> dict[str, Any]:
    """One image on one map: its lines, its pictures (one per grid size with a current atlas
    picture) and its JSON; returns the JSON."""
    placed = xy[member]
    info: dict[str, Any] = {"image": str(image.path), "map": spec.name, "layer": spec.layer, "kind": spec.kind,
                            "corpus_index": image.corpus_index, "prediction": image.prediction,
                            "samples": int(len(xy)), "placed": int(member.sum()),
                            "yx": yx.tolist(), "xy": [None if not ok else [round(float(v), 6) for v in p]
                                                      for p, ok in zip(xy, member)], "grids": {}}
    if not len(placed):
        log(f"place: {image.path.name} on {spec.name}: none of its {len(xy)} samples belongs to this map "
            f"({_membership(spec)})")
    for size in grids.sizes(spec.name):
        grid = grids.grid(spec.name, size)
        cells = cells_of(placed, grid, class_names) if len(placed) else []
        entry: dict[str, Any] = {"cells": cells, "picture": None}
        if len(placed):
            found = store.atlas_image(spec.name, size)
            if found is not None:
                with Image.open(found[0]) as atlas:
                    canvas = np.asarray(atlas.convert("RGB"))
                side = canvas.shape[0]
                points = np.column_stack([placed[:, 0] * canvas.shape[1], (1 - placed[:, 1]) * side])
                out = store.place_png(spec.name, image.stem, size)
                write_image(draw_markers(canvas, points), out)
                written.append(out)
                entry["picture"] = str(out)
                entry["drawn_on"] = found[1]
            log(_cells_line(image, spec, size, len(xy), len(placed), cells, entry["picture"]))
        info["grids"][str(size)] = entry
    path = store.place_json(spec.name, image.stem)
    write_json(info, path)
    written.append(path)
    return info


def _membership(spec: MapSpec) -> str:
    if spec.kind == "class":  # (a layer's map takes every sample)
        return f"class atlas of {spec.class_names[0]}: top class {spec.class_names[0]}, or as much attribution to it " \
               "as the run's members"
    return f"two-class view: samples of {spec.class_names[0]} or {spec.class_names[1]}"


def _cells_line(image: PlacedImage, spec: MapSpec, size: int, n: int, n_placed: int, cells: list[dict[str, Any]],
                picture: str | None) -> str:
    of = f"{n_placed} of {n} samples" if n_placed < n else f"{n} samples"
    named = []
    for c in cells[:TOP_CELLS]:
        what = (", ".join(f"{name} {value:.2g}" for name, value in c["top_classes"][:TOP_CLASSES])
                if c["kept"] else "a cell the grid dropped")
        named.append(f"({c['cell'][0]}, {c['cell'][1]}) x{c['samples']}: {what}")
    drawn = f"; wrote {picture}" if picture else "; no current atlas picture to draw on (run `atlas mosaic`)"
    return f"place: {image.path.name} on {spec.name} {size}x{size}: {of} in {len(cells)} cells; " + "; ".join(named) + drawn


def _prediction(samples: Samples, probability: np.ndarray, i: int, class_names: Sequence[str] | None
                ) -> tuple[str | None, float | None]:
    if samples.pred is None or samples.pred[i] < 0:
        return None, None
    return class_name(int(samples.pred[i]), class_names), float(probability[i])
