"""The atlas-guided patch experiment: pasting what an atlas says argues for class B onto images of A.

`atlas attack RUN --pair A B` reads the two-class view of A vs B (`<layer>/pair-<a>-<b>`), takes
the `n_patches` cells of its grid most attributed to B (grid.h5's per-cell mean attribution) and
uses two kinds of patches made from them: their rendered icons, and for each cell the real
dataset patch of its member most aligned with the cell's direction (cut to its receptive field
exactly as `atlas inspect` cuts it). It pastes each patch onto every corpus image the model
classifies as A and counts the flips (A before, B after) under the article's two placements:

- static: one size and corner for every image (`static_size` of the image side, `corner`);
- dynamic: the best of every corner and size of `sizes` per image (success if any flips).

Two controls get the same treatment: patches of uniform random noise, and the icons of randomly
chosen other cells of the same grid. Our corpus holds one image per class, so few images (often
none) are classified as A: the `n_similar` images the model finds most like A (largest P(A),
classified neither A nor B) are attacked the same way, and every patch is also pasted (static)
onto up to `universal_images` corpus images: the share of those not classified as B before whose
top-1 becomes B measures each patch as a universal targeted patch. B's mean probability before
and after is reported throughout. `--target B` uses B's class atlas
(`<layer>/class-<slug>`) instead and attacks every image not classified as B (or, with
`--from A`, the images of A).

Writes `RUN/<map>/attack/attack-N.png` (the best examples: before, patch, after, with
probabilities) and `attack-N.json` (every figure, per patch too) and prints the table.

Images reach the model exactly as collect fed them (the run's preprocessing: resize, centre crop,
normalise); patches are pasted onto the cropped pixels, so a patch covers the stated share of
what the model sees. Everything is read through the run store: a stale grid, icon folder or
activations file is refused with the stages to run, and so is a source image changed since
collect.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .corpus import BadImage, load_image
from .draw import compose_panel, fit_tile
from .errors import AtlasError, unknown_name
from .focus import MapSpec, find_class, slug
from .inspect import class_name, pick_aligned_members, sample_patches
from .store import Grid, IconSet, Run, write_image, write_json

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
N_PATCHES = 10  # the article's patches per pair
STATIC_SIZE = 0.3  # side of the static patch, fraction of the image side (67 px of Lite0's 224)
STATIC_CORNER = "bottom-right"
DYNAMIC_SIZES = (0.2, 0.3, 0.4)  # with the four corners: 12 placements tried per image
N_SIMILAR = 10  # images most like A (largest P(A)) attacked besides those classified A
UNIVERSAL_IMAGES = 1000  # corpus images the universal figures are measured on (a seeded sample beyond)
PATCH_PX = 128  # side at which real patches are cut (then resized like the icons)
EXAMPLES = 4  # rows of the figure from the attacked images, and as many from the rest of the corpus
TILE = 160  # side of a tile in the figure

# What each kind of patch is, in the order of the table.
KINDS = {"icons": "atlas icons", "members": "member patches", "random_cells": "random cells' icons",
         "noise": "random noise"}


# ---------------------------------------------------------------------------------------------
# Pure core


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a patch goes: a corner of the image and a side as a fraction of the image side."""

    corner: str  # one of CORNERS
    size: float  # in (0, 1]

    def box(self, side: int) -> tuple[int, int, int]:
        """(top, left, patch side) in pixels on a side x side image."""
        px = min(side, max(1, int(round(self.size * side))))
        top = 0 if self.corner.startswith("top") else side - px
        left = 0 if self.corner.endswith("left") else side - px
        return top, left, px

    def label(self) -> str:
        return f"{self.corner} {self.size:.0%}"


def placements(sizes: Sequence[float], static: Placement) -> tuple[list[Placement], int]:
    """Every corner at every size (sizes and the static one, ascending), and the static one's index.

    Raises:
        AtlasError: a size outside (0, 1] or an unknown corner.
    """
    if static.corner not in CORNERS:
        raise AtlasError(f"unknown corner {static.corner!r}; use one of {', '.join(CORNERS)}")
    every = sorted({float(s) for s in sizes} | {float(static.size)})
    bad = [s for s in every if not 0 < s <= 1]
    if bad:
        raise AtlasError(f"patch sizes are fractions of the image side in (0, 1], got {bad[0]}")
    out = [Placement(c, s) for s in every for c in CORNERS]
    return out, out.index(Placement(static.corner, float(static.size)))


