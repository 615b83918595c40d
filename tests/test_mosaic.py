"""Mosaic stage: exact placement and orientation, density scaling, preview patches, labels, the PNGs and skipping."""

import dataclasses
import json

import h5py
import numpy as np
import pytest
from PIL import Image
from toy_runs import toy_clusters, toy_config, write_activations, write_icons, write_layout

from atlas import grid as grid_mod
from atlas.config import MosaicConfig
from atlas.draw import patch_box, window_patch, wrap_label
from atlas.errors import AtlasError
from atlas.mosaic import cell_scale, compose_atlas, compose_mosaic, draw_labels, place_cells, run
from atlas.preview import mean_patch, member_cosine, pick_members
from atlas.store import FINGERPRINT_KEY, Grid, Run

WHITE = [255, 255, 255]


def solid(colour, side=4):
    return np.full((side, side, 3), colour, np.uint8)


# ---------------------------------------------------------------------------------------------
# Placement and composition


def test_place_cells_row_is_n_minus_1_minus_y_and_column_is_x():
    cells = np.array([[0, 0], [2, 1], [1, 2], [2, 2]])
    assert place_cells(cells, 3, 10).tolist() == [[0, 20], [20, 10], [10, 0], [20, 0]]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        place_cells(np.array([[3, 0]]), 3, 10)


def test_compose_mosaic_puts_the_top_row_first_and_leaves_empty_cells_white():
    cells = np.array([[0, 0], [1, 0], [1, 1]])  # bottom-left, bottom-right, top-right; top-left empty
    red, green, blue = [200, 0, 0], [0, 200, 0], [0, 0, 200]
    canvas = compose_mosaic([solid(red), solid(green, 7), solid(blue)], cells, 2, 4)
    assert canvas.shape == (8, 8, 3) and canvas.dtype == np.uint8
    assert (canvas[4:, :4] == red).all()  # y = 0 is the bottom row
    assert (canvas[4:, 4:] == green).all()  # a 7 px tile is resized to the 4 px cell
    assert (canvas[:4, 4:] == blue).all()  # y = N - 1 is the top row
    assert (canvas[:4, :4] == WHITE).all()  # no cell there


def test_none_tile_stays_white_and_tile_count_must_match():
    canvas = compose_mosaic([None, solid([1, 2, 3])], np.array([[0, 0], [1, 0]]), 2, 4)
    assert (canvas[4:, :4] == WHITE).all() and (canvas[4:, 4:] == [1, 2, 3]).all()
    with pytest.raises(ValueError, match="2 tiles for 1 cells"):
        compose_mosaic([None, None], np.array([[0, 0]]), 2, 4)


def test_cell_scale_is_floor_plus_sqrt_of_relative_count():
    scale = cell_scale(np.array([100, 25, 0, 1]), floor=0.2)
    np.testing.assert_allclose(scale, [1.0, 0.2 + 0.8 * 0.5, 0.2, 0.2 + 0.8 * 0.1])
    assert cell_scale(np.zeros(3)).tolist() == [1, 1, 1]
    with pytest.raises(ValueError):
        cell_scale(np.ones(2), floor=0)


def test_density_scaled_tiles_are_centred_smaller_squares():
    cells = np.array([[0, 0], [1, 0]])
    scale = cell_scale(np.array([16, 4]), floor=0.2)  # 1.0 and 0.2 + 0.8 * 0.5 = 0.6
    canvas = compose_mosaic([solid([9, 9, 9]), solid([7, 7, 7])], cells, 2, 10, scale)
    assert (canvas[10:, :10] == [9, 9, 9]).all()  # the busiest cell fills its square
    small = canvas[10:, 10:]  # 6 px side, offset (10 - 6) // 2 = 2
    assert (small[2:8, 2:8] == [7, 7, 7]).all()
    mask = np.ones((10, 10), bool)
    mask[2:8, 2:8] = False
    assert (small[mask] == WHITE).all()


# ---------------------------------------------------------------------------------------------
# Preview patches


def quadrants(side=224):
    """An image whose four quadrants are red (top left), green (top right), blue, yellow."""
    image = np.zeros((side, side, 3), np.uint8)
    h = side // 2
    image[:h, :h] = [255, 0, 0]
    image[:h, h:] = [0, 255, 0]
    image[h:, :h] = [0, 0, 255]
    image[h:, h:] = [255, 255, 0]
    return image


