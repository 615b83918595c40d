"""Grid stage: exact binning, cell summaries, whitening, labels, the grid.h5 artifact and skipping."""

import time

import h5py
import numpy as np
import pytest
from toy_runs import file_attrs, record_sample_reads, toy_config, write_activations, write_layout

from atlas.cli import main as cli_main
from atlas.config import load_config, save_config
from atlas.errors import AtlasError
from atlas import blocks
from atlas.grid import bin_grid, bin_grids, bin_layout, run, top_classes, whiten_directions, whitening_matrix
from atlas.store import Grid, GridFile, GridSet, Run

# ---------------------------------------------------------------------------------------------
# bin_layout


def test_bin_layout_edges_go_to_the_cell_above_and_one_to_the_last():
    below = np.nextafter(0.25, 0)
    xy = np.array([[0.0, 0.0], [0.25, 0.0], [below, 0.0], [0.5, 0.75], [0.999, 0.0], [1.0, 1.0], [0.0, 1.0]])
    # size 4: columns [0, .25), [.25, .5), [.5, .75), [.75, 1]; id = y * 4 + x
    assert bin_layout(xy, 4).tolist() == [0, 1, 0, 3 * 4 + 2, 3, 15, 12]


def test_bin_layout_uses_exact_edges_where_x_times_n_rounds_down():
    x = 1 / 49  # x * 49 == 0.9999999999999999 in float64, yet x is the edge of column 1
    assert bin_layout(np.array([[x, 0.0]]), 49).tolist() == [1]
    xs = np.arange(50) / 49
    assert bin_layout(np.stack([xs, np.zeros(50)], 1), 49).tolist() == list(range(49)) + [48]


def test_bin_layout_float32_and_size_one():
    xy = np.array([[0.3, 0.7], [1.0, 0.0]], np.float32)
    assert bin_layout(xy, 1).tolist() == [0, 0]
    # float32(0.7) is just below 0.7, so it stays in row 6; float32(0.3) is just above 0.3
    assert bin_layout(xy, 10).tolist() == [6 * 10 + 3, 9]


