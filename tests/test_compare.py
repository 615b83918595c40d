"""`atlas compare` on toy runs: exact figures from the pure cores, the figure and its JSON, one-line errors."""

import dataclasses
import json
import math
import shutil

import h5py
import numpy as np
import pytest
from PIL import Image
from toy_runs import toy_clusters, toy_config, write_activations, write_icons, write_layout

from atlas import blocks
from atlas import compare as compare_mod
from atlas import grid as grid_mod
from atlas.cli import build_parser
from atlas.compare import _common_images, _Opened, centroid_links, compare_runs, farthest_points, mean_or_nan, \
    sample_top_classes, top_class_shares
from atlas.compare_figure import FOLLOW_COLOURS, GUTTER_PX, MARGIN, PANEL_PX, PanelFigures, compose_figure, figure_boxes
from atlas.config import save_config
from atlas.errors import AtlasError
from atlas.focus import MapSpec, class_scores
from atlas.neighbors import (approximate_neighbors, effective_neighbors, find_neighbors, image_embeddings,
                             nearest_neighbors, neighbor_recall, shared_neighbor_fraction, shared_neighbor_matrix)
from atlas.store import Run

NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]


# ---------------------------------------------------------------------------------------------
# Pure cores: top-class share


def test_top_class_shares_exact():
    indptr = np.array([0, 3, 5, 6, 6])
    index = np.array([0, 1, 2, 3, 4, 5])
    sample_top = np.array([2, 2, 1, 0, 1, 3])
    cell_top = np.array([2, 1, 0, 4])
    shares = top_class_shares(indptr, index, cell_top, sample_top)
    assert shares[:3].tolist() == [2 / 3, 1 / 2, 0.0]
    assert math.isnan(shares[3])  # a cell without members
    assert mean_or_nan(shares) == pytest.approx(7 / 18)  # unweighted over the cells that have members
    assert math.isnan(mean_or_nan(np.array([])))


def test_sample_top_classes_in_blocks():
    attr = np.array([[0.1, 0.5, 0.2], [1.0, -1.0, 0.0], [0.0, 0.0, 0.25], [0.5, 0.5, 0.0], [-3, -2, -1]],
                    np.float16)
    assert sample_top_classes(attr).tolist() == [1, 0, 2, 0, 2]  # ties: the lower class
    assert class_scores(attr, (), rows=2)[0].tolist() == [1, 0, 2, 0, 2]  # read two rows at a time


# ---------------------------------------------------------------------------------------------
# Pure cores: neighbourhoods


def _angles(degrees):
    rad = np.radians(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


def _sets(knn):
    return [set(row.tolist()) for row in knn]


def test_effective_neighbors():
    assert [effective_neighbors(n, 10) for n in (0, 1, 2, 5, 11, 12, 500)] == [0, 0, 1, 4, 10, 10, 10]


def test_image_embeddings_are_unit_means():
    acts = np.array([[1, 0], [3, 0], [0, 2], [1, 1], [1, 3], [1, 2]], np.float32)
    image = np.array([0, 0, 1, 2, 2, 2])
    emb = image_embeddings(acts, image, np.array([2, 0, 5]))
    assert emb.shape == (3, 2) and emb.dtype == np.float32
    np.testing.assert_allclose(emb[0], np.array([3, 6]) / np.sqrt(45), rtol=1e-6)  # mean (1, 2), normalised
    np.testing.assert_allclose(emb[1], [1, 0])
    assert (emb[2] == 0).all()  # image 5 has no samples


def test_image_embeddings_across_blocks(monkeypatch):
    rng = np.random.default_rng(3)
    acts = rng.random((50, 4)).astype(np.float16)
    image = rng.integers(0, 9, 50)  # an image's samples spread over several blocks
    listed = np.array([7, 2, 0, 5, 8])  # samples of images 1, 3, 4, 6 belong to no listed image
    expected = np.stack([acts[image == i].astype(np.float64).sum(axis=0) for i in listed])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 4 * 4 * 3)  # 3 rows a block
    np.testing.assert_allclose(image_embeddings(acts, image, listed), expected, rtol=1e-6)


