"""Class atlases and two-class views: sample selection, the pair axis, naming, and the layout and
grid stages over toy runs."""

import dataclasses

import h5py
import numpy as np
import pytest

from atlas import blocks
from atlas import grid as grid_stage
from atlas import layout as layout_stage
from atlas.errors import AtlasError
from atlas.focus import MapSpec, class_rows, class_scores, find_class, pair_axis, plan_maps, slug
from atlas.store import GridSet, Layout, Run, maps_from_json, maps_to_json
from toy_runs import toy_clusters, toy_config, write_activations

NAMES = ["tench", "goldfish", "great white shark", "tiger shark"]
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


def quiet(line):
    pass


def test_class_rows_takes_the_top_ranked_and_the_most_attributed_samples():
    top = np.array([1, 0, 1, 2, 0, 0, 3])
    score = np.array([0.5, 3.0, -1.0, 2.0, 2.0, 0.0, -0.5])  # attribution of each sample to class 0
    # class 0 ranks first in rows 1, 4, 5; the two most attributed are rows 1 and (3 or 4: tie -> 3)
    np.testing.assert_array_equal(class_rows(top, score, 0, 2), [1, 3, 4, 5])
    np.testing.assert_array_equal(class_rows(top, score, 0, 0), [1, 4, 5])
    # only positive attributions are added, however many are asked for
    np.testing.assert_array_equal(class_rows(top, score, 0, 100), [0, 1, 3, 4, 5])
    assert class_rows(top, score, 9, 0).dtype == np.int64 and len(class_rows(top, score, 9, 0)) == 0


def test_class_scores_reads_in_blocks():
    attr = np.array([[0, 1, 2], [5, 1, 0], [1, 1, 1], [0, 3, 3]], np.float16)
    top, scores = class_scores(attr, [2, 0], rows=3)
    np.testing.assert_array_equal(top, [2, 0, 0, 1])  # ties go to the lowest class index
    np.testing.assert_array_equal(scores, [[2, 0], [0, 5], [1, 1], [3, 0]])


class _CountingReads:
    """An (n, C) array that records how many rows each read asks for, as an h5py dataset would be read."""

    def __init__(self, values):
        self.values, self.shape, self.reads = values, values.shape, []

    def __len__(self):
        return len(self.values)

    def __getitem__(self, key):
        block = self.values[key]
        self.reads.append(len(block))
        return block


def test_class_scores_reads_blocks_sized_by_bytes(monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 4 * 50 * 7)  # 7 rows of 50 float32 classes
    attr = np.random.default_rng(0).standard_normal((100, 50)).astype(np.float16)
    stored = _CountingReads(attr)
    top, scores = class_scores(stored, (3, 0))
    assert max(stored.reads) == 7 and sum(stored.reads) == 100  # never more than one block of rows in memory
    assert top.tolist() == attr.astype(np.float32).argmax(axis=1).tolist()
    np.testing.assert_array_equal(scores, attr[:, [3, 0]].astype(np.float32))


def test_pair_axis_scales_by_the_99th_percentile_and_clips():
    diff = np.concatenate([np.linspace(-1, 1, 101), [50.0]])
    x = pair_axis(diff)
    scale = np.percentile(np.abs(diff), 99)
    np.testing.assert_allclose(x[:101], (np.clip(np.linspace(-1, 1, 101) / scale, -1, 1) + 1) / 2, atol=1e-6)
    assert x[-1] == 1.0 and x[50] == 0.5 and x.dtype == np.float32
    np.testing.assert_array_equal(pair_axis(np.zeros(5)), np.full(5, 0.5))


def test_plan_maps_names_and_errors():
    maps = plan_maps(["a.1", "b"], ["Goldfish", "n01491361"], [["tench", "2"]], NAMES, WNIDS)
    assert [m.name for m in maps] == ["a.1", "a.1/class-goldfish", "a.1/class-tiger-shark",
                                      "a.1/pair-tench-great-white-shark", "b", "b/class-goldfish",
                                      "b/class-tiger-shark", "b/pair-tench-great-white-shark"]
    assert maps[3] == MapSpec("a.1/pair-tench-great-white-shark", "a.1", "pair", (0, 2), ("tench", "great white shark"))
    assert maps_from_json(maps_to_json(maps)) == maps
    assert [m.name for m in plan_maps(["a", "b"], ["tench"], [], NAMES, WNIDS, focus_layers=["b"])] == [
        "a", "b", "b/class-tench"]
    assert "great white shark (right)" in maps[3].title
    assert slug("African grey, African gray") == "african-grey-african-gray"
    with pytest.raises(AtlasError, match="unknown class 'goldfsh'; did you mean 'goldfish'"):
        plan_maps(["a"], ["goldfsh"], [], NAMES, WNIDS)
    with pytest.raises(AtlasError, match="same class"):
        plan_maps(["a"], [], [["tench", "n01440764"]], NAMES, WNIDS)
    with pytest.raises(AtlasError, match="both be named 'a/class-tench'"):
        plan_maps(["a"], ["tench", "0"], [], NAMES, WNIDS)
    assert find_class("3", None) == 3
    with pytest.raises(AtlasError, match="no class names"):
        find_class("tench", None)


