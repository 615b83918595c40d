"""The view stage on a tiny run: the folder it writes, its data scripts, skipping, and bad runs."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atlas import view
from atlas.cli import main
from atlas.config import load_config
from atlas.store import Run
from tiny import config_text, write_images

LAYERS = ("features", "deep")


def build_run(root: Path, *extra: str, render_sizes: str = "[2, 3]") -> Path:
    """A tiny run: two layers, grid sizes 2, 3 and 4 (icons at 2 and 3 only, preview tiles at 4),
    a class atlas of goldfish on `deep`; then `atlas run` (which ends with the view stage)."""
    write_images(root / "images", 12)
    text = config_text(root / "run", root / "images", samples_per_image=4)
    text += ("[layout]\nn_neighbors = 5\ntrust_samples = 0\nclasses = [\"goldfish\"]\nclass_top = 20\n"
             "focus_layers = [\"deep\"]\n[grid]\nsizes = [2, 3, 4]\nmin_count = 1\n"
             f"[render]\nsizes = {render_sizes}\nicon_size = 16\nsteps = 3\nbatch_size = 8\npad = 1\njitter = 1\n")
    (root / "run.toml").write_text(text)
    assert main(["run", str(root / "run.toml"), *extra]) == 0
    return root / "run"


def read_script(path: Path, call: str) -> dict:
    text = path.read_text()
    assert text.startswith(call + "(") and text.rstrip().endswith(");")
    return json.loads(text[len(call) + 1:text.rstrip().rindex(")")])


@pytest.fixture(scope="module")
def viewer_run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("view"))


def test_the_viewer_folder_holds_page_data_sprites_and_patches(viewer_run):
    folder = viewer_run / "viewer"
    for name in view.ASSETS:
        assert (folder / name).read_bytes() == (Path(view.__file__).parent / "viewer" / name).read_bytes()
    info = read_script(folder / "data" / "run.js", "ATLAS.run")
    names = [m["name"] for m in info["maps"]]
    assert names == ["features", "deep", "deep/class-goldfish"]
    assert info["classes"][1] == "goldfish" and info["n_images"] == 12 and "images" not in info
    store = Run.open(viewer_run)
    for m in info["maps"]:
        assert [g["size"] for g in m["grids"]] == [2, 3, 4]
        assert [g["icons"] for g in m["grids"]] == [True, True, False]
        for g in m["grids"]:
            data = read_script(folder / "data" / f"{g['key']}.js", "ATLAS.grid")
            grid = store.grid(m["name"], g["size"])
            assert data["cell"] == grid.cell.ravel().tolist() and data["count"] == grid.count.tolist()
            assert data["top_class"] == grid.top_class.ravel().tolist() and data["k"] == 5
            with Image.open(folder / data["sprite"]) as sprite:
                cols, px = data["cols"], data["tile"]
                assert sprite.size == (cols * px, -(-len(grid) // cols) * px)
                sheet = np.asarray(sprite.convert("RGB"), np.float32)
            if g["icons"]:  # tile i is cell i's icon (JPEG: compared within a tolerance)
                icons = store.icons(store.find_map(m["name"]), grid)
                for i, (x, y) in enumerate(grid.cell.tolist()):
                    r, c = divmod(i, cols)
                    tile = sheet[r * px:(r + 1) * px, c * px:(c + 1) * px]
                    assert np.abs(tile - icons.read(x, y).astype(np.float32)).mean() < 6, (m["name"], x, y)
            # every member shown is a member of its cell, best aligned first, with a patch
            members = [[m_ for m_ in cell] for cell in data["members"]]
            assert all(len(cell) == min(9, n) for cell, n in zip(members, grid.count))
            assert all([c for _, _, c in cell] == sorted([c for _, _, c in cell], reverse=True) for cell in members)
            assert all(p >= 0 for cell in members for _, p, _ in cell)
            with store.activations() as acts:  # each shown member's image path comes with the grid
                assert data["paths"] == {str(i): acts.images.path[i] for i in {m_[0] for cell in members for m_ in cell}}
            # distinct images per cell as CSR of little-endian uint16
            images = np.frombuffer(base64.b64decode(data["images"]), "<u2")
            with store.activations() as acts:
                image_of = acts.layer(m["layer"]).image
            for i in range(len(grid)):
                a, b = data["images_indptr"][i:i + 2]
                assert images[a:b].tolist() == np.unique(image_of[grid.members(i)]).tolist()
            attr = np.frombuffer(base64.b64decode(data["attr"]), np.int8).reshape(len(grid), -1)
            scale = np.asarray(data["attr_scale"])
            np.testing.assert_allclose(attr * scale, grid.attr, atol=float(scale.max()) * 0.51)
            assert (np.abs(attr).max(axis=0) == 127).all()  # every class uses its whole range
            assert (data["cosine"][0] is None) == (not g["icons"])
    n_patches = sum(1 for _ in (folder / "patches").glob("*.jpg"))
    assert n_patches >= 1
    assert info["inspect"] == f"atlas inspect {store.root}"


def test_the_view_is_skipped_when_up_to_date_and_rebuilt_when_an_input_changes(viewer_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(viewer_run, run)
    assert main(["view", str(run)]) == 0  # a copy names another run: rebuilt once
    capsys.readouterr()
    assert main(["view", str(run)]) == 0
    assert "view: up to date, skipped" in capsys.readouterr().out
    assert main(["view", str(run), "--set", "mosaic.preview_members=3"]) == 0
    assert "view: 9 grid(s) of 3 map(s)" in capsys.readouterr().out
    (run / "viewer" / "viewer.js").write_text("broken")  # the page's own files are part of it
    assert main(["view", str(run), "--force"]) == 0
    assert (run / "viewer" / "viewer.js").read_bytes() == (Path(view.__file__).parent / "viewer" / "viewer.js").read_bytes()


def test_a_moved_run_is_rebuilt_and_icons_of_sizes_not_rendered_are_ignored(viewer_run, tmp_path, capsys):
    from atlas.config import save_config

    run = tmp_path / "moved run"
    shutil.copytree(viewer_run, run)
    save_config(load_config(run))
    assert main(["view", str(run)]) == 0  # the page names the run: a new place rebuilds it
    info = read_script(run / "viewer" / "data" / "run.js", "ATLAS.run")
    assert info["inspect"] == f"atlas inspect '{run}'" and "view: 9 grid(s)" in capsys.readouterr().out
    # an old icons folder of a size render no longer makes (here made for another grid) is ignored
    shutil.copytree(run / "features" / "icons-2", run / "features" / "icons-4")
    assert main(["view", str(run), "--force"]) == 0
    info = read_script(run / "viewer" / "data" / "run.js", "ATLAS.run")
    assert [g["icons"] for g in info["maps"][0]["grids"]] == [True, True, False]


def test_a_stale_grid_is_refused_and_nothing_is_half_written(viewer_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(viewer_run, run)
    before = sorted(p.relative_to(run) for p in (run / "viewer").rglob("*"))
    assert main(["layout", str(run), "--set", "layout.n_neighbors=4"]) == 0
    capsys.readouterr()
    assert main(["view", str(run)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"grid.h5 is out of date .*; run `atlas grid .*`, then render, mosaic, view", err)
    assert sorted(p.relative_to(run) for p in (run / "viewer").rglob("*")) == before
    assert not list(run.glob(".viewer*"))


def test_a_run_without_icons_still_gets_a_viewer_of_previews(tmp_path):
    run = build_run(tmp_path, "--set", "render.sizes_for={features = [2]}", render_sizes="[2]")
    info = read_script(run / "viewer" / "data" / "run.js", "ATLAS.run")
    assert [g["icons"] for g in info["maps"][0]["grids"]] == [True, False, False]
    assert [g["icons"] for g in info["maps"][1]["grids"]] == [True, False, False]


def test_pack_tiles_and_quantize():
    tiles = [np.full((4, 4, 3), v, np.uint8) for v in (10, 20, 30)] + [None]
    sheet, cols = view.pack_tiles(tiles, 4)
    assert cols == 2 and sheet.shape == (8, 8, 3)
    assert (sheet[:4, 4:] == 20).all() and (sheet[4:, :4] == 30).all() and (sheet[4:, 4:] == 255).all()
    assert view.pack_tiles([], 4)[0].shape == (4, 4, 3)
    values, scale = view.quantize_attr(np.array([[0.5, -1.0, 0.0], [0.25, 0.0, 0.0]]))
    assert values.dtype == np.int8 and values.tolist() == [[127, -127, 0], [64, 0, 0]]
    np.testing.assert_allclose(scale, [0.5 / 127, 1 / 127, 1.0], rtol=1e-6)


def test_serve_needs_a_built_viewer(tmp_path, capsys):
    write_images(tmp_path / "images", 4)
    (tmp_path / "run.toml").write_text(config_text(tmp_path / "run", tmp_path / "images"))
    from atlas.config import save_config

    save_config(load_config(tmp_path / "run.toml"))
    with pytest.raises(Exception, match="has no viewer yet; run `atlas view"):
        view.serve(tmp_path / "run", 0)


def test_a_port_out_of_range_is_a_usage_error(viewer_run, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["view", str(viewer_run), "--serve", "--port", "70000"])
    assert exit_.value.code == 2 and "70000 is not a port number (0-65535)" in capsys.readouterr().err