@pytest.mark.parametrize("bad", [[[-0.1, 0.5]], [[0.5, 1.01]], [[np.nan, 0.5]]])
def test_bin_layout_rejects_positions_outside_the_unit_square(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bin_layout(np.array(bad), 4)


# ---------------------------------------------------------------------------------------------
# grid_cells


def toy_grid_input():
    # size 2 cells: (0,0) gets rows 0, 2, 5; (1,0) gets row 1; (1,1) gets rows 3 and 4 (one at 1.0)
    xy = np.array([[0.1, 0.1], [0.9, 0.2], [0.4, 0.0], [0.5, 0.5], [1.0, 1.0], [0.0, 0.49]])
    acts = np.arange(12, dtype=np.float32).reshape(6, 2)
    attr = np.array([[1, 0, 0], [0, 1, 0], [3, 0, 1], [0, 0, 2], [0, 4, 2], [2, 0, 0]], np.float32)
    return xy, acts, attr


def test_grid_cells_exact_on_a_toy_layout():
    xy, acts, attr = toy_grid_input()
    grid = bin_grid(xy, acts, attr, 2, min_count=2, top_k=2)
    assert grid.cell.tolist() == [[0, 0], [1, 1]]  # (1, 0) has one sample < min_count
    assert grid.cell.dtype == np.int32 and grid.count.dtype == np.int32
    assert grid.count.tolist() == [3, 2]
    assert grid.indptr.tolist() == [0, 3, 5] and grid.indptr.dtype == np.int64
    assert grid.index.tolist() == [0, 2, 5, 3, 4] and grid.index.dtype == np.int64
    np.testing.assert_allclose(grid.direction, [acts[[0, 2, 5]].mean(0), acts[[3, 4]].mean(0)])
    assert grid.direction.dtype == np.float32
    np.testing.assert_allclose(grid.attr, [[2, 0, 1 / 3], [0, 2, 2]])
    assert grid.top_class.tolist() == [[0, 2], [1, 2]]  # the tie 2 == 2 goes to the lower class
    np.testing.assert_allclose(grid.top_attr, [[2, 1 / 3], [2, 2]])
    assert grid.top_class.dtype == np.int32 and grid.top_attr.dtype == np.float32
    assert grid.members(1).tolist() == [3, 4]
    assert grid.n_samples == 6 and grid.min_count == 2


def test_min_count_is_inclusive_and_without_attribution_there_are_no_labels():
    xy, acts, _ = toy_grid_input()
    grid = bin_grid(xy, acts, None, 2, min_count=1)
    assert grid.cell.tolist() == [[0, 0], [1, 0], [1, 1]]
    assert grid.attr is None and grid.top_class is None
    assert grid.labels(["a"]) == [[], [], []]
    assert len(bin_grid(xy, acts, None, 2, min_count=3)) == 1


def test_no_surviving_cell_is_an_error_that_suggests_a_fix():
    xy, acts, _ = toy_grid_input()
    with pytest.raises(AtlasError, match="smaller grid size.*lower grid.min_count"):
        bin_grid(xy, acts, None, 4, min_count=4)


def naive_cells(xy, acts, size, min_count):
    """Lucid-style loop over every cell, as the reference."""
    col = np.minimum((xy * size).astype(int), size - 1)
    out = []
    for y in range(size):
        for x in range(size):
            rows = np.flatnonzero((col[:, 0] == x) & (col[:, 1] == y))
            if len(rows) >= min_count:
                out.append(((x, y), rows, acts[rows].astype(np.float64).mean(0)))
    return out


def test_grid_cells_matches_a_loop_over_cells_with_blocked_hdf5_reads(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    xy = rng.random((2000, 2)) ** 2  # uneven density; no value sits on an edge
    acts = rng.random((2000, 5)).astype(np.float16)
    attr = rng.normal(size=(2000, 4)).astype(np.float16)
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        h5["acts"], h5["attr"] = acts, attr
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 7 * 4 * 5)  # 7-row blocks: many partial sums
    with h5py.File(tmp_path / "a.h5", "r") as h5:
        grids = bin_grids(xy, h5["acts"], h5["attr"], (7, 3, 7), min_count=5, top_k=2)
    assert list(grids) == [7, 3]
    for size, grid in grids.items():
        expected = naive_cells(xy, acts, size, 5)
        assert grid.cell.tolist() == [list(c) for c, _, _ in expected]
        for i, (_, rows, mean) in enumerate(expected):
            assert grid.members(i).tolist() == rows.tolist()
            np.testing.assert_allclose(grid.direction[i], mean, rtol=1e-6)
            np.testing.assert_allclose(grid.attr[i], attr[rows].astype(np.float64).mean(0), rtol=1e-5, atol=1e-7)
        ids = grid.cell[:, 1] * size + grid.cell[:, 0]
        assert (np.diff(ids) > 0).all()  # ordered by y, then x


def test_nan_in_activations_or_attributions_is_an_error():
    xy, acts, attr = toy_grid_input()
    acts[2, 1] = np.nan
    with pytest.raises(AtlasError, match="NaN or inf"):
        bin_grid(xy, acts, None, 2, min_count=1)
    acts[2, 1] = 0
    attr[0, 0] = np.inf
    with pytest.raises(AtlasError, match="attributions contain NaN or inf"):
        bin_grid(xy, acts, attr, 2, min_count=1)


def test_binning_a_million_samples_into_160x160_takes_seconds():
    rng = np.random.default_rng(0)
    xy = rng.random((1_000_000, 2)).astype(np.float32)
    acts = rng.random((1_000_000, 8), dtype=np.float32)
    t0 = time.perf_counter()
    grid = bin_grid(xy, acts, None, 160, min_count=3)
    assert time.perf_counter() - t0 < 20
    assert len(grid) == 160 * 160 and grid.indptr[-1] == 1_000_000  # about 39 samples per cell


# ---------------------------------------------------------------------------------------------
# whitening and labels


def test_whitening_matches_a_direct_inverse(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    acts = (rng.random((500, 6)) @ rng.random((6, 6))).astype(np.float32)
    acts[:, 5] = acts[:, 4]  # singular second moment: the ridge must make it invertible
    moment = acts.astype(np.float64).T @ acts / len(acts)
    eps = 1e-3
    direct = np.linalg.inv(moment + eps * np.trace(moment) / 6 * np.eye(6))
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 4 * 6 * 64)
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        h5["acts"] = acts
        s = whitening_matrix(h5["acts"], eps)
    assert s.dtype == np.float32 and s.shape == (6, 6)
    np.testing.assert_allclose(s, direct, rtol=2e-3, atol=1e-3 * np.abs(direct).max())
    np.testing.assert_array_equal(s, s.T)
    v = rng.random((3, 6)).astype(np.float32)
    np.testing.assert_allclose(whiten_directions(v, s), v.astype(np.float64) @ s, rtol=1e-5)


def test_whitening_all_zero_activations_is_an_error():
    with pytest.raises(AtlasError, match="whiten = false"):
        whitening_matrix(np.zeros((10, 3), np.float32))


def test_top_classes_order_ties_and_k_capped():
    attr = np.array([[0.1, 0.5, 0.5, -1.0], [3.0, 2.0, 1.0, 0.0]])
    idx, val = top_classes(attr, 2)
    assert idx.tolist() == [[1, 2], [0, 1]]
    np.testing.assert_allclose(val, [[0.5, 0.5], [3.0, 2.0]])
    idx, val = top_classes(attr, 10)
    assert idx.tolist() == [[1, 2, 0, 3], [0, 1, 2, 3]]


def test_grid_find_and_labels():
    xy, acts, attr = toy_grid_input()
    grid = bin_grid(xy, acts, attr, 2, min_count=2, top_k=2)
    assert grid.find(1, 1) == 1 and grid.find(0, 0) == 0 and grid.find(1, 0) is None
    assert grid.labels(["cat", "dog", "eel"])[1] == [("dog", 2.0), ("eel", 2.0)]
    assert grid.labels()[0][0][0] == "class 0"


# ---------------------------------------------------------------------------------------------
# artifact and stage


def assert_grids_equal(a: Grid, b: Grid):
    for key in ("cell", "count", "direction", "indptr", "index", "attr", "top_class", "top_attr",
                "direction_whitened"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None) == (y is None), key
        if x is not None:
            assert x.dtype == y.dtype, key
            np.testing.assert_array_equal(x, y, err_msg=key)
    assert (a.size, a.min_count, a.n_samples) == (b.size, b.min_count, b.n_samples)


def test_gridset_save_load_round_trip(tmp_path):
    xy, acts, attr = toy_grid_input()
    grids = bin_grids(xy, acts, attr, (1, 2), min_count=1, top_k=2)
    s = whitening_matrix(acts, 0.1)
    for grid in grids.values():
        grid.direction_whitened = whiten_directions(grid.direction, s)
    plain = bin_grids(xy, acts, None, (2,), min_count=2)
    original = GridSet({"blocks.1": grids, "head": plain}, {"blocks.1": s}, ["a", "b", "c"], ["n1", "n2", "n3"],
                       "fp", "layout-fp", "acts-fp", {"grid": {"sizes": [1, 2]}}, 0.1)
    original.save(tmp_path / "grid.h5")
    loaded = GridSet.load(tmp_path / "grid.h5")
    assert list(loaded.grids) == ["blocks.1", "head"]
    for layer, sizes in original.grids.items():
        assert list(loaded.grids[layer]) == list(sizes)
        for size, grid in sizes.items():
            assert_grids_equal(grid, loaded.grids[layer][size])
    np.testing.assert_array_equal(loaded.whitening["blocks.1"], s)
    assert "head" not in loaded.whitening
    assert (loaded.class_names, loaded.class_wnids) == (["a", "b", "c"], ["n1", "n2", "n3"])
    assert (loaded.fingerprint, loaded.inputs, loaded.activations_fingerprint) == ("fp", "layout-fp", "acts-fp")
    assert loaded.config == {"grid": {"sizes": [1, 2]}} and loaded.whiten_eps == 0.1
    grids = GridFile(tmp_path / "grid.h5")
    assert_grids_equal(grids.grid("head", 2), plain[2])
    assert grids.class_names == ["a", "b", "c"] and grids.sizes("blocks.1") == [1, 2]
    with pytest.raises(AtlasError, match="no 5x5 grid for 'head'"):
        grids.grid("head", 5)


def toy_run(tmp_path, attribution=True, fingerprint="toy-activations", **grid):
    rng = np.random.default_rng(0)
    acts = {"blocks.1": rng.random((300, 4)).astype(np.float16), "blocks.2": rng.random((300, 3)).astype(np.float16)}
    attr = {k: rng.normal(size=(300, 5)).astype(np.float32) for k in acts} if attribution else None
    write_activations(tmp_path, acts, attr, class_names=list("abcde"), wnids=[f"n{i}" for i in range(5)],
                      fingerprint=fingerprint)
    config = toy_config(tmp_path, layers=tuple(acts), grid={"sizes": (2, 4), "min_count": 3, "top_classes": 2,
                                                           **grid})
    xy = {k: rng.random((300, 2)) for k in acts}
    write_layout(config, xy)
    return config, acts, attr, xy


def test_run_writes_grid_h5_and_skips_when_up_to_date(tmp_path):
    config, acts, attr, xy = toy_run(tmp_path)
    lines = []
    summary = run(config, log=lines.append)
    assert not summary.skipped and set(summary.cells) == {"blocks.1", "blocks.2"}
    assert len(lines) == 3 and lines[0].startswith("grid: layer blocks.1: 300 samples; 2x2 4 cells")
    path = tmp_path / "grid.h5"
    attrs = file_attrs(path)
    assert attrs["stage"] == "grid" and attrs["complete"] and attrs["layers"] == ["blocks.1", "blocks.2"]
    assert attrs["sizes"] == [2, 4] and attrs["config"]["grid"]["min_count"] == 3
    with h5py.File(path, "r") as h5:
        g = h5["blocks.2/4"]
        assert g["cell"].dtype == np.int32 and g["count"].dtype == np.int32
        assert g["direction"].shape[1] == 3 and g["direction"].dtype == np.float32
        assert g["attr"].shape[1] == 5 and g["top_class"].shape[1] == 2
        assert g["indptr"].dtype == np.int64 and g["index"].dtype == np.int64
        assert "direction_whitened" not in g and "whitening" not in h5["blocks.2"]
        assert list(h5["classes/name"].asstr()[()]) == list("abcde")
        assert h5["classes/wnid"].asstr()[0] == "n0"
    expected = bin_grid(xy["blocks.2"], acts["blocks.2"], attr["blocks.2"].astype(np.float16), 4, min_count=3, top_k=2)
    assert_grids_equal(Run(tmp_path, config).grid("blocks.2", 4), expected)

    lines.clear()
    assert run(config, log=lines.append).skipped
    assert lines == [f"grid: up to date, skipped ({path})"]
    assert not run(config, force=True, log=lines.append).skipped


def test_changed_grid_config_redoes_and_whitening_is_stored(tmp_path):
    config, acts, _, _ = toy_run(tmp_path)
    run(config, log=lambda _: None)
    before = file_attrs(tmp_path / "grid.h5")["fingerprint"]
    changed = toy_config(tmp_path, layers=config.layers, grid={"sizes": (2, 4), "min_count": 3, "top_classes": 2,
                                                              "whiten": True})
    assert not run(changed, log=lambda _: None).skipped
    assert file_attrs(tmp_path / "grid.h5")["fingerprint"] != before
    gs = GridSet.load(tmp_path / "grid.h5")
    s = gs.whitening["blocks.1"]
    np.testing.assert_allclose(s, whitening_matrix(acts["blocks.1"], changed.grid.whiten_eps), rtol=1e-6)
    grid = gs.grids["blocks.1"][4]
    np.testing.assert_allclose(grid.direction_whitened, grid.direction.astype(np.float64) @ s, rtol=1e-5)


def test_grid_refuses_a_missing_or_stale_layout(tmp_path):
    config, _, _, _ = toy_run(tmp_path)
    stale = toy_config(tmp_path, layers=config.layers, layout={"min_dist": 0.5})
    with pytest.raises(AtlasError, match=r"layout.h5 is out of date \(made with another \[layout\] config.*atlas layout"):
        run(stale, log=lambda _: None)
    (tmp_path / "layout.h5").unlink()
    with pytest.raises(AtlasError, match="layout.h5 not found; run `atlas layout"):
        run(config, log=lambda _: None)
    (tmp_path / "activations.h5").unlink()
    with pytest.raises(AtlasError, match="activations.h5 not found; run `atlas collect"):
        run(config, log=lambda _: None)


def test_new_activations_redo_the_grid_and_no_attribution_means_no_labels(tmp_path):
    config, _, _, _ = toy_run(tmp_path)
    run(config, log=lambda _: None)
    config, _, _, _ = toy_run(tmp_path, attribution=False, fingerprint="recollected")  # new activations, layout
    write_layout(config, {k: np.random.default_rng(1).random((300, 2)) for k in config.layers})
    assert not run(config, log=lambda _: None).skipped
    grid = Run(tmp_path, config).grid("blocks.1", 2)
    assert grid.attr is None and grid.top_class is None


def test_run_names_the_layer_when_no_cell_survives(tmp_path):
    config, _, _, _ = toy_run(tmp_path, sizes=(40,), min_count=50)
    with pytest.raises(AtlasError, match="grid of layer 'blocks.1': no cell of the 40x40 grid"):
        run(config, log=lambda _: None)
    assert not (tmp_path / "grid.h5").exists()


def test_cli_grid_on_a_run_directory(tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_activations(tmp_path, {"blocks.1": rng.random((100, 4)).astype(np.float32)})
    save_config(toy_config(tmp_path, grid={"sizes": (2,)}))
    assert cli_main(["grid", str(tmp_path)]) == 2
    assert "run `atlas layout" in capsys.readouterr().err
    write_layout(load_config(tmp_path), {"blocks.1": rng.random((100, 2))})
    assert cli_main(["grid", str(tmp_path)]) == 0
    assert "grid: layer blocks.1: 100 samples" in capsys.readouterr().out
    assert len(Run.open(tmp_path).grid("blocks.1", 2)) == 4


def test_grid_stage_reads_the_samples_a_block_at_a_time(tmp_path, monkeypatch):
    config, *_ = toy_run(tmp_path, whiten=True)  # whitening reads every sample too
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 4 * 3 * 50)  # blocks of at most 50 of the 300 rows
    reads = record_sample_reads(monkeypatch)
    run(config, log=lambda _: None)
    assert reads and max(reads) <= 50
