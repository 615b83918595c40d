"""`atlas place`: new images' samples on a tiny run's maps (tiny model, generated images)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from tiny import config_text, pattern, write_images

from atlas.errors import AtlasError
from atlas.grid import bin_layout
from atlas.place import cells_of, image_index, map_members, place_images
from atlas.store import Run

TESTS = Path(__file__).parent


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))  # this checkout's atlas
    return subprocess.run([sys.executable, "-m", "atlas", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run of the tiny model over 16 pattern images, two layers aligned, a class atlas and a
    two-class view, built by `atlas run`."""
    root = tmp_path_factory.mktemp("place")
    write_images(root / "images", 16)
    text = config_text(root / "run", root / "images", samples_per_image=8)
    text += ("[layout]\nbackend = \"torchdr\"\ndevice = \"cpu\"\nn_neighbors = 8\ntrust_samples = 0\nalign = true\n"
             "classes = [\"goldfish\"]\npairs = [[\"tench\", \"goldfish\"]]\nclass_top = 24\n"
             "[grid]\nsizes = [4, 8]\nmin_count = 1\n"
             "[render]\nsizes = [4]\nicon_size = 16\nsteps = 2\nbatch_size = 8\npad = 1\njitter = 1\n")
    (root / "run.toml").write_text(text)
    proc = run_cli("run", root / "run.toml", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root


def test_a_corpus_images_own_samples_land_in_their_cells_or_a_neighbour(tiny_run):
    run = tiny_run / "run"
    images = sorted((tiny_run / "images").rglob("*.png"))[:6]
    lines = []
    summary = place_images(run, images, log=lines.append)
    store = Run.open(run)
    layout = store.layout()
    near = total = 0
    with store.activations() as acts:
        for i, placed in enumerate(summary.images):
            assert placed.corpus_index is not None  # found among the run's images: its own positions
            for layer in ("features", "deep"):
                rows = np.flatnonzero(acts.layer(layer).image == placed.corpus_index)
                report = placed.maps[layer]
                np.testing.assert_array_equal(np.array(report["yx"]), acts.layer(layer).yx[rows])
                for size in (4, 8):
                    own = bin_layout(layout.maps[layer].xy[rows], size)
                    got = bin_layout(np.array(report["xy"], np.float64), size)
                    apart = np.maximum(np.abs(own % size - got % size), np.abs(own // size - got // size))
                    near += int((apart <= 1).sum())
                    total += len(rows)
    assert total == 6 * (8 + 4) * 2 and near / total >= 0.9, near / total
    assert any(line.startswith("place: img000.png on features 8x8: 8 samples in ") for line in lines), lines
    assert any("(image 0 of the run: its own sample positions)" in line for line in lines)


def test_place_writes_pictures_and_json_for_a_new_image(tiny_run, tmp_path):
    new = tmp_path / "new photo.png"
    Image.fromarray(np.rot90(pattern(200)).copy()).save(new)
    summary = place_images(tiny_run / "run", [new], log=lambda _: None)
    run = tiny_run / "run"
    placed = summary.images[0]
    assert placed.corpus_index is None and placed.prediction
    for name in ("features", "deep", "deep/class-goldfish", "deep/pair-tench-goldfish"):
        report = json.loads((run / name / "place" / "new photo.json").read_text())
        assert report["map"] == name and report["samples"] == (8 if name == "features" else 4)
        xy = [p for p in report["xy"] if p is not None]
        assert len(xy) == report["placed"] and all(0 <= v <= 1 for p in xy for v in p)
        if report["placed"]:
            cells = report["grids"]["4"]["cells"]
            assert sum(c["samples"] for c in cells) == report["placed"]
            assert all(c["top_classes"] for c in cells if c["kept"])
    # the atlas picture (icons at 4x4, the preview at 8x8) with markers drawn on it
    with Image.open(run / "features" / "place" / "new photo-4.png") as drawn, \
            Image.open(run / "features" / "atlas-4.png") as atlas:
        assert drawn.size == atlas.size and np.any(np.asarray(drawn.convert("RGB")) != np.asarray(atlas.convert("RGB")))
    assert (run / "features" / "place" / "new photo-8.png").is_file()
    # the same file gets the same positions again
    again = place_images(run, [new], log=lambda _: None).images[0]
    assert again.maps["features"]["yx"] == placed.maps["features"]["yx"]


def test_pure_helpers():
    assert image_index(b"abc", 10) == image_index(b"abc", 10) >= 10 and image_index(b"abd", 10) != image_index(b"abc", 10)
    assert image_index(b"x" * 100, 5) < 2 ** 31
    attr = np.array([[1.0, 0.0, 0.2], [0.0, 0.5, 0.9], [0.3, 0.2, 0.0]])
    np.testing.assert_array_equal(map_members({"kind": "class", "classes": [1], "class_threshold": [0.4]}, attr),
                                  [False, True, False])
    np.testing.assert_array_equal(map_members({"kind": "pair", "classes": [0, 1], "class_threshold": [2.0, 9.0]},
                                              attr), [True, False, True])

    from atlas.store import Grid

    grid = Grid(2, np.array([[0, 0], [1, 1]], np.int32), np.array([5, 3], np.int32), np.zeros((2, 1), np.float32),
                np.array([0, 5, 8]), np.arange(8), top_class=np.array([[2], [0]], np.int32),
                top_attr=np.array([[0.5], [0.25]], np.float32))
    cells = cells_of(np.array([[0.9, 0.9], [0.1, 0.2], [0.8, 0.7], [0.9, 0.1]]), grid, ["a", "b", "c"])
    assert cells[0] == {"cell": [1, 1], "samples": 2, "kept": True, "count": 3, "top_classes": [["a", 0.25]]}
    assert cells[1]["cell"] == [0, 0] and cells[1]["top_classes"] == [["c", 0.5]]
    assert cells[2] == {"cell": [1, 0], "samples": 1, "kept": False, "count": 0, "top_classes": []}


def test_place_refuses_a_layout_without_fit_samples(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_run / "run", run)
    (run / "config.toml").write_text((run / "config.toml").read_text().replace(str(tiny_run / "run"), str(run)))
    with h5py.File(run / "layout.h5", "a") as h5:
        del h5["features/fit_rows"]
    with pytest.raises(AtlasError, match="keeps no fit samples .* run `atlas layout .* --force`"):
        place_images(run, [tiny_run / "images" / "n01440764" / "img000.png"], log=lambda _: None)


def test_cli_place_and_its_one_line_errors(tiny_run, tmp_path):
    run = tiny_run / "run"
    image = tiny_run / "images" / "n01443537" / "img001.png"
    ok = run_cli("place", run, image, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "place: img001.png on deep 4x4: 4 samples in" in ok.stdout and "wrote" in ok.stdout

    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    stale = tmp_path / "stale"
    import shutil

    shutil.copytree(run, stale)
    config = (stale / "config.toml").read_text().replace(str(run), str(stale))
    (stale / "config.toml").write_text(config.replace("n_neighbors = 8", "n_neighbors = 9"))
    for args, message in [
        ((run, bad), "cannot read image"),
        ((run, tmp_path / "missing.jpg"), "missing.jpg"),
        ((tmp_path / "no-run", image), "no-run not found"),
        ((stale, image), "layout.h5 is out of date"),
        ((run, image, tmp_path / "img001.png"), "two images are named 'img001'"),
        ((run, image, "--device", "gpu"), "--device must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got 'gpu'"),
    ]:
        proc = run_cli("place", *args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