def test_patch_box_is_centred_on_the_position_with_a_side_of_map_strides():
    box = patch_box(np.array([[3, 3], [0, 13], [5, 2]]), (14, 14), 224, side=2.0)
    # stride 16: centre (y + .5) * 16, half side 16
    np.testing.assert_allclose(box, [[40, 40, 72, 72], [200, -8, 232, 24], [24, 72, 56, 104]])
    np.testing.assert_allclose(patch_box(np.array([[1, 1]]), (7, 14), 28, side=1.0), [[2, 4, 4, 8]])


def test_patch_of_a_solid_quadrant_has_its_colour():
    image = quadrants()
    boxes = patch_box(np.array([[3, 3], [3, 10], [10, 3], [10, 10]]), (14, 14), 224, side=2.0)
    for box, colour in zip(boxes, ([255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0])):
        patch, mask = window_patch(image, box, 16)
        assert mask.all()
        assert (patch == colour).all()


def test_patch_at_the_border_keeps_its_scale_and_leaves_the_outside_blank():
    image = quadrants()
    box = patch_box(np.array([[0, 0]]), (14, 14), 224, side=2.0)[0]  # (-8, -8, 24, 24)
    patch, mask = window_patch(image, box, 32)
    assert not mask[:8].any() and not mask[:, :8].any()
    assert mask[8:, 8:].all() and (patch[8:, 8:] == [255, 0, 0]).all()
    tile = mean_patch(patch[None], mask[None])
    assert (tile[:8] == WHITE).all() and (tile[8:, 8:] == [255, 0, 0]).all()


def test_mean_patch_averages_only_where_patches_cover():
    a = np.zeros((2, 2, 3))
    b = np.full((2, 2, 3), 100.0)
    masks = np.array([[[1, 1], [0, 0]], [[1, 0], [1, 0]]], bool)
    tile = mean_patch(np.stack([a, b]), masks)
    assert tile[0, 0].tolist() == [50] * 3 and tile[0, 1].tolist() == [0] * 3
    assert tile[1, 0].tolist() == [100] * 3 and tile[1, 1].tolist() == WHITE
    assert (mean_patch(np.zeros((0, 3, 3, 3))) == 255).all()


@pytest.mark.parametrize("shape", [(50, 37), (37, 50), (32, 32), (300, 200)])
def test_the_preprocess_crop_is_the_network_input_before_scaling(shape):
    from atlas.models import Preprocess

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    for interpolation in ("bilinear", "bicubic"):
        pre = Preprocess(size=28, resize=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4), interpolation=interpolation)
        expected = pre.to_pixels(pre(image)).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
        assert np.array_equal(np.asarray(pre.crop(image)), expected)


def test_pick_members_keeps_the_best_scored_per_cell_ties_to_the_earlier():
    indptr = np.array([0, 3, 3, 7])
    index = np.array([10, 11, 12, 20, 21, 22, 23])
    score = np.array([0.1, 0.9, 0.5, 0.3, 0.3, 0.8, 0.1])
    new_indptr, kept = pick_members(indptr, index, score, 2)
    assert new_indptr.tolist() == [0, 2, 2, 4]
    assert kept.tolist() == [11, 12, 22, 20]


