"""Neighbourhoods of images across layers: how much two layers agree on which images are alike.

Each image is represented by the L2-normalised mean of its samples' activations at a layer; its K
nearest other images by cosine are found at each layer, and the shared-neighbour fraction of two
layers is the mean over images of |kNN_A ∩ kNN_B| / K: 1 for the same neighbours, about
K / (n - 1) by chance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .blocks import iter_blocks, sum_by_cell

KNN_BLOCK_BYTES = 1 << 26  # similarity rows computed at a time: 64 MiB of float32


def effective_neighbors(n_images: int, k: int) -> int:
    """The neighbourhood size used among n images: k, lowered to n - 1 when there are fewer; 0 when n < 2."""
    return max(0, min(k, n_images - 1))


def image_embeddings(acts: Any, image: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Each listed image as the L2-normalised mean of its samples' activations.

    Args:
        acts: (n, C) activations, array or h5py dataset (read in float32 blocks).
        image: (n,) int image index of each sample (`/layers/<layer>/image`).
        images: (m,) distinct int image indices; row j of the result is image `images[j]`.

    Returns:
        (m, C) float32 with unit rows; a zero row for an image without samples (or a zero mean).
        Besides it, memory holds one block of activations: each block's sums are taken in float64
        and added to the float32 result (collect writes an image's samples together, so nearly every
        image's sum is rounded to float32 once).
    """
    image = np.asarray(image, np.int64)
    images = np.asarray(images, np.int64)
    slot = np.full(max(int(image.max(initial=-1)), int(images.max(initial=-1))) + 1, -1, np.int64)
    slot[images] = np.arange(len(images))
    cells = slot[image]
    # The sum has the direction of the mean, and the direction is all that is kept.
    sums = np.zeros((len(images), acts.shape[1]), np.float32)
    for start, block in iter_blocks(acts):
        part = cells[start:start + len(block)]
        present, local = np.unique(part, return_inverse=True)
        skip = int(present[0] < 0) if len(present) else 0  # -1 (no listed image) sorts first
        local = np.where(part >= 0, local.reshape(-1) - skip, -1)
        sums[present[skip:]] += sum_by_cell(block, [local], [len(present) - skip])[0]
    rows = max(1, KNN_BLOCK_BYTES // (8 * max(1, sums.shape[1])))
    for a in range(0, len(sums), rows):
        part = sums[a:a + rows]
        norms = np.sqrt(np.einsum("ij,ij->i", part, part, dtype=np.float64))[:, None]
        np.divide(part, norms, out=part, where=norms > 0)
    return sums


def unit_rows(x: np.ndarray) -> np.ndarray:
    """x with every row scaled to length 1 (zero rows stay zero), as float32; x itself when it already is."""
    x = np.asarray(x, np.float32)
    if x.size == 0:
        return x
    rows = max(1, KNN_BLOCK_BYTES // (8 * x.shape[1]))
    norms = np.concatenate([np.sqrt(np.einsum("ij,ij->i", x[a:a + rows], x[a:a + rows], dtype=np.float64))
                            for a in range(0, len(x), rows)])
    if np.all((np.abs(norms - 1) < 1e-5) | (norms == 0)):
        return x  # image_embeddings' rows: no copy of what may be the largest array in memory
    return np.divide(x, norms[:, None], out=np.zeros_like(x), where=norms[:, None] > 0)


def _check_k(n: int, k: int) -> None:
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} rows, got {k}")


def _exact_rows(unit: np.ndarray, queries: np.ndarray | None, k: int, block_bytes: int = KNN_BLOCK_BYTES
                ) -> np.ndarray:
    """The exact k nearest rows (cosine) of the rows `queries` (None: all) of unit-row x, each row
    itself excluded: (len(queries), k) int64. Similarities are computed a block of query rows at a time."""
    n = len(unit)
    m = n if queries is None else len(queries)
    out = np.empty((m, k), np.int64)
    rows = max(1, block_bytes // (4 * n))
    for a in range(0, m, rows):
        ids = np.arange(a, min(a + rows, m)) if queries is None else np.asarray(queries[a:a + rows], np.int64)
        sim = (unit[a:a + rows] if queries is None else unit[ids]) @ unit.T
        sim[np.arange(len(ids)), ids] = -np.inf
        np.negative(sim, out=sim)  # in place: the k largest are the k smallest of its negative
        out[a:a + len(ids)] = np.argpartition(sim, k - 1, axis=1)[:, :k]
    return out


def nearest_neighbors(x: np.ndarray, k: int, block_bytes: int = KNN_BLOCK_BYTES) -> np.ndarray:
    """The exact k rows most similar (cosine) to each row, the row itself excluded.

    Similarities are computed a block of rows at a time (`block_bytes` of float32 similarities, at
    least one row), so memory stays bounded while the cost is O(n^2 C).

    Args:
        x: (n, C) float; zero rows have cosine 0 with everything.
        k: 1 <= k <= n - 1.
        block_bytes: the size of one block of similarities.

    Returns:
        (n, k) int64 row indices, in no particular order. Which of several rows tied for the k-th
        place is kept is unspecified, but the same for the same input.
    """
    unit = unit_rows(x)
    _check_k(len(unit), k)
    return _exact_rows(unit, None, k, block_bytes)


def shared_neighbor_fraction(knn_a: np.ndarray, knn_b: np.ndarray) -> float:
    """The mean over rows of |knn_a[i] ∩ knn_b[i]| / k: 1 when every row has the same neighbours in both.

    Args:
        knn_a, knn_b: (n, k) int neighbour indices of the same n items (distinct within a row), as
            from `nearest_neighbors`.

    Returns:
        A float in [0, 1]; NaN when n or k is 0.
    """
    a, b = np.asarray(knn_a), np.asarray(knn_b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"neighbour arrays must have the same (n, k) shape, got {a.shape} and {b.shape}")
    n, k = a.shape
    if n == 0 or k == 0:
        return float("nan")
    shared = 0
    rows = max(1, (1 << 24) // (k * k))  # bounds the (rows, k, k) comparison
    for s in range(0, n, rows):
        shared += int((a[s:s + rows, :, None] == b[s:s + rows, None, :]).any(axis=2).sum())
    return shared / (n * k)


def shared_neighbor_matrix(knns: Sequence[np.ndarray | None]) -> np.ndarray:
    """The shared-neighbour fraction between every two panels.

    Args:
        knns: P (n, k) neighbour arrays over the same images (None when there are too few images).

    Returns:
        (P, P) float64, symmetric; NaN where a panel has no neighbours.
    """
    p = len(knns)
    out = np.full((p, p), np.nan)
    for i in range(p):
        for j in range(i, p):
            if knns[i] is not None and knns[j] is not None:
                out[i, j] = out[j, i] = shared_neighbor_fraction(knns[i], knns[j])
    return out
