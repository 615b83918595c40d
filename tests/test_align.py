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


# ---------------------------------------------------------------------------------------------
# The layout stage with layout.align (atlas.layout.align_layer_maps)


def image_curve(n_images=24, per_image=10, channels=8, seed=0):
    """Two layers' samples, row i of image i % n_images, the images' clusters along a curve; the
    second layer is a fixed non-linear map of the first, so UMAP lays it out in another frame."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, n_images)
    centres = np.stack([np.cos(2.5 * t), np.sin(2.5 * t), t], 1) @ rng.random((3, channels)) + 0.2
    image = np.arange(n_images * per_image) % n_images
    first = np.abs(centres[image] + 0.02 * rng.standard_normal((len(image), channels)))
    second = np.exp(first @ rng.random((channels, 6)))
    return first.astype(np.float32), second.astype(np.float32)


def test_layout_stage_aligns_layers_and_keeps_what_placing_needs(tmp_path):
    from toy_runs import toy_config, write_activations

    from atlas import layout as layout_stage
    from atlas.errors import AtlasError
    from atlas.focus import class_threshold
    from atlas.store import Run

    first, second = image_curve()
    n = len(first)
    labels = np.arange(n) % 24 % 3
    attr = np.eye(3, dtype=np.float32)[labels] + 0.01 * np.arange(n)[:, None] / n
    config = toy_config(tmp_path, layers=("blocks.1", "blocks.2"),
                        layout={"backend": "torchdr", "device": "cpu", "n_neighbors": 8, "fit_samples": 150,
                                "trust_samples": 200, "align": True, "classes": ("b",), "pairs": (("a", "c"),),
                                "class_top": 20, "focus_layers": ("blocks.2",)})
    write_activations(tmp_path, {"blocks.1": first, "blocks.2": second}, {"blocks.1": attr, "blocks.2": attr},
                      n_images=24, class_names=["a", "b", "c"], config=config)
    lines = []
    layout_stage.run(config, log=lines.append)
    aligned_line = next(line for line in lines if line.startswith("layout: aligned blocks.2 to blocks.1"))
    assert "median image-centroid distance" in aligned_line and "trustworthiness" in aligned_line

    store = Run(tmp_path, config)
    layout = store.layout(placement=True)
    one, two = layout.maps["blocks.1"], layout.maps["blocks.2"]
    assert one.info["aligned"] and one.info["align_to"] == "" and "align_rotation" not in one.info
    assert two.info["aligned"] and two.info["align_to"] == "blocks.1"
    assert np.allclose(np.asarray(two.info["align_rotation"]) @ np.asarray(two.info["align_rotation"]).T, np.eye(2))
    assert two.info["centroid_distance_aligned"] < 0.6 * two.info["centroid_distance_independent"]
    assert abs(two.info["trustworthiness"] - two.info["trustworthiness_independent"]) < 0.01  # one scale: kept
    assert centroid_distance(one.xy, np.arange(n) % 24, two.xy, np.arange(n) % 24, 24) == pytest.approx(
        two.info["centroid_distance_aligned"])
    assert 0 <= two.xy.min() and two.xy.max() <= 1

    # the kept fit samples, taken through the recorded steps, land exactly where the stage put them
    from atlas.layout import map_positions

    a16 = attr.astype(np.float16).astype(np.float32)
    for name, m in layout.maps.items():
        kept = m.placement
        assert kept is not None and len(kept.fit_rows) <= 150 and kept.pca_mean is None
        own = kept.fit_rows if m.rows is None else np.searchsorted(m.rows, kept.fit_rows)
        diff = a16[kept.fit_rows, 2] - a16[kept.fit_rows, 0] if m.info.get("kind") == "pair" else None
        np.testing.assert_array_equal(map_positions(kept.fit_raw, m.info, diff), m.xy[own], err_msg=name)
        assert not m.info.get("align_to") if "/" in name else True  # focus maps stay as laid out
    assert layout.maps["blocks.2/class-b"].info["class_threshold"] == [class_threshold(a16[:, 1], 20)]

    # without align the same stage redoes the layout; the aligned file is refused as stale
    plain = toy_config(tmp_path, layers=config.layers, layout={**vars(config.layout), "align": False})
    with pytest.raises(AtlasError, match="layout.h5 is out of date .*run `atlas layout"):
        Run(tmp_path, plain).layout()
    lines.clear()
    layout_stage.run(plain, log=lines.append)
    assert any(line.startswith("layout: blocks.1 -> blocks.2: median image-centroid distance") for line in lines)
    info = Run(tmp_path, plain).layout().maps["blocks.2"].info
    assert not info["aligned"] and "centroid_distance_aligned" not in info