def test_member_cosine_matches_a_direct_computation():
    rng = np.random.default_rng(1)
    acts = rng.random((12, 5)).astype(np.float32)
    index = np.array([0, 3, 4, 7, 8, 11])
    indptr = np.array([0, 2, 6])
    direction = rng.random((2, 5)).astype(np.float32)
    grid = Grid(4, np.array([[0, 0], [1, 0]], np.int32), np.array([2, 4], np.int32), direction, indptr, index)
    cell_of = np.repeat([0, 1], [2, 4])
    a, d = acts[index], direction[cell_of]
    expected = (a * d).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(d, axis=1)
    np.testing.assert_allclose(member_cosine(acts, grid), expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Labels


def test_labels_are_drawn_on_the_cells_that_have_one():
    cells = np.array([[0, 0], [1, 1]])
    canvas = compose_mosaic([solid([90, 90, 90]), solid([90, 90, 90])], cells, 2, 64)
    labelled = draw_labels(canvas, cells, 2, 64, ["great white shark", None])
    assert labelled.shape == canvas.shape
    assert not np.array_equal(labelled[64:, :64], canvas[64:, :64])  # bottom-left cell has text
    assert np.array_equal(labelled[:64, 64:], canvas[:64, 64:])  # no label, untouched
    assert np.array_equal(labelled[64:100, :64], canvas[64:100, :64])  # only the band at the bottom
    tiny = compose_mosaic([solid([90, 90, 90])], cells[:1], 2, 16)
    assert np.array_equal(draw_labels(tiny, cells[:1], 2, 16, ["tench"]), tiny)  # too small to label


def test_wrap_label_wraps_on_words_and_cuts_what_does_not_fit():
    measure = len  # one unit per character
    assert wrap_label("tench", measure, 10) == ["tench"]
    assert wrap_label("great white shark", measure, 11) == ["great white", "shark"]
    assert wrap_label("a b c d e f g h", measure, 3, max_lines=2) == ["a b", "c…"]
    assert wrap_label("hippopotamus", measure, 6) == ["hippo…"]


# ---------------------------------------------------------------------------------------------
# Stage

COLOURS = [[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]]
CELL_OF_CLUSTER = [(0, 0), (1, 0), (0, 1), (1, 1)]  # on the 2 x 2 grid


def make_run(tmp_path, mosaic=None, n_per=12):
    """A 2 x 2 grid whose cell k holds only samples of image k, a solid image of COLOURS[k]."""
    clusters = len(COLOURS)
    acts, labels = toy_clusters(clusters * n_per, 6, clusters, seed=0)  # label k = sample % 4 = its image
    rng = np.random.default_rng(0)
    attr = np.zeros((len(acts), 3), np.float32)
    attr[np.arange(len(acts)), labels % 3] = 1.0  # cell k's top class is k % 3
    config = toy_config(tmp_path, grid={"sizes": (2,), "min_count": 1, "top_classes": 2},
                        mosaic=MosaicConfig(**{"icon_px": 16, **(mosaic or {})}))
    write_activations(tmp_path, {"blocks.1": acts}, {"blocks.1": attr}, n_images=clusters,
                      class_names=["tench", "great white shark", "hen"],
                      paths=[f"sub/img{i}.png" for i in range(clusters)], yx={"blocks.1": rng.integers(0, 7, (len(acts), 2))},
                      preprocess={"size": 28, "resize": 32, "interpolation": "bilinear", "mean": [0.5] * 3,
                                  "std": [0.5] * 3})
    centres = np.array(CELL_OF_CLUSTER) * 0.5 + 0.25
    write_layout(config, {"blocks.1": centres[labels] + rng.uniform(-0.1, 0.1, (len(acts), 2))})
    (tmp_path / "images" / "sub").mkdir(parents=True)
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (40 + 10 * i, 30), tuple(colour)).save(tmp_path / "images" / "sub" / f"img{i}.png")
    grid_mod.run(config, log=lambda s: None)
    return config


def read_png(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), dict(image.text)


def cell_pixels(image, x, y, px=16, size=2):
    return image[(size - 1 - y) * px:(size - y) * px, x * px:(x + 1) * px]


def test_preview_shows_each_cell_in_the_colour_of_its_members_images(tmp_path):
    config = make_run(tmp_path)
    lines = []
    summary = run(config, log=lines.append)
    path = tmp_path / "blocks.1" / "atlas-preview-2.png"
    assert summary.written == [path] and summary.skipped_images == 0
    image, text = read_png(path)
    assert image.shape == (32, 32, 3)
    for (x, y), colour in zip(CELL_OF_CLUSTER, COLOURS):
        tile = cell_pixels(image, x, y)
        covered = (tile != 255).any(axis=2)  # border positions leave part of a tile blank (white)
        assert covered[4:12, 4:12].all()
        assert (tile[covered] == colour).all()
    assert text["atlas-layer"] == "blocks.1" and text["atlas-grid"] == "2" and text[FINGERPRINT_KEY]
    assert any(f"wrote {path} (4 cells, 32x32 px)" in line for line in lines)
    assert not (tmp_path / "blocks.1" / "atlas-2.png").exists()  # no icons yet


