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

from .blocks import sum_by_cell

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
    """
    image = np.asarray(image, np.int64)
    images = np.asarray(images, np.int64)
    slot = np.full(max(int(image.max(initial=-1)), int(images.max(initial=-1))) + 1, -1, np.int64)
    slot[images] = np.arange(len(images))
    # The sum has the direction of the mean, and the direction is all that is kept.
    sums = sum_by_cell(acts, [slot[image]], [len(images)])[0]
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0).astype(np.float32)


def nearest_neighbors(x: np.ndarray, k: int) -> np.ndarray:
    """The k rows most similar (cosine) to each row, the row itself excluded.

    Similarities are computed a block of rows at a time (KNN_BLOCK_BYTES), so memory stays bounded
    while the cost is O(n^2 C).

    Args:
        x: (n, C) float; zero rows have cosine 0 with everything.
        k: 1 <= k <= n - 1.

    Returns:
        (n, k) int64 row indices, in no particular order. Which of several rows tied for the k-th
        place is kept is unspecified, but the same for the same input.
    """
    x = np.asarray(x, np.float32)
    n = len(x)
    if not 1 <= k <= n - 1:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} rows, got {k}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    out = np.empty((n, k), np.int64)
    rows = max(1, KNN_BLOCK_BYTES // (4 * n))
    for a in range(0, n, rows):
        sim = unit[a:a + rows] @ unit.T
        b = a + len(sim)
        sim[np.arange(b - a), np.arange(a, b)] = -np.inf
        out[a:b] = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    return out


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
