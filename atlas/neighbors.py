"""Neighbourhoods of images across layers: how much two layers agree on which images are alike.

Each image is represented by the L2-normalised mean of its samples' activations at a layer; its K
nearest other images by cosine are found at each layer, and the shared-neighbour fraction of two
layers is the mean over images of |kNN_A ∩ kNN_B| / K: 1 for the same neighbours, about
K / (n - 1) by chance.

Up to EXACT_MAX_IMAGES images the neighbours are exact (`nearest_neighbors`: every pair, a block of
rows at a time, O(n^2 C)). Above it they come from nearest-neighbour descent (`pynndescent`, which
umap-learn uses for its own graph; about O(n^1.2 C)), seeded and single-threaded so a run gives the
same neighbours every time, and the share of the exact neighbours it found is estimated on a
sample of rows (`neighbor_recall`). `find_neighbors` picks between them.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .blocks import iter_blocks, sum_by_cell

KNN_BLOCK_BYTES = 1 << 26  # similarity rows computed at a time: 64 MiB of float32
# Where the exact search stops (benchmarks/knn.py, 2 shared cores, 112 channels, K = 10): exact 11 s
# at 40,000 images, 46 s at 60,000 (it grows as n^2); the descent 2.7 s and 5.8 s (recall 0.990,
# 0.987) plus 22-50 s of numba JIT once per process. Compare searches at least two panels, so the
# descent pays off from about 50,000 images, and its lead grows with n (320,000: 40 s, recall 0.970).
EXACT_MAX_IMAGES = 50_000
DESCENT_NEIGHBORS = 30  # NN-descent's graph degree before it is cut to K (recall 0.98 at K = 10, 80,000 images)
RECALL_ROWS = 1000  # rows whose exact neighbours measure the approximate ones' recall
KNN_SEED = 0


@dataclasses.dataclass(frozen=True)
class Neighbors:
    """Each image's K nearest other images, and how they were found."""

    index: np.ndarray  # (n, k) int64 row indices, in no particular order
    method: str  # "exact" or "nn-descent"
    recall: float  # share of the exact neighbours found: 1.0 for exact, estimated for nn-descent
    recall_rows: int  # rows the recall was measured on (n for exact)


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


def approximate_neighbors(x: np.ndarray, k: int, seed: int = KNN_SEED, degree: int = DESCENT_NEIGHBORS
                          ) -> np.ndarray:
    """About the k rows most similar (cosine) to each row, the row itself excluded, by nearest-neighbour
    descent (pynndescent).

    The graph is built with `max(degree, k + 1)` neighbours per row (more than k: the descent finds
    the nearest ones more reliably in a larger graph), single-threaded and seeded, so the same input
    gives the same neighbours on any machine's thread count; each row keeps its k nearest other rows.
    A row the descent left short of k neighbours gets its exact ones.

    Args:
        x: (n, C) float; zero rows have cosine 0 with everything.
        k: 1 <= k <= n - 1.
        seed: the descent's random state.
        degree: the graph's neighbours per row (DESCENT_NEIGHBORS).

    Returns:
        (n, k) int64 row indices, in no particular order.
    """
    from pynndescent import NNDescent  # ~2 s to import, and 20-50 s of numba JIT on first use in a process

    unit = unit_rows(x)
    n = len(unit)
    _check_k(n, k)
    with warnings.catch_warnings():
        # Rows left with missing neighbours (-1) get their exact ones below.
        warnings.filterwarnings("ignore", message="Failed to correctly find n_neighbors")
        graph, _ = NNDescent(unit, metric="cosine", n_neighbors=min(n, max(degree, k + 1)), random_state=seed,
                             n_jobs=1, verbose=False).neighbor_graph
    out = np.empty((n, k), np.int64)
    short = []
    rows = 1 << 16
    for a in range(0, n, rows):
        part = graph[a:a + rows]
        # Rows come sorted by distance; keep the first k that are neither the row itself nor missing (-1).
        valid = (part >= 0) & (part != np.arange(a, a + len(part))[:, None])
        first = np.argsort(~valid, axis=1, kind="stable")[:, :k]
        out[a:a + len(part)] = np.take_along_axis(part, first, axis=1)
        short.append(a + np.flatnonzero(valid.sum(axis=1) < k))
    short = np.concatenate(short)
    if len(short):
        out[short] = _exact_rows(unit, short, k)
    return out


def neighbor_recall(x: np.ndarray, knn: np.ndarray, rows: int = RECALL_ROWS, seed: int = KNN_SEED
                    ) -> tuple[float, int]:
    """The share of the exact k nearest rows that `knn` holds, measured on a random sample of rows.

    Args:
        x: (n, C) the rows `knn` was found for.
        knn: (n, k) neighbour indices of every row, as from `approximate_neighbors`.
        rows: how many rows to check (all when n is smaller); costs O(rows n C).
        seed: picks the rows.

    Returns:
        (recall in [0, 1], rows checked).
    """
    unit = unit_rows(x)
    n, k = knn.shape
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False))
    exact = _exact_rows(unit, sample, k)
    hits = (np.asarray(knn)[sample][:, :, None] == exact[:, None, :]).any(axis=2).sum()
    return float(hits) / (len(sample) * k), len(sample)


def find_neighbors(x: np.ndarray, k: int, *, exact_max: int = EXACT_MAX_IMAGES, seed: int = KNN_SEED,
                   recall_rows: int = RECALL_ROWS) -> Neighbors:
    """Each row's k nearest other rows (cosine): exact up to `exact_max` rows, else by nearest-neighbour
    descent with its recall estimated on `recall_rows` rows.

    Args:
        x: (n, C) float, as from `image_embeddings`.
        k: 1 <= k <= n - 1.
        exact_max: the most rows whose neighbours are found exactly (EXACT_MAX_IMAGES).
        seed: the descent's random state and the recall sample's.
        recall_rows: rows whose exact neighbours measure the descent's recall.
    """
    unit = unit_rows(x)
    if len(unit) <= exact_max:
        return Neighbors(nearest_neighbors(unit, k), "exact", 1.0, len(unit))
    knn = approximate_neighbors(unit, k, seed)
    recall, checked = neighbor_recall(unit, knn, recall_rows, seed)
    return Neighbors(knn, "nn-descent", recall, checked)


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