def test_up_to_date_images_are_skipped_and_changes_redraw_them(tmp_path):
    config = make_run(tmp_path)
    path = tmp_path / "blocks.1" / "atlas-preview-2.png"
    run(config, log=lambda s: None)
    stamp = path.stat().st_mtime_ns
    again = run(config, log=lambda s: None)
    assert again.written == [] and again.skipped == [path] and path.stat().st_mtime_ns == stamp
    assert run(config, force=True, log=lambda s: None).written == [path]
    bigger = dataclasses.replace(config, mosaic=dataclasses.replace(config.mosaic, icon_px=8))
    assert run(bigger, log=lambda s: None).written == [path]
    assert read_png(path)[0].shape == (16, 16, 3)
    no_preview = dataclasses.replace(config, mosaic=dataclasses.replace(config.mosaic, preview=False))
    assert run(no_preview, log=lambda s: None).written == []


def test_a_missing_source_image_is_left_out_not_a_crash(tmp_path):
    config = make_run(tmp_path)
    (tmp_path / "images" / "sub" / "img1.png").unlink()
    (tmp_path / "images" / "sub" / "img2.png").write_bytes(b"not a png")
    lines = []
    summary = run(config, log=lines.append)
    assert summary.skipped_images == 2
    assert any("2 of 4 source image(s) could not be read" in line for line in lines)
    image, _ = read_png(tmp_path / "blocks.1" / "atlas-preview-2.png")
    assert (cell_pixels(image, 1, 0) == WHITE).all() and (cell_pixels(image, 0, 1) == WHITE).all()
    assert (cell_pixels(image, 0, 0)[4:12, 4:12] == COLOURS[0]).all()


def icon_colour(k):
    return (10 * k, 100, 50)