def focus_run(tmp_path, classes=("goldfish",), pairs=(("tench", "goldfish"),), class_top=30, attribution=True):
    """A toy run whose attribution says which cluster a sample belongs to (cluster k -> class k)."""
    acts, labels = toy_clusters(160, 6, 4, seed=3)
    rng = np.random.default_rng(0)
    attr = rng.normal(0, 0.1, (len(labels), 4)).astype(np.float32)
    attr[np.arange(len(labels)), labels] += 1.0 + rng.random(len(labels))
    config = toy_config(tmp_path / "run", layers=("blocks.1",),
                        layout={"n_neighbors": 5, "trust_samples": 50, "classes": tuple(classes),
                                "pairs": tuple(tuple(p) for p in pairs), "class_top": class_top},
                        grid={"sizes": (2, 4), "min_count": 1})
    write_activations(config.run_dir, {"blocks.1": acts}, {"blocks.1": attr} if attribution else None,
                      class_names=NAMES, wnids=WNIDS)
    return config, labels, attr


def test_class_atlas_and_pair_view_through_layout_and_grid(tmp_path):
    config, labels, attr = focus_run(tmp_path)
    layout_stage.run(config, log=quiet)
    layout = Layout.load(config.run_dir / "layout.h5")
    assert list(layout.maps) == ["blocks.1", "blocks.1/class-goldfish", "blocks.1/pair-tench-goldfish"]
    assert [m.kind for m in layout.specs] == ["layer", "class", "pair"]
    assert layout.maps["blocks.1"].rows is None and len(layout.maps["blocks.1"].xy) == 160

    top = attr.astype(np.float16).astype(np.float32).argmax(1)
    goldfish = layout.maps["blocks.1/class-goldfish"]
    # cluster 1's 40 samples rank goldfish first; the 30 most attributed are among them
    np.testing.assert_array_equal(goldfish.rows, np.flatnonzero(top == 1))
    assert goldfish.xy.shape == (40, 2) and goldfish.info["kind"] == "class"
    assert 0 <= goldfish.xy.min() and goldfish.xy.max() <= 1

    pair = layout.maps["blocks.1/pair-tench-goldfish"]
    np.testing.assert_array_equal(pair.rows, np.flatnonzero((top == 0) | (top == 1)))
    # x = attribution to goldfish minus tench: tench's samples left of the middle, goldfish's right
    x = pair.xy[:, 0]
    assert (x[labels[pair.rows] == 0] < 0.5).all() and (x[labels[pair.rows] == 1] > 0.5).all()
    a16 = attr.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(x, pair_axis(a16[pair.rows, 1] - a16[pair.rows, 0]), atol=1e-6)

    grid_stage.run(config, log=quiet)
    grids = GridSet.load(config.run_dir / "grid.h5")
    assert list(grids.grids) == list(layout.maps)
    for name, size in (("blocks.1/class-goldfish", 2), ("blocks.1/pair-tench-goldfish", 4)):
        grid = grids.grids[name][size]
        rows = layout.maps[name].rows
        assert np.isin(grid.index, rows).all() and grid.indptr[-1] == len(rows)  # min_count 1 keeps them all
        with Run(config.run_dir, config).activations() as run_acts:
            acts = run_acts.layer("blocks.1").acts[()]
        for i in range(len(grid)):  # members are the layer's sample rows: directions are their means
            np.testing.assert_allclose(grid.direction[i], acts[grid.members(i)].mean(0), rtol=1e-5)
    assert (grids.grids["blocks.1/class-goldfish"][2].top_class[:, 0] == 1).all()


def test_focus_maps_need_attribution_and_enough_samples(tmp_path):
    config, _, _ = focus_run(tmp_path / "a", attribution=False)
    with pytest.raises(AtlasError, match="collect.attribution = true"):
        layout_stage.run(config, log=quiet)
    config, _, _ = focus_run(tmp_path / "b", classes=("tiger shark",), pairs=(), class_top=0)
    layout_stage.run(config, log=quiet)  # cluster 3 ranks tiger shark first: 40 samples
    config = dataclasses.replace(config, layout=dataclasses.replace(config.layout, classes=("great white shark",)))
    with h5py.File(config.run_dir / "activations.h5", "a") as h5:
        attr = h5["layers/blocks.1/attr"][()]
        attr[:, 2] = -5  # no sample is attributed to class 2
        h5["layers/blocks.1/attr"][...] = attr
    with pytest.raises(AtlasError, match=r"'blocks.1/class-great-white-shark' \(0 samples.*too few.*class_top"):
        layout_stage.run(config, log=quiet)
