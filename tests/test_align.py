"""Aligning layer layouts on image centroids (atlas.align)."""

import numpy as np
import pytest

from atlas.align import align_layouts, centroid_distance, fit_similarity, image_centroids
from atlas.layout import normalize_layout


def unit(xy):
    """Scales each axis to [0, 1] without clipping."""
    return normalize_layout(xy, clip_percentile=0, margin=0)


def toy_layout(n_images=40, per_image=5, seed=0):
    """Samples scattered around a centroid per image, scaled into [0, 1]."""
    rng = np.random.default_rng(seed)
    centres = rng.random((n_images, 2))
    image = np.repeat(np.arange(n_images), per_image)
    xy = centres[image] + 0.03 * rng.standard_normal((len(image), 2))
    return unit(xy).astype(np.float64), image


def test_centroids_are_the_mean_of_each_images_samples():
    xy = np.array([[0.0, 0.0], [1.0, 1.0], [0.5, 0.2]])
    got = image_centroids(xy, np.array([0, 0, 2]), 4)
    assert np.allclose(got[0], [0.5, 0.5]) and np.allclose(got[2], [0.5, 0.2])
    assert np.isnan(got[1]).all() and np.isnan(got[3]).all()


def test_a_rotated_mirrored_copy_is_aligned_back_exactly():
    xy, image = toy_layout()
    theta = np.deg2rad(73)
    turn = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    mirrored = (xy * [-1, 1]) @ turn * 2.5 + [3.0, -1.0]
    aligned, moves = align_layouts([xy, mirrored], [image, image], 40)
    assert moves[0] is None and moves[1].reflects
    assert np.allclose(aligned[0], xy) and np.abs(aligned[1] - xy).max() < 1e-5
    assert centroid_distance(aligned[0], image, aligned[1], image, 40) < 1e-5
    assert centroid_distance(xy, image, mirrored, image, 40) > 0.1


def test_alignment_follows_images_not_sample_order_and_keeps_neighbourhoods():
    xy, image = toy_layout(seed=1)
    rng = np.random.default_rng(2)
    order = rng.permutation(len(xy))  # other samples, in another order, of the same images
    other = unit(np.c_[xy[order, 1], xy[order, 0]] + 0.01 * rng.standard_normal((len(xy), 2)))
    aligned, _ = align_layouts([xy, other], [image, image[order]], 40)
    assert centroid_distance(xy, image, aligned[1], image[order], 40) < 0.02
    # a similarity transform keeps each sample's nearest neighbour
    def nearest(points):
        d = np.linalg.norm(points[:, None] - points[None], axis=2)
        np.fill_diagonal(d, np.inf)
        return d.argmin(1)
    assert (nearest(aligned[1]) == nearest(other)).mean() > 0.95


def test_fit_similarity_needs_three_shared_images():
    with pytest.raises(ValueError, match="at least 3 images"):
        fit_similarity(np.array([[0.0, 0], [1, 1], [np.nan, 0]]), np.array([[0.0, 0], [1, 1], [2, 2]]))
    with pytest.raises(ValueError, match="nothing to align"):
        fit_similarity(np.ones((4, 2)), np.random.default_rng(0).random((4, 2)))
