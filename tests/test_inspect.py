"""`atlas inspect` and `atlas patches` on a toy run: pure cores, the panel, and one-line errors."""

import json

import numpy as np
import pytest
from PIL import Image
from tiny import pattern
from toy_runs import toy_config, write_activations, write_icons, write_layout

from atlas import grid as grid_mod
from atlas.cli import build_parser
from atlas.config import save_config
from atlas.draw import TILE_PX, compose_panel, panel_boxes, square_inside
from atlas.errors import AtlasError
from atlas.focus import find_class
from atlas.inspect import cells_for_class, label_mix, nearest_kept_cell, pick_aligned_members, top_classes_text
from atlas.store import Run

NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]


# ---------------------------------------------------------------------------------------------
# Pure cores


def test_top_classes_text():
    attr = np.array([0.1, 0.5, -0.2, 0.3, 0.3], np.float32)
    assert [(c, n) for c, n, _ in top_classes_text(attr, NAMES, 3)] == [(1, "goldfish"), (3, "tiger shark"),
                                                                       (4, "hammerhead")]
    assert top_classes_text(attr, None, 1)[0][:2] == (1, "class 1")
    assert top_classes_text(attr, NAMES, 1)[0][2] == pytest.approx(0.5)


def test_label_mix():
    mix = label_mix(np.array([2, 0, 2, -1, 0, 2, 4]), NAMES, k=3)
    assert mix == [(2, "great white shark", 3), (0, "tench", 2), (-1, "unlabelled", 1)]
    assert label_mix(np.array([], np.int64), NAMES) == []


def test_pick_aligned_members():
    direction = np.array([1.0, 0.0])
    acts = np.array([[0.0, 1.0], [2.0, 0.1], [1.0, 1.0], [5.0, 0.0], [3.0, 0.0]])
    members = np.array([10, 11, 12, 13, 14])
    rows, cos = pick_aligned_members(members, acts, direction, k=3)
    assert rows.tolist() == [13, 14, 11]  # cosine 1, 1 (earlier first), then 0.998
    assert cos[0] == pytest.approx(1.0) and cos[2] < 1
    assert len(pick_aligned_members(members[:2], acts[:2], direction, k=9)[0]) == 2


def test_nearest_cell_and_cells_for_class():
    cells = np.array([[0, 0], [3, 0], [1, 2]])
    assert nearest_kept_cell(cells, 3, 1) == (3, 0)
    assert nearest_kept_cell(cells, -5, 9) == (1, 2)
    attr = np.array([[0.1, 0.0], [0.5, 0.2], [0.3, 0.9]])
    assert cells_for_class(attr, 0).tolist() == [1, 2, 0]
    assert cells_for_class(attr, 1, k=1).tolist() == [2]


def test_find_class():
    assert find_class("Goldfish", NAMES) == 1
    assert find_class("n01443537", NAMES, ["n0", "n01443537", "n2", "n3", "n4"]) == 1
    with pytest.raises(AtlasError, match="did you mean 'tiger shark'") as err:
        find_class("tiger shrk", NAMES)
    assert "\n" not in str(err.value)
    with pytest.raises(AtlasError, match="unknown class"):
        find_class("zebra", NAMES)


def test_compose_panel_places_tiles():
    tiles = [np.full((TILE_PX, TILE_PX, 3), 10 * k, np.uint8) for k in range(9)]
    icon = np.full((16, 16, 3), 200, np.uint8)
    panel = compose_panel(["a header", "second line"], icon, tiles, [f"tile {k}" for k in range(9)])
    (h, w), icon_box, boxes = panel_boxes(9, True, 2)
    assert panel.shape == (h, w, 3)
    for k, (left, top, right, bottom) in enumerate(boxes):
        assert (panel[top:bottom, left:right] == 10 * k).all()
    left, top, right, bottom = icon_box
    assert (panel[top:bottom, left:right] == 200).all()
    no_icon = compose_panel(["x"], None, tiles[:4] + [None], ["c"] * 5)
    assert no_icon.shape[:2] == panel_boxes(5, False, 1)[0]


