"""The single-unit views (`atlas.views`): vis, dream, maps and filters on tiny models and images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from atlas import views
from atlas.cli import build_parser
from atlas.errors import AtlasError
from atlas.optvis import channel


@pytest.fixture
def tiny_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def run_view(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    args.handler(args)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.array(image.convert("RGB"))


def one_line_error(argv: list[str]) -> str:
    with pytest.raises(AtlasError) as info:
        run_view(argv)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def photo(tmp_path) -> Path:
    ys, xs = np.mgrid[0:12, 0:20]
    pixels = np.stack([xs * 12, ys * 20, (xs + ys) * 8], axis=-1).astype(np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


# --- vis ----------------------------------------------------------------------------------------


def test_vis_channel_writes_png(tiny_path, tmp_path, capsys):
    out = tmp_path / "vis.png"
    run_view(["vis", "tiny:make", "--layer", "deep", "--channel", "1", "--size", "16", "--steps", "8",
              "--device", "cpu", "--out", str(out)])
    assert read_png(out).shape == (16, 16, 3)
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out}") and "\n" not in line


def test_vis_class_writes_png(tiny_path, tmp_path):
    out = tmp_path / "class.png"
    run_view(["vis", "tiny:make", "--class", "goldfish", "--size", "16", "--steps", "4", "--device", "cpu",
              "--out", str(out)])
    assert read_png(out).shape == (16, 16, 3)


def test_visualize_raises_the_objective():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    torch.manual_seed(0)
    vis = views.visualize(model, channel("0", 2), size=16, steps=40)
    assert vis.images.shape == (1, 3, 16, 16)
    assert vis.history[-5:].mean() > vis.history[:5].mean()


@pytest.mark.parametrize("argv, expected", [
    (["--layer", "deep", "--channel", "4"], "channel 4 is out of range"),
    (["--layer", "deeep", "--channel", "0"], "unknown layer 'deeep'"),
    (["--class", "goldfsh"], "did you mean 'goldfish'"),
    (["--layer", "deep"], "give --layer and --channel"),
])
def test_vis_bad_input_is_one_line(tiny_path, tmp_path, argv, expected):
    message = one_line_error(["vis", "tiny:make", *argv, "--steps", "1", "--device", "cpu",
                              "--out", str(tmp_path / "x.png")])
    assert expected in message
    assert not (tmp_path / "x.png").exists()


# --- dream --------------------------------------------------------------------------------------


def test_dream_changes_the_image_and_keeps_its_size(tiny_path, photo, tmp_path):
    out = tmp_path / "dream.png"
    run_view(["dream", str(photo), "--model", "tiny:make", "--layer", "deep", "--size", "20", "--octaves", "2",
              "--steps", "3", "--device", "cpu", "--out", str(out)])
    dreamed, original = read_png(out), read_png(photo)
    assert dreamed.shape == original.shape == (12, 20, 3)
    assert np.abs(dreamed.astype(int) - original).mean() > 1


def test_deep_dream_raises_the_objective():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    pixels = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0))
    objective = views.dream_objective("0")
    dreamed = views.deep_dream(model, pixels, objective, octaves=2, steps=5)
    assert dreamed.shape == pixels.shape and 0 <= dreamed.min() and dreamed.max() <= 1
    with torch.no_grad():
        before = objective({"0": model(pixels[None])}).item()
        after = objective({"0": model(dreamed[None])}).item()
    assert after > before


def test_dream_missing_image_is_one_line(tiny_path, tmp_path):
    message = one_line_error(["dream", str(tmp_path / "nope.jpg"), "--model", "tiny:make", "--layer", "deep"])
    assert "nope.jpg" in message


def test_dream_unknown_layer_is_one_line(tiny_path, photo):
    assert "unknown layer" in one_line_error(["dream", str(photo), "--model", "tiny:make", "--layer", "nope"])


# --- maps ---------------------------------------------------------------------------------------


def test_pick_channels_by_mean_or_index():
    maps = np.stack([np.full((2, 2), v, np.float32) for v in (1, 5, 3, 5)])
    assert views.pick_channels(maps, 3, "mean").tolist() == [1, 3, 2]
    assert views.pick_channels(maps, 3, "index").tolist() == [0, 1, 2]
    assert views.pick_channels(maps, 10, "index").tolist() == [0, 1, 2, 3]


def count_black_tiles(grid: np.ndarray, tile_factor: int) -> int:
    """Each normalised tile has one black source pixel (its minimum), upscaled to factor^2 pixels."""
    return int((grid == 0).all(axis=-1).sum()) // tile_factor**2


def test_maps_grid_has_one_tile_per_channel():
    maps = np.random.default_rng(0).normal(size=(6, 4, 4)).astype(np.float32)
    grid = np.array(views.maps_grid(maps, [5, 0, 2, 3, 1], "layer (6, 4, 4)", tile_px=64))
    assert count_black_tiles(grid, 16) == 5


def test_maps_writes_requested_tiles(tiny_path, photo, tmp_path, capsys):
    out = tmp_path / "maps.png"
    run_view(["maps", str(photo), "--model", "tiny:make", "--layer", "deep", "--channels", "3", "--device", "cpu",
              "--out", str(out)])
    assert "3 of 4 feature maps" in capsys.readouterr().out
    grid = read_png(out)
    assert grid.ndim == 3 and grid.shape[2] == 3
    # deep is 112 x 112 on the default 224 input: the tile factor is 1
    assert count_black_tiles(grid, 1) >= 3


# --- filters ------------------------------------------------------------------------------------


def test_filter_tiles_hand_set():
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]).view(2, 3, 1, 1))
    tiles = views.filter_tiles(conv.weight, tile_px=4)
    assert tiles.shape == (2, 4, 4, 3)
    assert tiles[0, 0, 0].tolist() == [255, 128, 0]  # +max -> 1, 0 -> 0.5, -max -> 0
    assert tiles[1, 3, 3].tolist() == [128, 255, 128]


def test_first_rgb_conv_skips_other_convs():
    model = nn.Sequential(nn.Conv2d(1, 3, 1), nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 5))
    assert views.first_rgb_conv(model)[0] == "1"
    with pytest.raises(AtlasError):
        views.first_rgb_conv(nn.Sequential(nn.Linear(3, 3)))


def test_filters_writes_tiles_of_the_first_conv(tiny_path, tmp_path, capsys):
    out = tmp_path / "filters.png"
    run_view(["filters", "tiny:make", "--out", str(out)])
    grid = read_png(out)
    # tiny's first conv is the identity 1x1: filter k is +1 in colour k, 0 elsewhere; 32 px tiles, 4 px gaps
    assert grid.shape == (4 + 2 * 36, 4 + 2 * 36, 3)
    assert grid[4, 4].tolist() == [255, 128, 128]
    assert grid[4, 40].tolist() == [128, 255, 128]
    assert grid[40, 4].tolist() == [128, 128, 255]
    assert "3 filters 1x1" in capsys.readouterr().out
