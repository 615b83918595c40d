"""Render stage: icons per cell on a toy run with the tiny model, resume, skip, batch independence."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from atlas import grid as grid_stage
from atlas import optvis
from atlas import render
from atlas.config import Config, RenderConfig
from atlas.store import Grid, Run
from atlas.errors import AtlasError
from atlas.models import load_model
from tiny import SIZE
from toy_runs import toy_clusters, toy_config, write_activations, write_layout

LAYER = "deep"  # the tiny model's 3x3 stride-2 conv: 4 channels, an 8x8 map for a 16 px icon
PREPROCESS = {"size": SIZE, "resize": SIZE, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
RENDER = RenderConfig(icon_size=16, steps=6, batch_size=3, pad=2, jitter=2, attempts=2)


def toy_run(run_dir, grid=None, **render_overrides) -> Config:
    """activations.h5, layout.h5 and grid.h5 of 4 clusters of tiny-model-sized activations."""
    acts, labels = toy_clusters(120, 4, 4, seed=1)
    rng = np.random.default_rng(0)
    xy = np.clip(np.stack([labels / 4 + 0.2 * rng.random(len(labels)), rng.random(len(labels))], 1), 0, 1)
    config = toy_config(run_dir, layers=(LAYER,), grid={"sizes": (2, 3), "min_count": 1, **(grid or {})},
                        model="tiny:make", preprocess=PREPROCESS, render=dataclasses.replace(RENDER, **render_overrides))
    if not (config.run_dir / "activations.h5").is_file():
        write_activations(run_dir, {LAYER: acts}, config=config)
        write_layout(config, {LAYER: xy.astype(np.float32)})
    grid_stage.run(config, log=lambda s: None)
    return config


def quiet(line):
    pass


def read_icons(config, size):
    folder = Run(config.run_dir, config).icons_dir(LAYER, size)
    meta = json.loads((folder / "icons.json").read_text())
    images = {tuple(e["cell"]): np.asarray(Image.open(folder / e["file"])) for e in meta["icons"]}
    return meta, images


def tiny_network():
    model = load_model("tiny:make", "none", PREPROCESS)
    return optvis.Network(model.module, [LAYER], normalise=model.preprocess.normalise)


def test_render_writes_an_icon_per_cell_and_then_skips(tmp_path):
    config = toy_run(tmp_path / "run")
    lines = []
    summary = render.run(config, log=lines.append)
    assert not summary.skipped and [(g.layer, g.size) for g in summary.grids] == [(LAYER, 2), (LAYER, 3)]
    network = tiny_network()
    for size in (2, 3):
        grid = Run(config.run_dir, config).grid(LAYER, size)
        meta, images = read_icons(config, size)
        assert meta["layer"] == LAYER and meta["size"] == size and meta["icon_size"] == 16
        assert meta["fingerprint"] and meta["steps"] == 6 and meta["attempts"] == 2
        assert sorted(images) == sorted(map(tuple, grid.cell.tolist()))
        for entry in meta["icons"]:
            x, y = entry["cell"]
            assert entry["file"] == f"cell-{x}-{y}.png" and entry["attempt"] in (0, 1) and entry["seed"] == 0
            assert images[(x, y)].shape == (16, 16, 3) and images[(x, y)].dtype == np.uint8
        assert meta["median_cosine"] == pytest.approx(np.median([e["cosine"] for e in meta["icons"]]))
        assert meta["beats_best_member"] == pytest.approx(np.mean([e["objective"] > e["best_member_objective"]
                                                                   for e in meta["icons"]]))
        assert meta["beats_best_member"] == pytest.approx(np.mean([e["objective"] > e["best_member_objective"]
                                                                   for e in meta["icons"]]))
        # objective and cosine are measured on the saved pixels
        pixels = torch.stack([torch.tensor(images[tuple(e["cell"])]).permute(2, 0, 1) for e in meta["icons"]])
        acts = optvis.evaluate(network, pixels.float() / 255)
        order = [grid.find(*e["cell"]) for e in meta["icons"]]
        expected = render.icon_objective(LAYER, grid.direction[order], config.render.cos_power)(acts)
        np.testing.assert_allclose([e["objective"] for e in meta["icons"]], expected.numpy(), rtol=1e-4, atol=1e-5)
        cos = optvis.cosine_at(optvis.at_position(acts[LAYER]), torch.from_numpy(grid.direction[order]))
        np.testing.assert_allclose([e["cosine"] for e in meta["icons"]], cos.numpy(), rtol=1e-4, atol=1e-5)
    assert any("median cosine" in line and "members" in line for line in lines)
    assert not list(config.run_dir.glob(f"{LAYER}/.icons-*"))  # no partial or temporary folders left

    again = []
    assert render.run(config, log=again.append).skipped
    assert "up to date" in again[0]


def test_same_seed_same_icons_and_redo_when_the_grid_changes(tmp_path):
    config = toy_run(tmp_path / "run", attempts=1)
    render.run(config, log=quiet)
    meta, first = read_icons(config, 3)
    forced = render.run(config, force=True, log=quiet)
    assert not forced.skipped
    _, second = read_icons(config, 3)
    assert all(np.array_equal(first[c], second[c]) for c in first)

    # A grid whose cells change is rendered again; one whose cells and directions stay is kept,
    # even though grid.h5 was rewritten (a new size here).
    fewest = int(Run(config.run_dir, config).grid(LAYER, 3).count.min())
    changed = toy_run(tmp_path / "run", grid={"min_count": fewest + 1, "sizes": (3, 4)}, attempts=1)
    assert int(Run(changed.run_dir, changed).grid(LAYER, 3).count.min()) > fewest
    summary = render.run(changed, log=quiet)
    assert [(g.size, g.skipped) for g in summary.grids] == [(3, False), (4, False)]
    assert read_icons(changed, 3)[0]["fingerprint"] != meta["fingerprint"]
    grown = toy_run(tmp_path / "run", grid={"min_count": fewest + 1, "sizes": (3, 4, 1)}, attempts=1)
    summary = render.run(grown, log=quiet)
    assert sorted((g.size, g.skipped) for g in summary.grids) == [(1, False), (3, True), (4, True)]


class Killed(Exception):
    """Stands for a kill after some batches of icons were written."""


def render_until_killed(config, monkeypatch, batches=1):
    """Runs render, stopping it (as a kill would) after `batches` finished batches are on disk."""
    written = []
    write_part = render._write_part

    def dying(*args, **kwargs):
        write_part(*args, **kwargs)
        written.append(1)
        if len(written) >= batches:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(render, "_write_part", dying)
        with pytest.raises(Killed):
            render.run(config, log=quiet)


def test_resume_keeps_finished_batches(tmp_path, monkeypatch):
    whole = toy_run(tmp_path / "whole")
    render.run(whole, log=quiet)

    config = toy_run(tmp_path / "cut")
    render_until_killed(config, monkeypatch)
    partial = config.run_dir / LAYER / ".icons-2.partial"
    assert len(list(partial.glob("part-*.npz"))) == 1
    assert not (config.run_dir / LAYER / "icons-2").exists()
    lines = []
    summary = render.run(config, log=lines.append)
    assert summary.grids[0].resumed == config.render.batch_size
    assert any("resuming" in line for line in lines)
    assert not partial.exists()
    for size in (2, 3):
        meta_a, a = read_icons(whole, size)
        meta_b, b = read_icons(config, size)
        assert all(np.abs(a[c].astype(int) - b[c].astype(int)).max() <= 1 for c in a)
        assert [e["attempt"] for e in meta_a["icons"]] == [e["attempt"] for e in meta_b["icons"]]


def test_a_changed_config_discards_unfinished_batches(tmp_path, monkeypatch):
    config = toy_run(tmp_path / "run")
    render_until_killed(config, monkeypatch)
    other = dataclasses.replace(config, render=dataclasses.replace(config.render, seed=5))
    summary = render.run(other, log=quiet)
    assert summary.grids[0].resumed == 0


def test_icon_does_not_depend_on_its_batch():
    network = tiny_network()
    rng = np.random.default_rng(3)
    vectors = rng.random((4, 4)).astype(np.float32)
    seeds = [render.icon_seed(0, 3, x, 0, 0) for x in range(4)]
    r = render.icon_options(dataclasses.replace(RENDER, steps=12, scale=0.2, rotate=15))
    together = render.render_batch(network, LAYER, vectors, vectors, seeds, **r)
    alone = render.render_batch(network, LAYER, vectors[2:3], vectors[2:3], seeds[2:3], **r)
    shuffled = render.render_batch(network, LAYER, vectors[[3, 2]], vectors[[3, 2]], [seeds[3], seeds[2]], **r)
    for other, row in ((alone, 0), (shuffled, 1)):
        assert np.abs(together.images[2].astype(int) - other.images[row].astype(int)).max() <= 1
        assert together.objective[2] == pytest.approx(other.objective[row], rel=1e-3, abs=1e-4)
    assert not np.array_equal(together.images[0], together.images[1])


def test_missing_or_stale_grid_says_what_to_run(tmp_path):
    config = toy_run(tmp_path / "run")
    (config.run_dir / "grid.h5").unlink()
    with pytest.raises(AtlasError, match="atlas grid"):
        render.run(config, log=quiet)
    grid_stage.run(config, log=quiet)
    other = dataclasses.replace(config, grid=dataclasses.replace(config.grid, min_count=2))
    with pytest.raises(AtlasError, match="atlas grid"):
        render.run(other, log=quiet)


def test_whitened_objective_uses_the_whitened_directions(tmp_path):
    config = toy_run(tmp_path / "run", grid={"whiten": True}, whiten=True, attempts=1, sizes=(2,))
    render.run(config, log=quiet)
    meta, _ = read_icons(config, 2)
    assert "whitened" in meta["objective"] and len(meta["icons"]) == 4


def test_member_cosines_are_median_cosines_to_the_direction():
    acts = np.array([[1, 0], [1, 1], [0, 1], [2, 0], [0, 3]], np.float32)
    grid = Grid(2, np.array([[0, 0], [1, 0]], np.int32), np.array([3, 2], np.int32),
                           np.array([[1, 0], [0, 1]], np.float32), np.array([0, 3, 5]), np.array([0, 1, 3, 2, 4]))
    (cos,) = render.member_cosines(acts, [grid])
    np.testing.assert_allclose(cos, [np.median([1, 2 ** -0.5, 1]), np.median([1, 1])], rtol=1e-6)


def test_icon_seeds_and_best_attempt():
    assert render.icon_seed(0, 10, 1, 2, 0) == render.icon_seed(0, 10, 1, 2, 0)
    seeds = {render.icon_seed(s, n, x, y, a) for s in (0, 1) for n in (10, 20) for x in range(3) for y in range(3)
             for a in range(2)}
    assert len(seeds) == 2 * 2 * 9 * 2
    np.testing.assert_array_equal(render.pick_best(np.array([1.0, 3.0, 5.0, 2.0]), 2), [1, 0])


@pytest.mark.slow
def test_lite0_icon_does_not_depend_on_its_batch():
    model = load_model("efficientnet_lite0")
    module = model.module.to(memory_format=torch.channels_last)
    network = optvis.Network(module, ["blocks.10"], normalise=model.preprocess.normalise, channels_last=True)
    vectors = np.random.default_rng(0).random((3, 112)).astype(np.float32)
    seeds = [render.icon_seed(0, 10, x, 1, 0) for x in range(3)]
    r = render.icon_options(RenderConfig(icon_size=48, steps=16, pad=8, jitter=8, scale=0.2, rotate=15))
    together = render.render_batch(network, "blocks.10", vectors, vectors, seeds, **r)
    for rows in ([1], [2, 1]):
        other = render.render_batch(network, "blocks.10", vectors[rows], vectors[rows], [seeds[i] for i in rows], **r)
        j = rows.index(1)
        assert np.abs(together.images[1].astype(int) - other.images[j].astype(int)).max() <= 1
        assert together.objective[1] == pytest.approx(other.objective[j], rel=1e-4)


# --------------------------------------------------------------------------------- icon size per layer


@pytest.mark.parametrize("stride, minimum, strides, side", [
    (8, 64, 5, 72), (16, 64, 5, 80), (32, 64, 5, 160), (32, 64, 3, 96), (2, 64, 5, 66), (64, 64, 5, 320),
    (16, 48, 3, 48), (24, 64, 3, 72), (7, 10, 3, 21), (4, 8, 4, 20)])
def test_icon_size_for_stride_is_an_odd_number_of_enough_strides(stride, minimum, strides, side):
    assert render.icon_size_for_stride(stride, minimum, strides) == side
    n = side // stride
    assert side % stride == 0 and n % 2 == 1 and n >= strides and side >= minimum


def test_auto_icon_size_is_measured_on_the_layer():
    network = tiny_network()  # "deep": a 3x3 stride-2 conv, padding 1
    side = render.auto_icon_size(network, LAYER, minimum=8, min_strides=3)
    assert side == 10 and render.map_hw(network, LAYER, side) == (5, 5)  # 5 strides: a centre and two rings
    assert render.auto_icon_size(network, LAYER, minimum=8, min_strides=7) == 14
    assert render.auto_icon_size(network, LAYER) == 66  # 33 strides of 2: at least 64 px
    features = optvis.Network(load_model("tiny:make", "none", PREPROCESS).module, ["features"])
    with pytest.raises(ValueError):
        render.icon_size_for_stride(0)
    assert render.auto_icon_size(features, "features", minimum=16, min_strides=3) == 17  # stride 1: 17 is odd


def test_icon_size_for_a_map_overrides_and_icons_json_records_it(tmp_path):
    config = toy_run(tmp_path / "run", attempts=1, steps=2, icon_size=0, sizes=(2,), icon_size_for={LAYER: 20})
    summary = render.run(config, log=quiet)
    meta, images = read_icons(config, 2)
    assert meta["icon_size"] == 20 and all(im.shape == (20, 20, 3) for im in images.values())
    assert summary.grids[0].icons == len(images)
    assert config.render.icon_size_of(LAYER) == 20 and config.render.icon_size_of(f"{LAYER}/class-x") == 20
    assert RenderConfig(icon_size=48).icon_size_of("any") == 48


def test_icons_depend_on_their_own_maps_size_only_and_a_mistyped_map_is_refused(tmp_path):
    config = toy_run(tmp_path / "run", attempts=1, steps=2, icon_size=0, sizes=(2,), icon_size_for={LAYER: 20})
    render.run(config, log=quiet)
    # the same size set another way, or compile: the icons stay current
    same = toy_run(tmp_path / "run", attempts=1, steps=2, icon_size=20, sizes=(2,), compile=True)
    spec = Run(same.run_dir, same).grid_file("render").specs[0]
    assert Run(same.run_dir, same).icons_state(spec, Run(same.run_dir, same).grid_file("render").grid(LAYER, 2))[0] \
        == "current"
    typo = f"{LAYER}/class-goldfsh"  # config knows the layer; only the run knows its maps
    with pytest.raises(AtlasError, match=f"render.icon_size_for names '{typo}', which is not a map of this run"):
        render.run(toy_run(tmp_path / "run", sizes=(2,), icon_size_for={typo: 20}), log=quiet)


def test_render_with_a_schedule_and_early_stopping_records_each_icons_steps(tmp_path):
    config = toy_run(tmp_path / "run", attempts=1, steps=24, sizes=(2,), schedule="cosine", warmup=2,
                     stop_window=2, stop_rise=0.5)
    lines = []
    render.run(config, log=lines.append)
    meta, _ = read_icons(config, 2)
    steps = [e["steps"] for e in meta["icons"]]
    assert all(4 <= s <= 24 for s in steps) and min(steps) < 24  # a 50% rise per window: they stop early
    assert meta["steps"] == 24 and any("steps on average (of 24)" in line for line in lines)


def test_best_member_objective_is_the_largest_atlas_objective_of_a_cell_member():
    acts = np.array([[1, 0], [1, 1], [0, 1], [2, 0], [0, 3]], np.float32)
    grid = Grid(2, np.array([[0, 0], [1, 0]], np.int32), np.array([3, 2], np.int32),
                np.array([[1, 0], [0, 1]], np.float32), np.array([0, 3, 5]), np.array([0, 1, 3, 2, 4]))
    vectors = np.array([[2, 0], [0, 1]], np.float32)
    (best,) = render.best_member_objectives(acts, [grid], [vectors], cos_power=2)
    # cell 0 (w = (2, 0)): members (1, 0) -> 2, (1, 1) -> 2 * 0.5, (2, 0) -> 4; cell 1 (w = (0, 1)): (0, 1) -> 1, (0, 3) -> 3
    np.testing.assert_allclose(best, [4, 3], rtol=1e-6)
    (floored,) = render.best_member_objectives(np.array([[1, -1], [0, 1]], np.float32),
                                               [Grid(1, np.array([[0, 0]], np.int32), np.array([1], np.int32),
                                                     np.array([[1, 0]], np.float32), np.array([0, 1]),
                                                     np.array([0]))], [np.array([[1, 0]], np.float32)], 3)
    np.testing.assert_allclose(floored, [1 * (2 ** -0.5) ** 3], rtol=1e-6)