# ---------------------------------------------------------------------------------------------
# A toy run: 4 clusters in the corners of the layout, model tiny:make, layer `deep` (4 x 4 map)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("inspect-run")
    n, n_images = 120, 12
    rng = np.random.default_rng(0)
    cluster = np.arange(n) % 4
    centres = np.eye(4)[cluster] * 2 + 0.1
    acts = (centres + 0.05 * rng.random((n, 4))).astype(np.float32)
    attr = np.zeros((n, len(NAMES)), np.float32)
    attr[np.arange(n), cluster] = 1.0
    attr[:, 4] = 0.01
    config = toy_config(run_dir, layers=("deep",), grid={"sizes": (4, 2), "min_count": 3, "top_classes": 3},
                        model="tiny:make", preprocess={"size": 8, "resize": 8})
    write_activations(run_dir, {"deep": acts}, {"deep": attr}, n_images=n_images, class_names=NAMES,
                      wnids=[f"n{k:08d}" for k in range(len(NAMES))], config=config,
                      labels=np.arange(n_images) % 3,
                      yx={"deep": np.stack([np.arange(n) % 4, (np.arange(n) // 4) % 4], axis=1)},
                      shapes={"deep": [4, 4, 4]}, preprocess={"size": 8, "resize": 8, "interpolation": "bilinear"})
    corners = np.array([[0.05, 0.05], [0.95, 0.05], [0.05, 0.95], [0.95, 0.95]])
    write_layout(config, {"deep": corners[cluster] + 0.01 * rng.random((n, 2))})
    (run_dir / "images").mkdir()
    for i in range(n_images):
        Image.fromarray(pattern(i)).save(run_dir / "images" / f"img{i}.jpg", quality=95)
    save_config(config)
    grid_mod.run(config, log=lambda s: None)
    write_icons(config, "deep", Run(run_dir, config).grid("deep", 4), {(0, 0): (77, 77, 77)})
    return run_dir


def _cli(*argv):
    args = build_parser().parse_args([str(a) for a in argv])
    args.handler(args)


def test_inspect_cell_writes_panel_and_json(toy_run, capsys):
    _cli("inspect", toy_run, "--layer", "deep", "--grid", 4, "--cell", 0, 0)
    out = capsys.readouterr().out
    assert "30 samples" in out and "top classes (mean attribution): tench 1" in out
    assert "icon-4" not in out and "cell-0-0.png" in out
    info = json.loads((toy_run / "deep" / "inspect" / "cell-4-0-0.json").read_text())
    assert info["count"] == 30 and info["top_classes"][0]["name"] == "tench"
    assert [m["name"] for m in info["label_mix"]] == ["tench", "goldfish", "great white shark"]
    assert len(info["members"]) == 9
    cos = [m["cosine"] for m in info["members"]]
    assert cos == sorted(cos, reverse=True)
    assert info["receptive_field"]["stride_y"] == 2 and info["receptive_field"]["size_y"] == 3
    assert info["icon"].endswith("cell-0-0.png")
    panel = np.asarray(Image.open(toy_run / "deep" / "inspect" / "cell-4-0-0.png").convert("RGB"))
    (h, w), icon_box, boxes = panel_boxes(9, True, 3)
    assert panel.shape == (h, w, 3)
    left, top, right, bottom = icon_box
    assert (panel[top:bottom, left:right] == 77).all()
    for left, top, right, bottom in boxes:  # every tile shows image pixels (not the white canvas)
        assert (panel[top:bottom, left:right] != 255).any()


def test_inspect_by_class(toy_run, capsys):
    _cli("inspect", toy_run, "--layer", "deep", "--grid", 4, "--class", "Great White Shark")
    out = capsys.readouterr().out
    first = [line for line in out.splitlines() if "--cell" in line][0]
    assert "--cell 0 3" in first  # cluster 2 sits in the top-left corner: x = 0, y = 3
    assert (toy_run / "deep" / "inspect" / "cell-4-0-3.png").is_file()


def test_patches(toy_run, capsys):
    _cli("patches", toy_run, "--layer", "deep", "--channel", 1)
    path = toy_run / "deep" / "patches" / "channel-1.png"
    assert path.is_file()
    panel = np.asarray(Image.open(path).convert("RGB"))
    assert panel.shape[:2] == panel_boxes(9, False, 1)[0]


@pytest.mark.parametrize("argv, message", [
    (("inspect", "--layer", "deep", "--grid", 4, "--cell", 9, 0), "outside the 4x4 grid.*nearest kept cell is --cell 3 0"),
    (("inspect", "--layer", "deep", "--grid", 4, "--cell", 1, 1), "not kept.*nearest kept cell is --cell 0 0"),
    (("inspect", "--layer", "deep", "--grid", 4, "--class", "goldfsh"), "unknown class 'goldfsh'.*'goldfish'"),
    (("inspect", "--layer", "deap", "--grid", 4, "--cell", 0, 0), "unknown layer 'deap'.*deep"),
    (("inspect", "--layer", "deep", "--grid", 5, "--cell", 0, 0), "no 5x5 grid"),
    (("patches", "--layer", "deep", "--channel", 4), "channel 4 is out of range.*0..3"),
    (("patches", "--layer", "deep", "--channel", -1), "out of range"),
])
def test_errors_are_one_line(toy_run, argv, message):
    cmd, *rest = argv
    with pytest.raises(AtlasError, match=message) as err:
        _cli(cmd, toy_run, *rest)
    assert "\n" not in str(err.value)


def test_missing_grid(toy_run, tmp_path):
    import shutil

    from atlas.config import load_config

    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    (run / "grid.h5").unlink()
    save_config(load_config(run))
    with pytest.raises(AtlasError, match="grid.h5 not found; run `atlas grid"):
        _cli("inspect", run, "--layer", "deep", "--grid", 4, "--cell", 0, 0)


def test_square_inside_keeps_fields_within_the_input():
    boxes = np.array([[10, 20, 50, 60], [-30, -30, 30, 30], [-200, -150, 400, 450], [200, 0, 260, 60]], float)
    np.testing.assert_array_equal(square_inside(boxes, 224), [[10, 20, 50, 60], [0, 0, 60, 60],
                                                              [0, 0, 224, 224], [164, 0, 224, 60]])