def _full_matrix_neighbors(x, k):
    """The reference k-NN: the whole (n, n) cosine matrix in float64, sorted."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit.astype(np.float64) @ unit.T.astype(np.float64)
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("block_bytes", [1, 4 * 150 * 7, 1 << 26])  # 1 row, 7 rows (uneven last block), all
def test_blocked_exact_equals_full_matrix(block_bytes):
    x = np.random.default_rng(2).standard_normal((150, 6)).astype(np.float32)  # no ties
    for k in (1, 7, 149):
        assert _sets(nearest_neighbors(x, k, block_bytes)) == _sets(_full_matrix_neighbors(x, k))


def test_nearest_neighbors_hand_case():
    a = _angles([0, 10, 90, 100])
    assert nearest_neighbors(a, 1).ravel().tolist() == [1, 0, 3, 2]
    assert _sets(nearest_neighbors(a, 2)) == [{1, 2}, {0, 2}, {3, 1}, {2, 1}]
    assert _sets(nearest_neighbors(a * 5, 3)) == [{1, 2, 3}, {0, 2, 3}, {0, 1, 3}, {0, 1, 2}]  # k = n - 1: all
    with pytest.raises(ValueError):
        nearest_neighbors(a, 4)


def test_shared_neighbor_fraction_hand_case():
    a = _angles([0, 10, 90, 100])  # neighbours 1, 0, 3, 2
    b = _angles([0, 90, 10, 100])  # neighbours 2, 3, 0, 1: none shared with a
    c = _angles([0, 10, 25, 90])  # neighbours 1, 0, 1, 2
    assert shared_neighbor_fraction(nearest_neighbors(a, 1), nearest_neighbors(b, 1)) == 0.0
    assert shared_neighbor_fraction(nearest_neighbors(a, 1), nearest_neighbors(c, 1)) == 0.75
    # k = 2: a {1,2} {0,2} {1,3} {1,2}; c {1,2} {0,2} {0,1} {1,2}: 2 + 2 + 1 + 2 of 8
    assert shared_neighbor_fraction(nearest_neighbors(a, 2), nearest_neighbors(c, 2)) == 7 / 8
    assert math.isnan(shared_neighbor_fraction(np.zeros((0, 3), int), np.zeros((0, 3), int)))


def test_identical_layers_share_all_random_ones_few():
    rng = np.random.default_rng(0)
    x = rng.random((200, 8)).astype(np.float32)
    knn = nearest_neighbors(x, 10)
    assert shared_neighbor_fraction(knn, nearest_neighbors(x * 4, 10)) == 1.0  # cosine ignores length
    other = nearest_neighbors(rng.standard_normal((200, 8)).astype(np.float32), 10)
    assert shared_neighbor_fraction(knn, other) < 0.2  # chance is 10 / 199 = 0.05
    assert shared_neighbor_fraction(nearest_neighbors(x, 199), nearest_neighbors(-x, 199)) == 1.0  # k = n - 1


def test_find_neighbors_is_exact_up_to_the_threshold():
    x = np.random.default_rng(4).standard_normal((60, 5)).astype(np.float32)
    found = find_neighbors(x, 4, exact_max=60)
    assert (found.method, found.recall, found.recall_rows) == ("exact", 1.0, 60)
    assert _sets(found.index) == _sets(_full_matrix_neighbors(x, 4))


def test_approximate_neighbors_keeps_k_others_and_fills_short_rows(monkeypatch):
    import pynndescent

    seen = {}

    class Descent:  # the graph pynndescent might return: sorted by distance, self anywhere, -1 when missing
        def __init__(self, data, **kwargs):
            seen.update(kwargs, rows=len(data))
            self.neighbor_graph = (np.array([[0, 1, 5], [2, 1, 0], [-1, 2, -1], [3, 4, 2], [4, -1, 3], [5, 4, 0]]),
                                   None)

    monkeypatch.setattr(pynndescent, "NNDescent", Descent)
    x = _angles([0, 10, 30, 100, 110, 350])
    knn = approximate_neighbors(x, 2, seed=7, degree=3)
    assert seen == {"metric": "cosine", "n_neighbors": 3, "random_state": 7, "n_jobs": 1, "verbose": False,
                    "rows": 6}
    assert knn[[0, 1, 3, 5]].tolist() == [[1, 5], [2, 0], [4, 2], [4, 0]]
    assert _sets(knn[[2, 4]]) == [{1, 0}, {3, 2}]  # rows left short by the descent: their exact neighbours


# The descent's first use in a process compiles pynndescent with numba: 20-50 s on 2 shared cores.
@pytest.mark.slow
def test_approximate_neighbors_against_exact():
    x, _ = toy_clusters(3000, 16, 30, seed=5, spread=0.3)
    exact = _full_matrix_neighbors(x, 10)
    approx = approximate_neighbors(x, 10)
    assert approx.shape == (3000, 10) and approx.dtype == np.int64
    assert all(len(set(row)) == 10 and i not in row for i, row in enumerate(approx.tolist()))
    recall = shared_neighbor_fraction(approx, exact)
    assert recall > 0.95
    np.testing.assert_array_equal(approximate_neighbors(x, 10), approx)  # seeded: the same every time
    estimate, rows = neighbor_recall(x, approx, rows=500)
    assert rows == 500 and abs(estimate - recall) < 0.03
    assert neighbor_recall(x, exact, rows=500)[0] == 1.0
    found = find_neighbors(x, 10, exact_max=2999, recall_rows=500)
    assert found.method == "nn-descent" and found.recall == estimate and found.recall_rows == 500
    np.testing.assert_array_equal(found.index, approx)


def test_shared_neighbor_matrix():
    a, c = nearest_neighbors(_angles([0, 10, 90, 100]), 1), nearest_neighbors(_angles([0, 10, 25, 90]), 1)
    m = shared_neighbor_matrix([a, c, a])
    np.testing.assert_array_equal(m, [[1, 0.75, 1], [0.75, 1, 0.75], [1, 0.75, 1]])
    assert np.isnan(shared_neighbor_matrix([None, None])).all()


# ---------------------------------------------------------------------------------------------
# Pure core: the figure


def test_figure_boxes_row_and_wrap():
    (h, w), images, gutters = figure_boxes(2, header_lines=2)
    assert gutters[0] is None and images[0][0] == MARGIN  # one row: no leading gutter
    assert gutters[1] == (images[0][2], images[1][1], images[1][0], images[1][3])
    assert w == 2 * MARGIN + 2 * PANEL_PX + GUTTER_PX
    (h5, w5), images, gutters = figure_boxes(5, header_lines=2, columns=4)
    assert w5 == 2 * MARGIN + 4 * PANEL_PX + 4 * GUTTER_PX and h5 > 2 * PANEL_PX
    assert images[4][0] == images[0][0] and images[4][1] > images[3][3]  # wraps to a second row
    assert gutters[4][0] == MARGIN and gutters[4][2] == images[4][0]  # its gutter starts the row
    assert all(right - left == PANEL_PX and bottom - top == PANEL_PX for left, top, right, bottom in images)


def test_compose_figure_draws_each_panel():
    colours = [(200, 30, 30), (30, 30, 200), (30, 160, 30)]
    pictures = [np.full((8 * (k + 1), 8 * (k + 1), 3), c, np.uint8) for k, c in enumerate(colours)]
    figure = compose_figure(["a header"], ["a", "b", "c"], pictures, [["line"]] * 3, [0.5, float("nan")])
    (h, w), boxes, _ = figure_boxes(3, header_lines=1)
    assert figure.shape == (h, w, 3)
    for (left, top, right, bottom), colour in zip(boxes, colours):
        assert (figure[top:bottom, left:right] == colour).all()  # scaled to fill the panel exactly


# ---------------------------------------------------------------------------------------------
# A toy run: layers blocks.1 and blocks.2 (the same activations, doubled), 4 clusters in the corners
# of the layout, 12 images of 8 samples; image j holds samples j, j + 12, ... all of cluster j % 4.

RED, BLUE, GREEN = (200, 30, 30), (30, 30, 200), (30, 160, 30)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("compare-run")
    n, n_images = 96, 12
    acts, cluster = toy_clusters(n, 6, 4, seed=0)
    attr1 = np.eye(len(NAMES), dtype=np.float32)[cluster]
    attr1[np.arange(n) % 16 == 0] = np.eye(len(NAMES))[4]  # 6 of cluster 0's 24 samples say class 4
    attr2 = np.eye(len(NAMES), dtype=np.float32)[cluster]
    config = toy_config(run_dir, layers=("blocks.1", "blocks.2"), grid={"sizes": (4, 2), "min_count": 2})
    write_activations(run_dir, {"blocks.1": acts, "blocks.2": acts * 2}, {"blocks.1": attr1, "blocks.2": attr2},
                      n_images=n_images, class_names=NAMES)
    rng = np.random.default_rng(1)
    corners = np.array([[0.05, 0.05], [0.95, 0.05], [0.05, 0.95], [0.95, 0.95]])
    xy = corners[cluster] + 0.01 * rng.random((n, 2))
    write_layout(config, {"blocks.1": xy, "blocks.2": xy},
                 {"blocks.1": {"trustworthiness": 0.9}})  # blocks.2 has none: "not measured"
    save_config(config)
    grid_mod.run(config, log=lambda s: None)
    store = Run(run_dir, config)
    grid_fp = store.grid_fingerprint()
    for layer, size, kind, colour in (("blocks.1", 4, "atlas", RED), ("blocks.1", 2, "atlas", GREEN),
                                      ("blocks.2", 4, "preview", BLUE)):
        grid = store.grid(layer, size)
        picture = np.full((16, 16, 3), colour, np.uint8)
        if kind == "atlas":
            write_icons(config, layer, grid, {tuple(c): colour for c in grid.cell.tolist()})
            spec = MapSpec(layer, layer)
            store.write_picture(picture, store.atlas_png(layer, size),
                                store.atlas_png_fingerprint(spec, grid, grid_fp, store.icons(spec, grid)))
        else:
            store.write_picture(picture, store.preview_png(layer, size),
                                store.preview_png_fingerprint(MapSpec(layer, layer), grid, grid_fp))
    return run_dir


def _copy(run_dir, dest):
    shutil.copytree(run_dir, dest)
    return dest  # its config.toml names the old run_dir; a run directory finds itself


def _panel_colour(png, n_panels, k):
    figure = np.asarray(Image.open(png).convert("RGB"))
    lines = next(h for h in (1, 2, 3, 4) if figure_boxes(n_panels, h)[0] == figure.shape[:2])
    left, top, right, bottom = figure_boxes(n_panels, lines)[1][k]
    return tuple(int(v) for v in figure[(top + bottom) // 2, (left + right) // 2])


def test_compare_one_run(toy_run, tmp_path, capsys):
    out = tmp_path / "c.png"
    result = compare_runs([toy_run], neighbors=2, out=out)
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["grid"] == 4 and info["images"] == 12 and info["neighbors_used"] == 2
    assert info["chance"] == pytest.approx(2 / 11)
    p1, p2 = info["panels"]
    assert (p1["label"], p1["kind"], p2["label"], p2["kind"]) == ("blocks.1", "icons", "blocks.2", "preview")
    assert p1["cells_kept"] == p2["cells_kept"] == 4 and p1["samples"] == 96 and p1["samples_kept"] == 96
    assert p1["channels"] == 6 and p1["map_hw"] == [7, 7]
    assert p1["trustworthiness"] == pytest.approx(0.9) and p2["trustworthiness"] is None
    assert p1["mean_top_class_share"] == 0.9375 and p2["mean_top_class_share"] == 1.0  # (18/24 + 3) / 4
    assert info["shared_neighbors"]["matrix"] == [[1.0, 1.0], [1.0, 1.0]]  # doubled acts: same neighbours
    # Each image's samples sit in one corner on both maps: its centroid does not move, and two
    # shuffled images are mostly in different corners. The toy layouts are not aligned.
    (link,) = info["consecutive"]
    assert (link["from"], link["to"], link["fraction"], link["centroid_distance"]) == ("blocks.1", "blocks.2", 1.0, 0.0)
    assert link["centroid_distance_chance"] > 0.5 and link["centroid_distance_unaligned"] is None
    followed = info["followed"]
    assert len(followed) == 4  # the default: one image in each corner, the same place on both panels
    corners = {tuple(round(v) for v in f["xy"][0]) for f in followed}
    assert corners == {(0, 0), (1, 0), (0, 1), (1, 1)} and all(f["xy"][0] == f["xy"][1] for f in followed)
    assert info["knn"] == {"method": "exact", "exact_max_images": 50_000, "seed": 0, "recall_rows": 12,
                           "recall": [1.0, 1.0]}
    assert result.shared.shape == (2, 2)
    assert _panel_colour(out, 2, 0) == RED and _panel_colour(out, 2, 1) == BLUE
    for k, f in enumerate(followed):  # marker k + 1 drawn in its colour where the image lies
        for panel in (0, 1):
            x, y = _panel_point(out, 2, panel, f["xy"][panel])
            figure = np.asarray(Image.open(out).convert("RGB"))
            assert tuple(int(v) for v in figure[y, x - 7]) == FOLLOW_COLOURS[k]
    text = capsys.readouterr().out
    assert "blocks.1 -> blocks.2: 1.000; image centroids 0.000 apart (chance" in text
    assert f"wrote {out} and c.json" in text and "markers 1-4" in text
    assert "0.938" in text and "not" not in text.splitlines()[1]


def _panel_point(png, n_panels, k, xy):
    """The figure pixel (x, y) of a layout position on panel k."""
    figure = np.asarray(Image.open(png).convert("RGB"))
    lines = next(h for h in (1, 2, 3, 4) if figure_boxes(n_panels, h)[0] == figure.shape[:2])
    left, top, right, bottom = figure_boxes(n_panels, lines)[1][k]
    return round(left + xy[0] * PANEL_PX), round(top + (1 - xy[1]) * PANEL_PX)


def test_follow_option(toy_run, tmp_path):
    none = compare_runs([toy_run], out=tmp_path / "f0.png", follow=0, log=lambda s: None)
    assert none.followed == [] and json.loads((tmp_path / "f0.json").read_text())["followed"] == []
    two = compare_runs([toy_run], out=tmp_path / "f2.png", follow=2, log=lambda s: None)
    assert len(two.followed) == 2 and len(set(two.followed)) == 2
    (a, b) = two.follow_xy[0]
    assert np.linalg.norm(a - b) > 1.2  # spread: opposite corners
    with pytest.raises(AtlasError, match="--follow must be between 0 and 8"):
        compare_runs([toy_run], out=tmp_path / "f9.png", follow=9, log=lambda s: None)


def test_farthest_points_spread_and_skip_nan():
    xy = np.array([[0.5, 0.5], [0.0, 0.0], [np.nan, 0.2], [1.0, 1.0], [0.1, 0.0], [1.0, 0.0]])
    picked = farthest_points(xy, 3)
    assert set(picked.tolist()) == {1, 3, 5} and 2 not in farthest_points(xy, 5)
    assert len(farthest_points(xy, 10)) == 5 and len(farthest_points(np.full((3, 2), np.nan), 2)) == 0


def test_centroid_links_chance_and_alignment():
    rng = np.random.default_rng(0)
    a = rng.random((200, 2))
    panels = [PanelFigures("r", "l1", "l1", "x.png", "icons", 4, None, 10, 4, 4, 10, 0.9, 0.5, aligned_to=""),
              PanelFigures("r", "l2", "l2", "y.png", "icons", 4, None, 10, 4, 4, 10, 0.9, 0.5, previous_layer="l1",
                           aligned_to="l1", centroid_distance_independent=0.4)]
    same, moved = centroid_links(panels, [a, a + 0.01])[0], centroid_links(panels, [a, rng.random((200, 2))])[0]
    assert same.distance == pytest.approx(np.sqrt(2) * 0.01) and same.chance > 0.3 and same.unaligned == 0.4
    assert moved.distance == pytest.approx(moved.chance, rel=0.2)  # unrelated maps: at chance
    independent = [panels[0], dataclasses.replace(panels[1], aligned_to=None)]
    assert np.isnan(centroid_links(independent, [a, a])[0].unaligned)


def test_default_grid_and_out(toy_run):
    result = compare_runs([toy_run], log=lambda s: None)
    assert result.grid == 4 and result.png == toy_run / "compare-4.png" and result.png.is_file()
    assert result.json == toy_run / "compare-4.json" and result.neighbors_used == 10


def test_grid_and_layers_options(toy_run, tmp_path):
    out = tmp_path / "g2.png"
    result = compare_runs([toy_run], layers=["blocks.1"], grid=2, out=out, log=lambda s: None)
    assert [p.label for p in result.panels] == ["blocks.1"] and result.panels[0].image.endswith("atlas-2.png")
    assert _panel_colour(out, 1, 0) == GREEN
    assert result.knn_method is None and result.shared.tolist() == [[1.0]]  # one panel: no neighbours searched
    order = compare_runs([toy_run], layers=["blocks.2", "blocks.1"], out=tmp_path / "o.png", log=lambda s: None)
    assert [p.layer for p in order.panels] == ["blocks.2", "blocks.1"]


def test_two_runs_match_images_by_path(toy_run, tmp_path, capsys):
    other = _copy(toy_run, tmp_path / "other")
    with h5py.File(other / "activations.h5", "r+") as h5:
        h5["images/status"][0] = "truncated"
        del h5["layers/blocks.1/attr"], h5["layers/blocks.2/attr"]
    out = tmp_path / "two.png"
    result = compare_runs([toy_run, other], neighbors=20, out=out)
    assert result.images == 11 and result.neighbors_used == 10  # K lowered to n - 1
    assert [p.label for p in result.panels] == [f"{toy_run.name}: blocks.1", f"{toy_run.name}: blocks.2",
                                                "other: blocks.1", "other: blocks.2"]
    assert (result.shared == 1.0).all()  # K = n - 1: every other image is a neighbour
    info = json.loads(out.with_suffix(".json").read_text())
    assert [p["mean_top_class_share"] for p in info["panels"]] == [0.9375, 1.0, None, None]
    assert "lowered" not in capsys.readouterr().out.splitlines()[0]
    assert _panel_colour(out, 4, 2) == RED and _panel_colour(out, 4, 3) == BLUE


@pytest.mark.slow  # the descent's numba JIT: 20-50 s on first use in a process
def test_compare_above_the_threshold_uses_descent(toy_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare_mod, "EXACT_MAX_IMAGES", 5)  # the toy run's 12 images count as many
    out = tmp_path / "approx.png"
    compare_runs([toy_run], neighbors=2, out=out)
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["knn"] == {"method": "nn-descent", "exact_max_images": 5, "seed": 0, "recall_rows": 12,
                           "recall": [1.0, 1.0]}  # 12 images: the descent finds them all
    assert info["shared_neighbors"]["matrix"] == [[1.0, 1.0], [1.0, 1.0]]
    text = capsys.readouterr().out
    assert "nearest-neighbour descent (more than 5 images): recall 1.000 or better" in text
    assert _panel_colour(out, 2, 0) == RED  # the header's extra line still leaves the panels where they belong


def test_common_images_match_paths_across_runs(tmp_path):
    acts = np.ones((6, 2), np.float32)
    opened = []
    for name, paths, status in (("a", ["p0", "p1", "p2", "p3", "p4", "p5"], "ok"),
                                ("b", ["p1", "p3", "p4", "p5", "p9", "pa"], "ok")):
        run_dir = tmp_path / name
        config = toy_config(run_dir, layers=("blocks.1",))
        write_activations(run_dir, {"blocks.1": acts}, n_images=6, paths=paths, config=config)
        opened.append(_Opened(name, Run(run_dir, config)))
    with h5py.File(tmp_path / "b" / "activations.h5", "r+") as h5:
        h5["images/status"][2] = "unreadable"  # p4
    n, rows = _common_images(opened, [["blocks.1"], ["blocks.1"]])
    assert n == 3 and rows[0].tolist() == [1, 3, 5] and rows[1].tolist() == [0, 1, 3]  # p1, p3, p5 in both


def test_parser(toy_run, tmp_path, capsys):
    out = tmp_path / "cli.png"
    args = build_parser().parse_args(["compare", str(toy_run), "--layers", "blocks.2", "--neighbors", "3",
                                      "--out", str(out)])
    args.handler(args)
    assert json.loads(out.with_suffix(".json").read_text())["neighbors"] == 3
    assert f"wrote {out}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Errors: one line that says what to do


def _broken(toy_run, tmp_path, what):
    run = _copy(toy_run, tmp_path / "broken")
    if what.endswith(".h5"):
        (run / what).unlink()
    elif what == "config":
        (run / "config.toml").unlink()
    elif what == "images":
        (run / "blocks.2" / "atlas-preview-4.png").unlink()
    elif what == "paths":
        with h5py.File(run / "activations.h5", "r+") as h5:
            h5["images/path"][...] = np.array([f"other{i}.jpg" for i in range(12)], dtype=object)
    elif what == "stale":  # recollected: the layout and everything after it are of the old activations
        with h5py.File(run / "activations.h5", "r+") as h5:
            h5.attrs["fingerprint"] = "recollected"
    return run


@pytest.mark.parametrize("what, message", [
    ("grid.h5", r"grid.h5 not found; run `atlas grid .*broken`, then render, mosaic$"),
    ("layout.h5", r"layout.h5 not found; run `atlas layout .*`, then grid, render, mosaic$"),
    ("activations.h5", r"activations.h5 not found; run `atlas collect .*`, then layout, grid, render, mosaic$"),
    ("config", r"has no config.toml, so it is not a run directory; build one with `atlas run CONFIG`"),
    ("images", r"no grid size has a current atlas image for every compared layer.*`atlas run .*` \(it redoes only what is stale\)"),
    ("stale", r"layout.h5 is out of date \(made from other activations\); run `atlas layout .*`, then grid, render"),
])
def test_broken_run_errors(toy_run, tmp_path, what, message):
    run = _broken(toy_run, tmp_path, what)
    with pytest.raises(AtlasError, match=message) as err:
        compare_runs([run], out=tmp_path / "x.png", log=lambda s: None)
    assert "\n" not in str(err.value)


def test_no_images_in_common(toy_run, tmp_path):
    run = _broken(toy_run, tmp_path, "paths")
    with pytest.raises(AtlasError, match="have no images in common") as err:
        compare_runs([toy_run, run], out=tmp_path / "x.png", log=lambda s: None)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": ["blocks.3"]},
     r"unknown layer .blocks.3.; did you mean blocks.2, blocks.1\? run .* has blocks.1, blocks.2$"),
    ({"grid": 3}, r"layer 'blocks.1' of run .* has no 3x3 grid \(it has 2, 4\)"),
    ({"grid": 2}, r"layer 'blocks.2' of run .* has no current atlas or preview image at grid 2; run `atlas run"),
    ({"neighbors": 0}, r"--neighbors must be >= 1"),
])
def test_option_errors(toy_run, tmp_path, kwargs, message):
    with pytest.raises(AtlasError, match=message) as err:
        compare_runs([toy_run], out=tmp_path / "x.png", log=lambda s: None, **kwargs)
    assert "\n" not in str(err.value)


def test_missing_run(tmp_path):
    with pytest.raises(AtlasError, match="run directory .*nowhere not found; build one with `atlas run CONFIG`"):
        compare_runs([tmp_path / "nowhere"])
