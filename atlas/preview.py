"""The preview atlas: each cell shown by the mean of its most typical members' image patches.

It needs no optimisation, so a user can look at a layout before rendering icons. A cell's tile
averages the patches (around the members' map positions, `draw.patch_box`) of its `members`
members most similar to its direction. The picks of all grids are sorted by source image, so each
image is decoded once and only one is held at a time; memory is the per-cell sums (cells x px x
px x 4 floats). Images that cannot be read are skipped and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .corpus import BadImage, load_image
from .draw import patch_box, window_patch
from .errors import AtlasError
from .grid import cosine_to_direction
from .models import Preprocess
from .store import Activations, Grid


def mean_patch(patches: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """The pixelwise mean of patches over the patches that cover each pixel; white where none does.

    Args:
        patches: (k, P, P, 3) float or uint8.
        masks: (k, P, P) bool, True where a patch has a pixel; None = all.

    Returns:
        (P, P, 3) uint8 (all white when k = 0).
    """
    patches = np.asarray(patches, dtype=np.float32)
    weights = np.ones(patches.shape[:3], np.float32) if masks is None else np.asarray(masks, np.float32)
    total = (patches * weights[..., None]).sum(axis=0)
    return _finish_mean(total, weights.sum(axis=0))


def _finish_mean(total: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """(..., P, P, 3) sums and (..., P, P) weights -> uint8 means, white where the weight is 0."""
    mean = np.divide(total, weight[..., None], out=np.full(total.shape, 255.0, np.float32),
                     where=weight[..., None] > 0)
    return np.clip(np.rint(mean), 0, 255).astype(np.uint8)


def pick_members(indptr: np.ndarray, index: np.ndarray, score: np.ndarray, m: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Keeps the m members of each cell with the highest score (ties: the earlier member).

    Args:
        indptr: (cells + 1,) int64 CSR row pointers.
        index: (nnz,) int64 member rows.
        score: (nnz,) float score of each entry of `index` (e.g. cosine to the cell's direction).
        m: members kept per cell, >= 1.

    Returns:
        (indptr, index) of the kept members as CSR, best first within each cell.
    """
    new_indptr, keep = rank_members(indptr, score, m)
    return new_indptr, np.asarray(index, np.int64)[keep]


def rank_members(indptr: np.ndarray, score: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """`pick_members` as positions: (indptr of the kept members, their (k,) positions in the
    cells' member list), best first within each cell, so their scores are `score[positions]`."""
    indptr = np.asarray(indptr, np.int64)
    counts = np.diff(indptr)
    cell_of = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((np.arange(len(score)), -np.asarray(score, np.float64), cell_of))
    rank = np.arange(len(score)) - indptr[cell_of[order]]
    new_indptr = np.zeros_like(indptr)
    np.cumsum(np.minimum(counts, m), out=new_indptr[1:])
    return new_indptr, order[rank < m]


def member_cosine(acts: Any, grid: Grid) -> np.ndarray:
    """Cosine similarity of every member to its cell's direction, aligned with `grid.index`.

    Args:
        acts: (n, C) array or h5py dataset of the layer's activations (read in float32 blocks).
        grid: the cells, with `direction` (m, C).

    Returns:
        (nnz,) float32.
    """
    return cosine_to_direction(acts, [grid])[0]



def preview_tiles(acts: Activations, image_path: Callable[[int], Path], grids: Sequence[tuple[str, Grid]], *,
                  px: int, members: int, patch: float, max_pixels: int, log: Callable[[str], None]
                  ) -> tuple[list[list[np.ndarray | None]], int]:
    """The preview tile of every cell of some grids (None for a cell no image could show).

    Args:
        acts: the run's activations (positions, images, geometry).
        image_path: image index -> its file (`Run.source_image`, which refuses a changed file).
        grids: (layer, grid) pairs: the layer whose samples the grid's members are.
        px: tile side in pixels.
        members: members averaged per cell (the most similar to the cell's direction).
        patch: the patch side in map strides (`draw.patch_box`).
        max_pixels: larger images are skipped as decompression bombs.
        log: receives a line when source images could not be read.

    Returns:
        per grid, its tiles; and the number of source images that could not be read.
    """
    if acts.preprocess is None:
        raise AtlasError(f"{acts.path} lacks the preprocess attribute the preview needs; "
                         f"run `atlas collect {acts.path.parent} --force`, or set mosaic.preview = false")
    crop = Preprocess(**acts.preprocess)
    job_of, cell_of, image_of, boxes = [], [], [], []
    for k, (layer, grid) in enumerate(grids):
        samples = acts.layer(layer)
        if samples.shape is None:
            raise AtlasError(f"{acts.path} lacks the layer_shapes of {layer!r} the preview needs; "
                             f"run `atlas collect {acts.path.parent} --force`")
        indptr, rows = pick_members(grid.indptr, grid.index, member_cosine(samples.acts, grid), members)
        job_of.append(np.full(len(rows), k))
        cell_of.append(np.repeat(np.arange(len(grid)), np.diff(indptr)))
        image_of.append(samples.image[rows])
        boxes.append(patch_box(samples.yx[rows], samples.shape[1:3], crop.size, patch))
    job_of, cell_of, boxes = np.concatenate(job_of), np.concatenate(cell_of), np.concatenate(boxes)
    image_of = np.concatenate(image_of).astype(np.int64)
    sums = [np.zeros((len(grid), px, px, 3), np.float32) for _, grid in grids]
    weights = [np.zeros(s.shape[:3], np.float32) for s in sums]

    order = np.argsort(image_of, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(image_of[order]) != 0]) if len(order) else np.zeros(0, np.int64)
    stops = np.r_[starts[1:], len(order)]
    bad = 0
    for begin, stop in _progress(zip(starts, stops), len(starts)):
        picked = order[begin:stop]
        try:
            pixels = crop.crop(load_image(image_path(int(image_of[picked[0]])), max_pixels))
        except (BadImage, OSError, ValueError):
            bad += 1
            continue
        for j in picked:
            tile, mask = window_patch(pixels, boxes[j], px)
            sums[job_of[j]][cell_of[j]] += tile
            weights[job_of[j]][cell_of[j]] += mask
    if bad:
        log(f"mosaic: preview: {bad} of {len(starts)} source image(s) could not be read and were left out")
    tiles = []
    for total, weight in zip(sums, weights):
        means = _finish_mean(total, weight)
        shown = weight.any(axis=(1, 2))
        tiles.append([means[i] if shown[i] else None for i in range(len(means))])
    return tiles, bad


def _progress(items: Iterable, total: int) -> Iterable:
    from tqdm import tqdm

    return tqdm(items, total=total, unit="img", desc="mosaic preview", disable=None, dynamic_ncols=True,
                leave=False)