def paste(image: np.ndarray, patch: np.ndarray, placement: Placement) -> np.ndarray:
    """A copy of `image` with `patch` resized (Lanczos) into the placement's square.

    Args:
        image: (S, S, 3) uint8, the network input's pixels.
        patch: (h, w, 3) uint8, any side (icons, real patches and noise alike are resized).
        placement: where and how large.

    Returns:
        (S, S, 3) uint8.
    """
    out = np.array(image, np.uint8, copy=True)
    top, left, px = placement.box(out.shape[0])
    out[top:top + px, left:left + px] = fit_tile(patch, px)
    return out


@dataclasses.dataclass
class Outcome:
    """The model's verdict on some images: arrays of one shape, (n,) for clean images or
    (patches, placements, n) for patched ones."""

    top1: np.ndarray  # int64 top-1 class
    top_p: np.ndarray  # float32 its probability
    target_p: np.ndarray  # float32 probability of the target class B


def outcome(probs: np.ndarray, target: int) -> Outcome:
    """The Outcome of (..., n_classes) probabilities."""
    probs = np.asarray(probs, np.float32)
    top1 = probs.argmax(axis=-1)
    return Outcome(top1.astype(np.int64), np.take_along_axis(probs, top1[..., None], -1)[..., 0],
                   probs[..., target].copy())


def try_patches(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray, patches: Sequence[np.ndarray],
                where: Sequence[Placement], target: int, batch_size: int = 32,
                progress: Callable[[int], None] | None = None) -> Outcome:
    """Pastes every patch at every placement onto every image and asks the model.

    Args:
        predict: (m, S, S, 3) uint8 pixels -> (m, n_classes) class probabilities.
        images: (n, S, S, 3) uint8.
        patches: P arrays (h, w, 3) uint8.
        where: K placements.
        target: the class B whose probability is kept.
        batch_size: images per call of `predict`.
        progress: called with the number of images done after each batch.

    Returns:
        Outcome of shape (P, K, n).
    """
    shape = (len(patches), len(where), len(images))
    total = int(np.prod(shape))
    top1, top_p, target_p = np.zeros(total, np.int64), np.zeros(total, np.float32), np.zeros(total, np.float32)
    for start in range(0, total, batch_size):
        index = np.arange(start, min(start + batch_size, total))
        p, k, i = np.unravel_index(index, shape)
        batch = np.stack([paste(images[ii], patches[pp], where[kk]) for pp, kk, ii in zip(p, k, i)])
        verdict = outcome(predict(batch), target)
        top1[index], top_p[index], target_p[index] = verdict.top1, verdict.top_p, verdict.target_p
        if progress is not None:
            progress(len(index))
    return Outcome(top1.reshape(shape), top_p.reshape(shape), target_p.reshape(shape))


def flip_counts(before: Outcome, after: Outcome, attacked: np.ndarray, target: int,
                placement: int | None = None) -> dict[str, Any]:
    """Flips of the attacked images to the target, per patch, at one placement or the best per image.

    Args:
        before: (n,) the clean images' Outcome.
        after: (P, K, n) the patched images' Outcome.
        attacked: (n,) bool, the images that count (classified A before; for a universal patch,
            every image not classified as B before).
        target: the class B.
        placement: index of the placement (static), or None: the best of the K per image
            (dynamic: a flip if any placement flips; B's probability is the largest over them).

    Returns:
        {"images": n attacked, "flips": (P,) int per patch, "rate": mean over patches and images
        (None without images), "target_before": B's mean probability on the clean attacked images,
        "target_after": the same after (mean over patches and images)}.
    """
    attacked = np.asarray(attacked, bool)
    hit = after.top1[:, :, attacked] == target  # (P, K, m)
    prob = after.target_p[:, :, attacked]
    if placement is None:
        hit, prob = hit.any(axis=1), prob.max(axis=1)
    else:
        hit, prob = hit[:, placement], prob[:, placement]
    m = int(attacked.sum())
    flips = hit.sum(axis=1).astype(np.int64)
    return {"images": m, "flips": flips, "rate": float(flips.sum() / (m * len(flips))) if m and len(flips) else None,
            "target_before": float(before.target_p[attacked].mean()) if m else None,
            "target_after": float(prob.mean()) if m and len(flips) else None}


