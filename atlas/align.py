"""Aligning the layouts of a run's layers, so that an image's samples land in nearby places from one
layer to the next and a region of one atlas can be followed into the next.

Each layer's layout is made on its own (UMAP's axes, rotation and mirror image are arbitrary), then
every layer after the first is moved by the rotation or reflection and shift that best carry each
image's centroid onto that image's centroid in the layer before it (orthogonal Procrustes), scaled
so the map keeps the size of the layer before's, then brought back inside [0, 1] by the caller (atlas.layout's
`fit_inside`: one scale for both axes, only when needed). A similarity transform keeps every
neighbourhood of the layout, so the layout's trustworthiness is unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def image_centroids(xy: np.ndarray, image: np.ndarray, n_images: int) -> np.ndarray:
    """The mean position of each image's samples.

    Args:
        xy: (n, 2) float positions.
        image: (n,) int image index of each sample, in [0, n_images).
        n_images: images in the run.

    Returns:
        (n_images, 2) float64; NaN for an image without samples.
    """
    xy = np.asarray(xy, np.float64)
    image = np.asarray(image, np.int64)
    sums = np.stack([np.bincount(image, weights=xy[:, k], minlength=n_images) for k in range(2)], 1)
    counts = np.bincount(image, minlength=n_images)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts[:, None]


@dataclasses.dataclass(frozen=True)
class Similarity:
    """x -> scale * x @ rotation + shift: rotation (2, 2) orthogonal (a reflection when its
    determinant is -1), scale > 0, shift (2,)."""

    rotation: np.ndarray
    scale: float
    shift: np.ndarray

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        return self.scale * np.asarray(xy, np.float64) @ self.rotation + self.shift

    @property
    def reflects(self) -> bool:
        return bool(np.linalg.det(self.rotation) < 0)


def fit_similarity(source: np.ndarray, target: np.ndarray, scale: float | None = None) -> Similarity:
    """The similarity transform (reflection allowed) that minimises the squared distances from the
    moved source points to the target points (orthogonal Procrustes, by SVD).

    Args:
        source, target: (m, 2) float matched points; rows with NaN in either are left out.
        scale: use this scale (the rotation and shift are then the best for it); None = the
            least-squares scale, which shrinks towards the target's mean as the two disagree (to
            0.03 between the demo's blocks.10 and blocks.15: every distance small, the map a dot).

    Raises:
        ValueError: fewer than 3 matched points, or all source points the same.
    """
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    keep = np.isfinite(source).all(1) & np.isfinite(target).all(1)
    a, b = source[keep], target[keep]
    if len(a) < 3:
        raise ValueError(f"aligning needs at least 3 images with samples in both layouts, got {len(a)}")
    ma, mb = a.mean(0), b.mean(0)
    a0, b0 = a - ma, b - mb
    spread = float((a0 ** 2).sum())
    if spread == 0:
        raise ValueError("every source point is the same; there is nothing to align")
    u, sigma, vt = np.linalg.svd(a0.T @ b0)
    rotation = u @ vt
    scale = float(sigma.sum() / spread) if scale is None else float(scale)
    return Similarity(rotation, scale, mb - scale * ma @ rotation)


def align_layouts(layouts: Sequence[np.ndarray], images: Sequence[np.ndarray], n_images: int
                  ) -> tuple[list[np.ndarray], list[Similarity | None]]:
    """Aligns each layout to the (aligned) one before it on the images' centroids: the rotation or
    mirror and shift of `fit_similarity`, with the scale that keeps the centroids' spread equal
    (`match_spread`), so an aligned map is as large as the one before it.

    Args:
        layouts: per layer (n_l, 2) float positions in [0, 1].
        images: per layer (n_l,) int image index of each sample.
        n_images: images in the run.

    Returns:
        The aligned (n_l, 2) float64 layouts (the first unchanged; the others in the first one's
        frame, which may reach outside [0, 1]: scale them back with
        `layout.normalize_layout(xy, 0, 0)`), and per layer the transform applied (None for the first).
    """
    aligned = [np.asarray(layouts[0], np.float64)] if len(layouts) else []
    moves: list[Similarity | None] = [None] if len(layouts) else []
    for xy, image, previous, previous_image in zip(layouts[1:], images[1:], aligned, images):
        size = np.sqrt(_spread(previous) / max(_spread(xy), 1e-300))
        move = fit_similarity(image_centroids(xy, image, n_images), image_centroids(previous, previous_image, n_images),
                              scale=size)
        aligned.append(move(xy))
        moves.append(move)
    return aligned, moves


def _spread(xy: np.ndarray) -> float:
    """Mean squared distance of the points from their mean."""
    xy = np.asarray(xy, np.float64)
    return float(((xy - xy.mean(0)) ** 2).sum(1).mean())


def centroid_distance(xy_a: np.ndarray, image_a: np.ndarray, xy_b: np.ndarray, image_b: np.ndarray,
                      n_images: int) -> float:
    """The median over images (with samples in both) of the distance between the image's centroids
    in two layouts, in [0, 1] map units; NaN when no image is in both."""
    gap = np.linalg.norm(image_centroids(xy_a, image_a, n_images) - image_centroids(xy_b, image_b, n_images), axis=1)
    gap = gap[np.isfinite(gap)]
    return float(np.median(gap)) if len(gap) else float("nan")