def test_atlas_from_icons_and_stale_icons_are_refused(tmp_path):
    config = make_run(tmp_path, {"preview": False})
    store = Run(tmp_path, config)
    grid = store.grid("blocks.1", 2)
    assert run(config, log=lambda s: None).written == []  # not rendered yet: nothing to draw
    folder = write_icons(config, "blocks.1", grid, {(0, 0): icon_colour(0), (1, 0): icon_colour(1),
                                                    (1, 1): icon_colour(2)}, px=20)  # no icon for (0, 1)
    summary = run(config, log=lambda s: None)
    path = tmp_path / "blocks.1" / "atlas-2.png"
    assert summary.written == [path] and summary.missing_icons == 1  # (0, 1) has no icon: left white
    image, _ = read_png(path)
    assert (cell_pixels(image, 0, 0) == icon_colour(0)).all()  # a 20 px icon drawn at 16 px
    assert (cell_pixels(image, 1, 1) == icon_colour(2)).all() and (cell_pixels(image, 1, 0) == icon_colour(1)).all()
    assert (cell_pixels(image, 0, 1) == WHITE).all()
    assert run(config, log=lambda s: None).written == []
    good = (folder / "cell-1-0.png").read_bytes()
    (folder / "cell-1-0.png").write_bytes(good[:len(good) // 2])  # damaged: render must redo the folder
    with pytest.raises(AtlasError, match=r"icons-2 is incomplete \(an icon file is missing or unreadable\); "
                                         r"run `atlas render .*`, then mosaic"):
        run(config, log=lambda s: None)
    (folder / "cell-1-0.png").write_bytes(good)

    other = dataclasses.replace(config, render=dataclasses.replace(config.render, steps=7))
    write_icons(other, "blocks.1", grid, {(0, 0): icon_colour(3)}, px=20)  # rendered with other settings
    assert run(other, log=lambda s: None).written == [path]
    assert (cell_pixels(read_png(path)[0], 0, 0) == icon_colour(3)).all()
    with pytest.raises(AtlasError, match=r"icons-2 is out of date .*run `atlas render .*`, then mosaic"):
        run(config, log=lambda s: None)  # those icons are not the ones this config renders
    (folder / "cell-0-0.png").unlink()  # listed but gone: render must redo the folder
    with pytest.raises(AtlasError, match="atlas render"):
        run(other, log=lambda s: None)


def test_compose_atlas_places_icons_and_scales_sparse_cells():
    cells = np.array([[0, 0], [1, 1]])
    picture = compose_atlas([solid([200, 0, 0], 8), solid([0, 0, 200], 8)], cells, 2)
    assert picture.shape == (16, 16, 3)
    assert (picture[8:, :8] == [200, 0, 0]).all() and (picture[:8, 8:] == [0, 0, 200]).all()
    assert (picture[:8, :8] == WHITE).all()
    scaled = compose_atlas([solid([200, 0, 0], 8), solid([0, 0, 200], 8)], cells, 2, icon_px=10,
                           counts=np.array([1, 100]))
    assert scaled.shape == (20, 20, 3) and (scaled[0:10, 10:20] == [0, 0, 200]).all()
    assert (scaled[10:20, 0:10] == WHITE).any()  # the sparse cell's icon is smaller than its square


def test_labels_write_a_separate_labelled_image(tmp_path):
    config = make_run(tmp_path, {"labels": True, "icon_px": 48, "scale_by_density": True})
    summary = run(config, log=lambda s: None)
    folder = tmp_path / "blocks.1"
    assert summary.written == [folder / "atlas-preview-2.png", folder / "atlas-preview-2-labels.png"]
    plain, _ = read_png(folder / "atlas-preview-2.png")
    labelled, _ = read_png(folder / "atlas-preview-2-labels.png")
    assert plain.shape == labelled.shape == (96, 96, 3) and not np.array_equal(plain, labelled)
    assert run(config, log=lambda s: None).written == []


def test_missing_or_stale_inputs_are_one_line_errors(tmp_path):
    config = toy_config(tmp_path)
    with pytest.raises(AtlasError, match=r"activations.h5 not found; run `atlas collect .*`, then layout, grid, render, mosaic"):
        run(config, log=lambda s: None)
    config = make_run(tmp_path)
    stale = dataclasses.replace(config, grid=dataclasses.replace(config.grid, min_count=2))
    with pytest.raises(AtlasError, match=r"grid.h5 is out of date .*; run `atlas grid .*`, then render, mosaic"):
        run(stale, log=lambda s: None)
    elsewhere = dataclasses.replace(config, images=tmp_path / "nowhere")
    with pytest.raises(AtlasError, match="images folder .* does not exist"):
        run(elsewhere, log=lambda s: None)
    folder = write_icons(config, "blocks.1", Run(tmp_path, config).grid("blocks.1", 2), {(0, 0): icon_colour(0)})
    meta = json.loads((folder / "icons.json").read_text())
    meta["fingerprint"] = "made for another grid"
    (folder / "icons.json").write_text(json.dumps(meta))
    with pytest.raises(AtlasError, match="atlas render"):
        run(config, log=lambda s: None)


def test_labels_without_attribution_are_left_out_with_a_note(tmp_path):
    config = make_run(tmp_path, {"labels": True})
    with h5py.File(tmp_path / "grid.h5", "a") as h5:  # as a grid made without attribution
        del h5["blocks.1/2/top_class"]
    lines = []
    summary = run(config, log=lines.append)
    assert summary.written == [tmp_path / "blocks.1" / "atlas-preview-2.png"]
    assert any("no class labels" in line for line in lines)
    assert run(config, log=lambda s: None).written == []


def test_automatic_icon_sizes_are_drawn_at_one_tile_size(tmp_path):
    # render.icon_size = 0 gives each layer its own icon side; the atlas keeps one geometry (64 px cells)
    config = make_run(tmp_path, {"preview": False, "icon_px": 0})
    config = dataclasses.replace(config, render=dataclasses.replace(config.render, icon_size=0))
    grid = Run(tmp_path, config).grid("blocks.1", 2)
    write_icons(config, "blocks.1", grid, {(0, 0): icon_colour(0), (1, 1): icon_colour(2)}, px=40)
    run(config, log=lambda s: None)
    image, _ = read_png(tmp_path / "blocks.1" / "atlas-2.png")
    assert image.shape == (2 * 64, 2 * 64, 3)
    assert (image[64:, :64] == icon_colour(0)).all() and (image[:64, 64:] == icon_colour(2)).all()