def top_cells(attr: np.ndarray, target: int, k: int) -> np.ndarray:
    """Indices of the (at most) k cells with the largest positive mean attribution to `target`,
    largest first (ties: the earlier cell)."""
    values = np.asarray(attr, np.float64)[:, target]
    order = np.lexsort((np.arange(len(values)), -values))
    return order[values[order] > 0][:k]


def random_cells(n_cells: int, exclude: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k cells drawn without replacement from those not in `exclude` (fewer if there are not k)."""
    pool = np.setdiff1d(np.arange(n_cells), exclude)
    return np.sort(rng.choice(pool, size=min(k, len(pool)), replace=False)) if len(pool) else pool


def noise_patches(k: int, side: int, rng: np.random.Generator) -> list[np.ndarray]:
    """k patches of uniform random pixels, (side, side, 3) uint8 each."""
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(k)]


# ---------------------------------------------------------------------------------------------
# Reading the run


@dataclasses.dataclass
class Patches:
    """The patches of one kind and where each came from."""

    images: list[np.ndarray]  # (h, w, 3) uint8 each
    facts: list[dict[str, Any]]  # per patch: its cell, attribution, icon or member image


def choose_map(store: Run, a: int | None, b: int, layer: str | None, names: Sequence[str] | None) -> MapSpec:
    """The two-class view of (a, b) (either way round) or, with a = None, b's class atlas; on
    `layer` when given, else on the one layer that has it. AtlasError naming what to add when
    the run has none."""
    def named(c: int) -> str:
        return class_name(c, names)

    specs = store.maps()
    if a is None:
        found = [m for m in specs if m.kind == "class" and m.classes == (b,)]
        what, key = f"class atlas of {named(b)!r}", "layout.classes"
        value = json.dumps([*store.config.layout.classes, named(b)])
    else:
        found = [m for m in specs if m.kind == "pair" and set(m.classes) == {a, b}]
        what, key = f"two-class view of {named(a)!r} vs {named(b)!r}", "layout.pairs"
        value = json.dumps([list(p) for p in store.config.layout.pairs] + [[named(a), named(b)]])
    if layer is not None:
        if layer not in store.config.layers:
            raise unknown_name("layer", layer, list(store.config.layers), f"run {store.root} has")
        found = [m for m in found if m.layer == layer]
    if not found:
        where = f" at {layer}" if layer is not None else ""
        raise AtlasError(f"run {store.root} has no {what}{where}; add it to {key} and build it: "
                         f"`atlas run {store.root} --set '{key}={value}'`")
    if len(found) > 1:
        raise AtlasError(f"run {store.root} has the {what} at {', '.join(m.layer for m in found)}; "
                         "choose one with --layer")
    return found[0]


def pick_grid(store: Run, spec: MapSpec, size: int | None) -> tuple[Grid, IconSet]:
    """The map's grid of `size` (default: the largest with current icons) and its icons; AtlasError
    naming the command to run when they are not rendered (or stale)."""
    grids = store.grid_file("render")
    if size is not None:
        grid = grids.grid(spec.name, size)
        icons = store.icons(spec, grid, upto="render")
        if icons is None:
            raise AtlasError(f"{store.icons_dir(spec.name, size)} not found: the {size}x{size} icons of {spec.name} "
                             f"are not rendered; run `atlas render {store.root}` (render.sizes_for sets a map's sizes)")
        return grid, icons
    sizes = grids.sizes(spec.name)
    for n in reversed(sizes):
        grid = grids.grid(spec.name, n)
        state, icons = store.icons_state(spec, grid)
        if state == "current" and icons is not None:
            return grid, icons
    for n in reversed(sizes):  # none current: refuse the first stale one with the store's line
        store.icons(spec, grids.grid(spec.name, n), upto="render")
    raise AtlasError(f"{spec.name} has no rendered icons (grid sizes {', '.join(map(str, sizes))}); run "
                     f"`atlas render {store.root}` (render.sizes_for sets a map's sizes)")


def icon_patches(icons: IconSet, grid: Grid, cells: np.ndarray, target: int) -> Patches:
    """The icons of some cells (cells whose icon is absent are left out)."""
    out = Patches([], [])
    for i in cells:
        x, y = (int(v) for v in grid.cell[i])
        icon = icons.read(x, y)
        if icon is None:
            continue
        out.images.append(icon)
        out.facts.append({"cell": [x, y], "attribution": float(grid.attr[i, target]), "count": int(grid.count[i]),
                          "icon": str(icons.path(x, y))})
    return out


def member_patches(store: Run, spec: MapSpec, grid: Grid, cells: np.ndarray, target: int,
                   log: Callable[[str], None]) -> Patches:
    """Per cell, the receptive-field patch of its member most aligned with the cell's direction
    (the first tile `atlas inspect` shows for it), without inspect's outline."""
    with store.activations("grid") as acts:
        samples = acts.layer(spec.layer)
        rows = np.array([pick_aligned_members(grid.members(i), samples.acts[grid.members(i)].astype(np.float32),
                                              grid.direction[i], 1)[0][0] for i in cells], np.int64)
        tiles, facts, _ = sample_patches(store, acts, spec.layer, rows, log, PATCH_PX, mark=False) if len(rows) \
            else ([], [], None)
    out = Patches([], [])
    for i, tile, fact in zip(cells, tiles, facts):
        if tile is None:
            continue  # its image could not be read (sample_patches said so)
        x, y = (int(v) for v in grid.cell[i])
        out.images.append(tile)
        out.facts.append({"cell": [x, y], "attribution": float(grid.attr[i, target]), "count": int(grid.count[i]),
                          "image": fact["path"], "yx": fact["yx"], "box": fact["box"]})
    return out


def read_corpus(store: Run, indices: Sequence[int]) -> np.ndarray:
    """The network-input pixels (n, S, S, 3) uint8 of some corpus images, cut as collect cut them;
    AtlasError naming the file for one that cannot be read (or changed since collect)."""
    from .models import Preprocess

    with store.activations("grid") as acts:
        crop = Preprocess(**acts.preprocess) if acts.preprocess else None
        paths = [store.source_image(acts, int(i)) for i in indices]
    if crop is None:
        raise AtlasError(f"{store.activations_path} lacks the preprocess attribute; run `atlas collect {store.root} "
                         "--force`")
    out = np.zeros((len(paths), crop.size, crop.size, 3), np.uint8)
    for k, path in enumerate(paths):
        try:
            out[k] = np.asarray(crop.crop(load_image(path, store.config.collect.max_image_pixels)))
        except BadImage as exc:
            raise AtlasError(f"cannot read image {path} ({exc.reason}); it was read at collect: put it back, or "
                             f"collect again (`atlas collect {store.root}`)") from None
    return out


def model_predictor(store: Run, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    """The run's model (its weights and preprocessing) as pixels (m, S, S, 3) uint8 -> (m,
    n_classes) float32 softmax probabilities, on collect's device."""
    from .models import load_model
    from .runtime import keep_freed_memory, pick_device

    keep_freed_memory()
    config = store.config
    if config.collect.threads:
        torch.set_num_threads(config.collect.threads)
    device = pick_device(config.collect.device, "collect.device")
    model = load_model(config.model, config.weights, config.preprocess)
    module = model.module.to(device).to(memory_format=torch.channels_last)

    def predict(pixels: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(pixels), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(pixels[start:start + batch_size])).to(device)
                x = model.preprocess.normalise(x.permute(0, 3, 1, 2).float().div_(255.0))
                logits = module(x.contiguous(memory_format=torch.channels_last))
                out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    return predict


# ---------------------------------------------------------------------------------------------
# The command


def patch_attack(run: str | Path, *, pair: Sequence[str] | None = None, target: str | None = None,
                 source: str | None = None, layer: str | None = None, size: int | None = None,
                 n_patches: int = N_PATCHES, static_size: float = STATIC_SIZE, corner: str = STATIC_CORNER,
                 sizes: Sequence[float] = DYNAMIC_SIZES, universal_images: int = UNIVERSAL_IMAGES,
                 n_similar: int = N_SIMILAR, seed: int = 0,
                 batch_size: int = 32, predict: Callable[[np.ndarray], np.ndarray] | None = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """`atlas attack`: the patch experiment on one map of a run; writes its figure and JSON.

    Args:
        run: the run directory.
        pair: (A, B) class names, wnids or indices: patches from the two-class view, attacking A.
        target: B alone: patches from B's class atlas, attacking every image not classified as B
            (or those of `source`). Exactly one of `pair` and `target`.
        source: with `target`, the class A whose images are attacked.
        layer: the layer whose map to use, when several have one.
        size: grid size N; default the largest with current icons.
        n_patches: patches of each kind (default 10, the article's).
        static_size, corner: the static placement (default 0.3 of the side, bottom-right).
        sizes: patch sides tried with each corner for the dynamic placement (default 0.2, 0.3, 0.4).
        universal_images: corpus images to measure the universal patch on (default 1000; a
            seeded sample when there are more; 0 skips it).
        n_similar: with A, also attack the n_similar corpus images most like A (largest P(A)) that
            the model classifies as neither A nor B (default 10; 0 = none).
        seed: seeds the random cells, the noise and the sample.
        batch_size: images per forward pass.
        predict: pixels -> probabilities (default: the run's model, `model_predictor`).

    Returns:
        The facts written to attack-N.json.
    """
    if (pair is None) == (target is None):
        raise AtlasError("give --pair A B or --target B")
    if source is not None and target is None:
        raise AtlasError("--from goes with --target (with --pair the first class is attacked)")
    if n_patches < 1:
        raise AtlasError(f"--patches must be at least 1, got {n_patches}")
    if universal_images < 0 or n_similar < 0 or batch_size < 1:
        raise AtlasError("--universal and --similar must be >= 0, --batch-size >= 1")
    where, static = placements(sizes, Placement(corner, float(static_size)))
    started = time.perf_counter()
    store = Run.open(run)
    grids = store.grid_file("render")
    names, wnids = grids.class_names, grids.class_wnids
    if pair is not None:
        a, b = (find_class(str(q), names, wnids) for q in pair)
    else:
        b = find_class(str(target), names, wnids)
        a = find_class(str(source), names, wnids) if source is not None else None
    if a == b:
        raise AtlasError(f"{class_name(a, names)!r} is both A and B; the attack turns one class into another")
    spec = choose_map(store, a if pair is not None else None, b, layer, names)
    grid, icons = pick_grid(store, spec, size)
    if grid.attr is None:
        raise AtlasError(f"run {store.root} was collected without attribution, so no cell is attributed to a class; "
                         f"collect with collect.attribution = true")
    chosen = top_cells(grid.attr, b, n_patches)
    if not len(chosen):
        raise AtlasError(f"no cell of the {grid.size}x{grid.size} grid of {spec.name} has a positive mean "
                         f"attribution to {class_name(b, names)!r}")
    rng = np.random.default_rng(seed)
    kinds = {"icons": icon_patches(icons, grid, chosen, b),
             "members": member_patches(store, spec, grid, chosen, b, log),
             "random_cells": icon_patches(icons, grid, random_cells(len(grid), chosen, len(chosen), rng), b)}
    icon_px = int(icons.meta.get("icon_size") or (kinds["icons"].images[0].shape[0] if kinds["icons"].images else 64))
    kinds["noise"] = Patches(noise_patches(len(chosen), icon_px, rng), [{"seed": seed}] * len(chosen))

    with store.activations("grid") as acts:
        images = acts.images
        ok = np.flatnonzero(images.status == "ok")
        collected_pred = images.pred.copy()
        paths = images.path.copy()
    attacked_label = class_name(a, names) if a is not None else f"not {class_name(b, names)}"
    # The attacked images are chosen by the model's own verdict on the clean pixels; collect's
    # stored prediction (-1 when it made none) picks the candidates, so without the images like A
    # only those and the universal sample are read. Without A (--target alone) the attacked
    # images would be the universal sample itself, where the dynamic placements would cost 12
    # times as much: only the universal (static) figures are measured then.
    candidates = ok[(collected_pred[ok] == a) | (collected_pred[ok] < 0)] if a is not None else ok[:0]
    universal = ok if len(ok) <= universal_images else np.sort(rng.choice(ok, universal_images, replace=False))
    universal = universal if universal_images else ok[:0]
    # The images most like A are looked for among every image, so all of them are classified once.
    read = ok if a is not None and n_similar else np.union1d(candidates, universal)
    if not len(universal) and (a is None or not (len(candidates) or n_similar)):
        _nothing_to_attack(store, a, attacked_label)
    log(f"{spec.title}, {grid.size}x{grid.size} grid: patches towards {class_name(b, names)!r} from its "
        f"{len(chosen)} most attributed cells; reading {len(read)} images")
    pixels = read_corpus(store, read)
    predict = predict or model_predictor(store, batch_size)
    probs = predict(pixels)
    clean = outcome(probs, b)
    at = {int(i): k for k, i in enumerate(read)}
    cand_rows = np.array([at[int(i)] for i in candidates], np.int64)
    uni_rows = np.array([at[int(i)] for i in universal], np.int64)
    victims = cand_rows[clean.top1[cand_rows] == a] if a is not None else cand_rows[:0]
    # One image per class leaves few (often no) images of A: the images the model finds most
    # like A (largest P(A), classified neither A nor B) are attacked as a second group.
    similar = uni_rows[:0]
    if a is not None and n_similar:
        every = np.arange(len(read))
        others = every[(clean.top1 != a) & (clean.top1 != b)]
        similar = others[np.lexsort((others, -probs[others, a].astype(np.float64)))][:n_similar]
    if not len(victims) and not len(uni_rows) and not len(similar):
        _nothing_to_attack(store, a, attacked_label)
    if a is not None and not len(victims):
        log(f"  note: no image is classified as {attacked_label!r}; its A -> B figures are n/a (the images most "
            f"like it and the universal figures remain)")
    attacked = np.concatenate([victims, similar])
    total = sum(len(p.images) for p in kinds.values()) * (len(where) * len(attacked) + len(uni_rows))
    log(f"  attacking {len(victims)} image(s) classified {attacked_label} and {len(similar)} most like it at "
        f"{len(where)} placements, and {len(uni_rows)} corpus images at the static one: {total} forward passes")
    done = [0]
    last = [time.perf_counter()]

    def progress(n: int) -> None:
        done[0] += n
        if time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            log(f"  {done[0]}/{total} patched images classified")

    results: dict[str, dict[str, Any]] = {}
    trials: dict[str, tuple[Outcome, Outcome]] = {}
    groups = {"": np.arange(len(victims)), "similar_": len(victims) + np.arange(len(similar))}
    before = _subset(clean, attacked)
    before_u = _subset(clean, uni_rows)
    for kind, patches in kinds.items():
        if not patches.images:
            continue
        on_attacked = try_patches(predict, pixels[attacked], patches.images, where, b, batch_size, progress)
        on_corpus = try_patches(predict, pixels[uni_rows], patches.images, [where[static]], b, batch_size, progress)
        trials[kind] = (on_attacked, on_corpus)
        results[kind] = {}
        for prefix, members in groups.items():
            group = np.isin(np.arange(len(attacked)), members)
            results[kind][prefix + "static"] = _jsonable(flip_counts(before, on_attacked, group, b, static))
            results[kind][prefix + "dynamic"] = _jsonable(flip_counts(before, on_attacked, group, b, None))
        results[kind]["universal"] = _jsonable(flip_counts(before_u, on_corpus, before_u.top1 != b, b, 0))
        results[kind]["patches"] = patches.facts
    seconds = time.perf_counter() - started
    # a pair view attacked the other way round (B's images towards A) gets its own files
    reversed_pair = pair is not None and spec.classes and a != spec.classes[0]
    png = store.attack_path(spec.name, grid.size,
                            slug(class_name(a, names)) if a is not None and (pair is None or reversed_pair) else None)
    info = {"map": spec.name, "layer": spec.layer, "grid": grid.size, "grid_fingerprint": store.grid_fingerprint(),
            "source": {"class": a, "name": attacked_label}, "target": {"class": b, "name": class_name(b, names)},
            "static": dataclasses.asdict(where[static]), "placements": [dataclasses.asdict(p) for p in where],
            "attacked_images": [str(paths[read[r]]) for r in victims],
            "similar_images": [{"path": str(paths[read[r]]), "top1": class_name(int(clean.top1[r]), names),
                                "source_p": float(probs[r, a])} for r in similar],
            "universal_images": int(len(uni_rows)), "seed": seed, "seconds": round(seconds, 1),
            "figure": str(png), "results": results}
    figure = draw_examples(info, kinds, trials, pixels, clean, attacked, uni_rows, where, static, names)
    write_image(figure, png)
    write_json(info, png.with_suffix(".json"))
    for line in table_lines(info):
        log(line)
    log(f"  {seconds:.0f} s; wrote {png} and {png.with_suffix('.json').name}")
    return info


def _nothing_to_attack(store: Run, a: int | None, attacked_label: str) -> None:
    why = (f"no image of run {store.root} is classified as {attacked_label!r}, --similar is 0" if a is not None
           else "--target alone measures the universal patch")
    raise AtlasError(f"{why} and --universal is 0, so there is nothing to attack")


def _subset(o: Outcome, rows: np.ndarray) -> Outcome:
    return Outcome(o.top1[rows], o.top_p[rows], o.target_p[rows])


def _jsonable(counts: dict[str, Any]) -> dict[str, Any]:
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in counts.items()}


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def table_lines(info: dict[str, Any]) -> list[str]:
    """The terminal table of an attack's facts (as `patch_attack` returns them)."""
    src, dst = info["source"]["name"], info["target"]["name"]
    static = Placement(**info["static"])
    sizes = sorted({p["size"] for p in info["placements"]})
    first = next(iter(info["results"].values()), None)
    n_a = first["static"]["images"] if first else 0
    n_like = first["similar_static"]["images"] if first else 0
    lines = [f"  {src} -> {dst}: static = {static.label()} of the side; dynamic = best of 4 corners x "
             f"{', '.join(f'{s:.0%}' for s in sizes)} per image",
             f"  A: {n_a} image(s) classified {src}; like A: the {n_like} most like it; universal: the "
             f"{first['universal']['images'] if first else 0} of {info['universal_images']} corpus images not "
             f"classified {dst}, static",
             f"  {'':<20} {'A -> B':^17} {'like A -> B':^17} {'universal':>9}  {'P(B) on A':^20}  "
             f"{'P(B) on corpus':^13}",
             f"  {'patches':<20} {'static':>8} {'dynamic':>8} {'static':>8} {'dynamic':>8} {'top-1 B':>9}  "
             f"{'before':>6} {'static':>6} {'dyn.':>6}  {'before':>6} {'after':>6}"]

    def p(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    for kind, r in info["results"].items():
        s, d, u = r["static"], r["dynamic"], r["universal"]
        lines.append(f"  {KINDS[kind]:<20} {_percent(s['rate']):>8} {_percent(d['rate']):>8} "
                     f"{_percent(r['similar_static']['rate']):>8} {_percent(r['similar_dynamic']['rate']):>8} "
                     f"{_percent(u['rate']):>9}  {p(s['target_before']):>6} {p(s['target_after']):>6} "
                     f"{p(d['target_after']):>6}  {p(u['target_before']):>6} {p(u['target_after']):>6}")
    return lines


def draw_examples(info: dict[str, Any], kinds: dict[str, Patches], trials: dict[str, tuple[Outcome, Outcome]],
                  pixels: np.ndarray, clean: Outcome, attacked: np.ndarray, uni_rows: np.ndarray,
                  where: Sequence[Placement], static: int, names: Sequence[str] | None) -> np.ndarray:
    """The figure: rows of (before, patch, after) for the attacked images' best trials (icons and
    member patches, best placement) and the strongest universal flips (one row per image), each
    captioned with the top-1 class and B's probability.

    Args:
        attacked: (m,) rows of `pixels` attacked at every placement (A's images, then those like A),
            in the order of the trials' last axis; uni_rows likewise for the universal trials.
    """
    b = info["target"]["class"]
    best: list[tuple[float, str, int, int, int]] = []  # (P(B), kind, patch, placement, pixel row)
    flips: list[tuple[float, str, int, int, int]] = []
    for kind in ("icons", "members"):
        if kind not in trials:
            continue
        on_attacked, on_corpus = trials[kind]
        for p in range(on_attacked.target_p.shape[0]):
            for j, row in enumerate(attacked):
                k = int(on_attacked.target_p[p, :, j].argmax())
                best.append((float(on_attacked.target_p[p, k, j]), kind, p, k, int(row)))
            for j, row in enumerate(uni_rows):
                if on_corpus.top1[p, 0, j] == b and clean.top1[row] != b:
                    flips.append((float(on_corpus.target_p[p, 0, j]), kind, p, static, int(row)))
    # One row per attacked image (its best trial), A's own images first, then the strongest
    # universal flips of other images.
    n_a = info["results"] and next(iter(info["results"].values()))["static"]["images"]
    a_rows = {int(r) for r in attacked[:n_a]}
    best.sort(key=lambda t: (t[4] not in a_rows, -t[0]))
    flips.sort(key=lambda t: -t[0])
    victim_set = {int(r) for r in attacked}
    picked: list[tuple[float, str, int, int, int]] = []
    seen: set[int] = set()
    for t in best:
        if len(picked) < EXAMPLES and t[4] not in seen:
            seen.add(t[4])
            picked.append(t)
    for f in flips:
        if len(picked) >= 2 * EXAMPLES:
            break
        if f[4] not in seen and f[4] not in victim_set:
            seen.add(f[4])
            picked.append(f)

    def verdict(probs_top1: int, top_p: float, target_p: float) -> str:
        return f"{class_name(probs_top1, names)} {top_p:.2f}; B {target_p:.2f}"

    tiles, captions = [], []
    for _, kind, p, k, row in picked:
        patch = kinds[kind].images[p]
        after = paste(pixels[row], patch, where[k])
        on_attacked, on_corpus = trials[kind]
        if k == static and row not in victim_set:
            j = int(np.flatnonzero(uni_rows == row)[0])
            o = (on_corpus.top1[p, 0, j], on_corpus.top_p[p, 0, j], on_corpus.target_p[p, 0, j])
        else:
            j = int(np.flatnonzero(attacked == row)[0])
            o = (on_attacked.top1[p, k, j], on_attacked.top_p[p, k, j], on_attacked.target_p[p, k, j])
        cell = kinds[kind].facts[p]["cell"]
        tiles += [fit_tile(pixels[row], TILE), fit_tile(patch, TILE), fit_tile(after, TILE)]
        captions += [f"before: {verdict(clean.top1[row], clean.top_p[row], clean.target_p[row])}",
                     f"{'icon' if kind == 'icons' else 'member patch'} of cell ({cell[0]}, {cell[1]}), "
                     f"{where[k].label()}",
                     f"after: {verdict(*o)}"]
    header = [f"atlas attack: {info['source']['name']} -> B = {info['target']['name']}",
              f"patches from {info['map']}, {info['grid']}x{info['grid']} grid",
              "rows: before | patch | after (top-1 class and probability; B's probability)"]
    for kind, r in info["results"].items():
        header.append(f"{KINDS[kind]}: static {_percent(r['static']['rate'])}, dynamic {_percent(r['dynamic']['rate'])}"
                      f", universal {_percent(r['universal']['rate'])}")
    if not tiles:
        header.append("no example: nothing was attacked and no corpus image flipped")
    return compose_panel(header, None, tiles, captions, tile_px=TILE)
