"""Layout stage: normalisation, UMAP on toy clusters (few, tiny: umap-learn JIT-compiles per process),
the subsample-and-transform path, degenerate inputs, layout.h5 and skipping; the torchdr backend
and placing samples by their nearest fit samples."""

import dataclasses

import h5py
import numpy as np
import pytest
import torch
from toy_runs import file_attrs, record_sample_reads, toy_clusters, toy_config, write_activations

from atlas import blocks
from atlas import layout as layout_mod
from atlas.config import LayoutConfig
from atlas.errors import AtlasError
from atlas.focus import MapSpec
from atlas.layout import check_spread, fit_projection, layout_2d, normalize_layout, run, trustworthiness_of
from atlas.store import Layout, MapLayout, Run


def neighbour_purity(xy, labels, query, reference):
    """Fraction of `query` rows whose nearest `reference` row in 2-D has the same label."""
    d = ((xy[query, None, :] - xy[None, reference, :]) ** 2).sum(-1)
    return float((labels[reference][d.argmin(1)] == labels[query]).mean())


# ---------------------------------------------------------------------------------------------
# normalize_layout and other pure pieces


def test_normalize_layout_clips_percentiles_with_margin_then_scales():
    x = np.array([0.0, 1, 2, 3, 100])
    xy = np.stack([x, x * -2], 1)
    # p=25: x range [1, 3], widened by 0.5 * 2 each side -> clip to [0, 4] -> scale by 4
    out = normalize_layout(xy, clip_percentile=25, margin=0.5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(out[:, 1], [1, 0.75, 0.5, 0.25, 0])


def test_normalize_layout_without_clipping_is_min_max_and_flat_axes_go_to_the_middle():
    xy = np.array([[2.0, 5.0], [4.0, 5.0], [3.0, 5.0]])
    np.testing.assert_allclose(normalize_layout(xy, 0, 0), [[0, 0.5], [1, 0.5], [0.5, 0.5]])
    one = normalize_layout(np.array([[7.0, -1.0]]))
    np.testing.assert_allclose(one, [[0.5, 0.5]])


def test_normalize_layout_default_keeps_everything_in_the_unit_square():
    xy = np.random.default_rng(0).standard_cauchy((1000, 2))  # heavy outliers
    out = normalize_layout(xy)
    assert out.min() == 0 and out.max() == 1
    assert (out.min(0) == 0).all() and (out.max(0) == 1).all()


def test_fit_projection_keeps_the_top_subspace():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(400, 3)) @ rng.normal(size=(3, 8)) + 0.01 * rng.normal(size=(400, 8))).astype(np.float32)
    for center in (False, True):
        p = fit_projection(x, 3, center=center)
        assert p.components.shape == (8, 3) and p.kept > 0.999
        np.testing.assert_allclose(p.components.T @ p.components, np.eye(3), atol=1e-5)
        ref = x - x.mean(0) if center else x
        _, _, vt = np.linalg.svd(ref.astype(np.float64), full_matrices=False)
        # same subspace as the top right singular vectors
        np.testing.assert_allclose(np.abs(np.linalg.svd(vt[:3] @ p.components)[1]), 1, atol=1e-4)
        assert p(x[:5]).shape == (5, 3) and p(x[:5]).dtype == np.float32
    assert fit_projection(x, 0, center=False) is None
    assert fit_projection(x, 8, center=False) is None


def test_trustworthiness_of_a_perfect_and_a_tiny_embedding():
    x = np.random.default_rng(0).random((50, 2)).astype(np.float32)
    assert trustworthiness_of(x, x, 5, "euclidean") == pytest.approx(1.0)
    assert np.isnan(trustworthiness_of(x[:2], x[:2], 5, "euclidean"))


def test_check_spread_rejects_identical_and_parallel_rows():
    with pytest.raises(AtlasError, match="all 5 activation vectors are identical"):
        check_spread(np.ones((5, 3), np.float32), "euclidean")
    parallel = np.outer(np.arange(1, 6), [1.0, 2.0, 0.5]).astype(np.float32)
    check_spread(parallel, "euclidean")  # distinct points
    with pytest.raises(AtlasError, match="same point for the cosine metric"):
        check_spread(parallel, "cosine")


# ---------------------------------------------------------------------------------------------
# layout_2d (runs UMAP)

CLUSTERS = toy_clusters(600, 16, 6, seed=0)


def test_layout_of_separated_clusters_is_trustworthy_and_reproducible():
    acts, labels = CLUSTERS
    xy, info = layout_2d(acts, trust_samples=400)
    assert xy.shape == (600, 2) and xy.dtype == np.float32
    assert (xy.min(0) == 0).all() and (xy.max(0) == 1).all()
    assert info["trustworthiness"] > 0.9
    assert info["n_fit"] == 600 and info["n_neighbors"] == 20 and info["pca_dims"] == 0
    assert info["metric"] == "cosine" and info["trust_samples"] == 400
    everyone = np.arange(600)
    assert neighbour_purity(xy, labels, everyone[::7], np.setdiff1d(everyone, everyone[::7])) > 0.95
    again, _ = layout_2d(acts.copy(), trust_samples=400)
    np.testing.assert_array_equal(xy, again)


def test_subsample_fit_places_the_rest_with_transform(tmp_path, monkeypatch):
    acts, labels = CLUSTERS
    cfg = dict(fit_samples=250, trust_samples=300, seed=3)
    xy, info = layout_2d(acts, **cfg)
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 4 * 16 * 50)  # read the file 50 rows at a time
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        h5["acts"] = acts
        from_file, _ = layout_2d(h5["acts"], **cfg)
    np.testing.assert_array_equal(from_file, xy)
    assert info["n_fit"] == 250 and info["n_samples"] == 600 and info["transform_seconds"] > 0
    assert info["knn"] == "exact"
    fit = np.sort(np.random.default_rng(3).choice(600, 250, replace=False))  # the documented draw
    rest = np.setdiff1d(np.arange(600), fit)
    assert neighbour_purity(xy, labels, rest, fit) > 0.95
    assert info["trustworthiness"] > 0.9
    assert (xy >= 0).all() and (xy <= 1).all()


@pytest.mark.slow
def test_nearest_neighbour_descent_fit_and_transform(monkeypatch):
    # Past EXACT_KNN_PAIRS UMAP uses nearest-neighbour descent and its search index for transform;
    # forced here on a tiny array (compiling that path takes tens of seconds, hence slow).
    acts, labels = CLUSTERS
    monkeypatch.setattr(layout_mod, "EXACT_KNN_PAIRS", 0)
    cfg = dict(fit_samples=250, trust_samples=300, seed=3)
    xy, info = layout_2d(acts, **cfg)
    assert info["knn"] == "nn-descent" and info["n_fit"] == 250
    fit = np.sort(np.random.default_rng(3).choice(600, 250, replace=False))
    assert neighbour_purity(xy, labels, np.setdiff1d(np.arange(600), fit), fit) > 0.95
    np.testing.assert_array_equal(layout_2d(acts, **cfg)[0], xy)


def test_pca_option_records_what_it_kept():
    acts, _ = CLUSTERS
    xy, info = layout_2d(acts, pca_dims=5, trust_samples=300)
    assert info["pca_dims"] == 5 and 0 < info["pca_variance"] <= 1
    assert info["trustworthiness"] > 0.9


def test_fewer_samples_than_neighbours_lowers_n_neighbors():
    acts, _ = toy_clusters(12, 8, 2, seed=1)
    xy, info = layout_2d(acts, n_neighbors=20)
    assert info["n_neighbors"] == 11 and info["n_neighbors_requested"] == 20
    assert xy.shape == (12, 2) and np.isfinite(xy).all()


@pytest.mark.parametrize("make, message", [
    (lambda a: a[:3], "3 samples are too few"),
    (lambda a: np.ones_like(a), "are identical"),
    (lambda a: np.outer(np.arange(1, len(a) + 1), a[0]), "same point for the cosine metric"),
    (lambda a: np.where(np.arange(len(a))[:, None] == 7, np.nan, a), r"1 of 40 .*NaN or inf \(first: row 7\)"),
    (lambda a: np.where(np.arange(len(a))[:, None] >= 38, np.inf, a), r"2 of 40 .*collect.dtype"),
])
def test_degenerate_input_is_a_clear_error_before_umap(make, message):
    acts, _ = toy_clusters(40, 8, 2)
    with pytest.raises(AtlasError, match=message):
        layout_2d(make(acts).astype(np.float32))


def test_unknown_metric_is_an_error():
    with pytest.raises(AtlasError, match="did you mean 'cosine'"):
        layout_2d(np.zeros((10, 2), np.float32), metric="cosin")
    with pytest.raises(AtlasError, match="layout.metric must be one of"):
        LayoutConfig(metric="cosin")


# ---------------------------------------------------------------------------------------------
# artifact and stage


def test_layout_save_load_round_trip(tmp_path):
    info = {"n_samples": 3, "metric": "cosine", "trustworthiness": 0.5, "min_dist": 0.01}
    rows = np.array([0, 2], np.int64)
    original = Layout({"blocks.10": MapLayout(np.array([[0, 1], [0.5, 0.5], [1, 0]], np.float32), info),
                       "a.b.c": MapLayout(np.zeros((0, 2), np.float32), {}),
                       "blocks.10/class-tench": MapLayout(np.array([[0, 0], [1, 1]], np.float32), {"kind": "class"},
                                                          rows)},
                      "fp", "acts-fp", {"layout": {"seed": 0}},
                      [MapSpec("blocks.10", "blocks.10"), MapSpec("a.b.c", "a.b.c"),
                       MapSpec("blocks.10/class-tench", "blocks.10", "class", (0,), ("tench",))])
    original.save(tmp_path / "layout.h5")
    loaded = Layout.load(tmp_path / "layout.h5")
    assert list(loaded.maps) == ["blocks.10", "a.b.c", "blocks.10/class-tench"] and loaded.specs == original.specs
    for name, layout in original.maps.items():
        np.testing.assert_array_equal(loaded.maps[name].xy, layout.xy)
        assert loaded.maps[name].xy.dtype == np.float32
        assert loaded.maps[name].info == layout.info
    np.testing.assert_array_equal(loaded.maps["blocks.10/class-tench"].rows, rows)
    assert loaded.maps["blocks.10"].rows is None
    assert (loaded.fingerprint, loaded.inputs, loaded.config) == ("fp", "acts-fp", {"layout": {"seed": 0}})
    assert list(Layout.load(tmp_path / "layout.h5", ["a.b.c"]).maps) == ["a.b.c"]


def test_run_writes_layout_h5_skips_when_up_to_date_and_redoes_on_change(tmp_path):
    acts, _ = toy_clusters(120, 8, 3)
    write_activations(tmp_path, {"blocks.1": acts.astype(np.float16), "blocks.2": acts[:, :4]})
    config = toy_config(tmp_path, layers=("blocks.1", "blocks.2"), layout={"n_neighbors": 10})
    lines = []
    summary = run(config, log=lines.append)
    assert not summary.skipped and summary.samples == {"blocks.1": 120, "blocks.2": 120}
    assert len(lines) == 4 and lines[0].startswith("layout: layer blocks.1: 120 samples")
    assert lines[2].startswith("layout: blocks.1 -> blocks.2: median image-centroid distance 0.")
    assert "trustworthiness" in lines[0] and lines[3].startswith("layout: 2 layer(s), 240 samples")
    path = tmp_path / "layout.h5"
    attrs = file_attrs(path)
    assert attrs["stage"] == "layout" and attrs["complete"] and attrs["inputs"] == "toy-activations"
    assert attrs["layers"] == ["blocks.1", "blocks.2"] and attrs["config"]["layout"]["n_neighbors"] == 10
    with h5py.File(path, "r") as h5:
        assert h5["blocks.1/xy"].dtype == np.float32 and h5["blocks.1/xy"].shape == (120, 2)
        assert h5["blocks.2"].attrs["n_neighbors"] == 10 and h5["blocks.2"].attrs["metric"] == "cosine"
        assert 0 < h5["blocks.1"].attrs["trustworthiness"] <= 1
    first = Layout.load(path)

    lines.clear()
    assert run(config, log=lines.append).skipped
    assert lines == [f"layout: up to date, skipped ({path})"]

    changed = dataclasses.replace(config, layout=LayoutConfig(n_neighbors=10, min_dist=0.5))
    assert not run(changed, log=lambda _: None).skipped
    assert file_attrs(path)["fingerprint"] != attrs["fingerprint"]
    assert not np.array_equal(Layout.load(path).maps["blocks.1"].xy, first.maps["blocks.1"].xy)

    write_activations(tmp_path, {"blocks.1": acts.astype(np.float16), "blocks.2": acts[:, :4]},
                      fingerprint="recollected", config=changed)
    assert not run(changed, log=lambda _: None).skipped
    assert file_attrs(path)["inputs"] == "recollected"


class _Bar:
    """Records what a stage tells its progress bar."""

    def __init__(self, total):
        self.total, self.n, self.names, self.closed = total, 0, [], False

    def set_postfix_str(self, text):
        self.names.append(text)

    def update(self, n):
        self.n += n

    def close(self):
        self.closed = True


def test_run_shows_progress_per_map(tmp_path, monkeypatch):
    acts, _ = toy_clusters(120, 8, 3)
    write_activations(tmp_path, {"blocks.1": acts, "blocks.2": acts[:, :4]})
    bars = []
    monkeypatch.setattr(layout_mod, "_progress", lambda total: bars.append(_Bar(total)) or bars[-1])
    run(toy_config(tmp_path, layers=("blocks.1", "blocks.2"), layout={"n_neighbors": 10}), log=lambda _: None)
    (bar,) = bars
    assert (bar.total, bar.n, bar.names, bar.closed) == (2, 2, ["blocks.1", "blocks.2"], True)


def test_run_errors_name_the_missing_input_or_the_layer(tmp_path):
    config = toy_config(tmp_path, layers=("blocks.1",))
    with pytest.raises(AtlasError, match="activations.h5 not found; run `atlas collect"):
        run(config)
    acts, _ = toy_clusters(40, 8, 2)
    write_activations(tmp_path, {"blocks.1": acts}, complete=False)
    with pytest.raises(AtlasError, match="incomplete or unreadable; run `atlas collect"):
        run(config)
    write_activations(tmp_path, {"blocks.9": acts})
    with pytest.raises(AtlasError, match=r"out of date \(collected with layers = \[.blocks.9.\], now \[.blocks.1.\]\)"):
        run(config)
    write_activations(tmp_path, {"blocks.9": acts}, config=config)
    with pytest.raises(AtlasError, match="no layer 'blocks.1'"):
        run(config)
    write_activations(tmp_path, {"blocks.1": np.ones_like(acts)})
    with pytest.raises(AtlasError, match="layout of layer 'blocks.1': all 40 activation vectors"):
        run(config)
    write_activations(tmp_path, {"blocks.1": np.zeros((0, 8), np.float16)})
    with pytest.raises(AtlasError, match="0 samples are too few"):
        run(config)
    assert not (tmp_path / "layout.h5").exists()


def test_cli_layout_then_grid_on_a_run_directory(tmp_path, capsys):
    from atlas.cli import main
    from atlas.config import save_config

    acts, _ = toy_clusters(150, 8, 3)
    write_activations(tmp_path, {"blocks.1": acts.astype(np.float16)})
    save_config(toy_config(tmp_path, grid={"sizes": (3,)}))
    assert main(["layout", str(tmp_path)]) == 0
    assert "layout: layer blocks.1: 150 samples" in capsys.readouterr().out
    assert main(["grid", str(tmp_path)]) == 0
    assert "grid: layer blocks.1: 150 samples; 3x3" in capsys.readouterr().out
    assert main(["layout", str(tmp_path)]) == 0
    assert "layout: up to date, skipped" in capsys.readouterr().out
    assert main(["layout", str(tmp_path), "--set", "layout.metric=cosin"]) == 2
    assert "layout.metric must be one of" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the torchdr backend and placing samples by their nearest fit samples

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # GPU runs where there is one


def test_torchdr_layout_of_separated_clusters_is_trustworthy_reproducible_and_leaves_global_rngs_alone():
    import torchdr

    acts, labels = CLUSTERS
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    xy, info = layout_2d(acts, backend="torchdr", device="cpu", trust_samples=400)
    assert torch.equal(torch.get_rng_state(), torch_state)  # torchdr seeds the global generators; we put them back
    assert np.array_equal(np.random.get_state()[1], numpy_state[1])
    assert xy.shape == (600, 2) and xy.dtype == np.float32 and (xy.min(0) == 0).all() and (xy.max(0) == 1).all()
    assert info["trustworthiness"] > 0.9
    everyone = np.arange(600)
    assert neighbour_purity(xy, labels, everyone[::7], np.setdiff1d(everyone, everyone[::7])) > 0.95
    assert info["backend"] == "torchdr" and info["device"] == "cpu" and info["backend_version"] == torchdr.__version__
    assert info["epochs"] == 500 and info["n_neighbors"] == 20 and info["knn"] == "exact"
    assert info["negative_sample_rate"] == 10
    np.testing.assert_array_equal(layout_2d(acts.copy(), backend="torchdr", device="cpu", trust_samples=400)[0], xy)
    other_seed, _ = layout_2d(acts, backend="torchdr", device="cpu", trust_samples=0, seed=1)
    assert not np.array_equal(other_seed, xy)


def test_torchdr_subsample_fit_places_the_rest_near_their_cluster(tmp_path, monkeypatch):
    acts, labels = CLUSTERS
    cfg = dict(fit_samples=250, trust_samples=300, seed=3, backend="torchdr", device="cpu")
    xy, info = layout_2d(acts, **cfg)
    assert info["n_fit"] == 250 and info["placement"] == "nearest-fit-mean" and info["trustworthiness"] > 0.9
    fit = np.sort(np.random.default_rng(3).choice(600, 250, replace=False))
    rest = np.setdiff1d(np.arange(600), fit)
    assert neighbour_purity(xy, labels, rest, fit) > 0.95
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 4 * 16 * 50)  # read the file 50 rows at a time
    monkeypatch.setattr(layout_mod, "TRANSFORM_ROWS", 64)  # and place the rest 64 at a time
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        h5["acts"] = acts.astype(np.float16)
        from_file, _ = layout_2d(h5["acts"], **cfg)
    float16, _ = layout_2d(acts.astype(np.float16).astype(np.float32), **cfg)
    np.testing.assert_array_equal(from_file, float16)


def test_torchdr_with_few_distinct_samples_lowers_n_neighbors():
    acts, _ = toy_clusters(12, 8, 2, seed=1)
    xy, info = layout_2d(np.concatenate([acts, acts]), n_neighbors=20, backend="torchdr", device="cpu")
    assert info["n_neighbors"] == 10 and info["n_neighbors_requested"] == 20  # 12 distinct rows, at most 12 - 2
    assert xy.shape == (24, 2) and np.isfinite(xy).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nearest_rows_match_a_full_sort_across_blocks(monkeypatch, device):
    from atlas import placement

    rng = np.random.default_rng(0)
    reference, queries = rng.normal(size=(300, 5)).astype(np.float32), rng.normal(size=(40, 5)).astype(np.float32)
    monkeypatch.setattr(placement, "PLACE_BLOCK_BYTES", 4 * 40 * 32)  # 32 reference rows per block: 10 blocks
    d2, idx = placement.nearest_rows(torch.from_numpy(reference).to(device), torch.from_numpy(queries).to(device), 7)
    full = ((queries[:, None, :].astype(np.float64) - reference[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(idx.cpu().numpy(), np.argsort(full, axis=1)[:, :7])
    np.testing.assert_allclose(d2.cpu().numpy(), np.sort(full, axis=1)[:, :7], rtol=1e-4, atol=1e-4)


def test_membership_weights_sum_to_log2_k_and_exact_matches_win():
    from atlas.placement import membership_weights

    dist = torch.tensor([[0.1, 0.2, 0.4, 0.8], [0.0, 0.0, 0.0, 0.5], [0.3, 0.3, 0.3, 0.3]])
    w = membership_weights(dist)
    np.testing.assert_allclose(w[0].sum().item(), 2.0, rtol=1e-9)  # log2(4)
    assert (torch.diff(w[0]) < 0).all()  # nearer weighs more
    np.testing.assert_allclose(w[1].numpy(), [1, 1, 1, 0], atol=1e-12)  # 3 exact matches >= log2(4): only they count
    np.testing.assert_allclose(w[2].numpy(), [0.5, 0.5, 0.5, 0.5], rtol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_place_samples_puts_new_samples_among_their_nearest_fit_samples(device):
    from atlas.placement import place_samples

    fit = np.array([[1, 0, 0], [2, 0.1, 0], [0, 1, 0], [0, 3, 0.1]], np.float32)
    fit_xy = np.array([[0, 0], [0, 2], [10, 10], [10, 12]], np.float32)
    new = np.array([[5, 0, 0], [0, 2, 0], [3, 0.1, 0]], np.float32)
    xy = place_samples(fit, fit_xy, new, n_neighbors=1, metric="cosine", device=device)
    np.testing.assert_array_equal(xy, [[0, 0], [10, 10], [0, 2]])  # cosine: length does not count
    xy = place_samples(fit, fit_xy, new, n_neighbors=2, metric="cosine", device=device)
    np.testing.assert_allclose(xy[:2], [[0, 0], [10, 10]], atol=1e-6)  # an exact match (in angle) keeps its place
    assert xy[2, 0] == 0 and 1 < xy[2, 1] < 2  # between its two neighbours, nearer [2, 0.1, 0] in angle
    xy = place_samples(fit, fit_xy, new, n_neighbors=1, metric="euclidean", device=device)
    np.testing.assert_array_equal(xy, [[0, 2], [10, 10], [0, 2]])
    with pytest.raises(ValueError, match="metric must be one of"):
        place_samples(fit, fit_xy, new, metric="manhattan")


@pytest.mark.parametrize("options, message", [
    (dict(backend="torch"), r"layout.backend must be \"umap-learn\" or \"torchdr\"; got 'torch'; did you mean"),
    (dict(backend="torchdr", metric="manhattan"), r"lays out with the cosine, correlation, euclidean metrics, not 'manhattan'"),
    (dict(device="cuda"), r"layout.device = 'cuda' needs layout.backend = \"torchdr\""),
    (dict(backend="torchdr", device="gpu"), r"layout.device must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\""),
])
def test_bad_backend_options_are_one_line_errors(options, message):
    with pytest.raises(AtlasError, match=message) as error:
        layout_2d(CLUSTERS[0], **options)
    assert "\n" not in str(error.value)


def test_torchdr_on_a_missing_gpu_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AtlasError, match=r"layout.device = 'cuda:1' but no CUDA GPU is available"):
        layout_2d(CLUSTERS[0], backend="torchdr", device="cuda:1")


def test_run_with_torchdr_records_backend_and_device_and_device_is_not_in_the_fingerprint(tmp_path, capsys):
    from atlas.cli import main
    from atlas.config import save_config

    acts, _ = toy_clusters(150, 8, 3)
    write_activations(tmp_path, {"blocks.1": acts.astype(np.float16)})
    save_config(toy_config(tmp_path, layout={"n_neighbors": 10, "backend": "torchdr", "device": "cpu"}))
    assert main(["layout", str(tmp_path)]) == 0
    with h5py.File(tmp_path / "layout.h5", "r") as h5:
        attrs = dict(h5["blocks.1"].attrs)
    assert attrs["backend"] == "torchdr" and attrs["device"] == "cpu" and attrs["backend_version"]
    fingerprint = file_attrs(tmp_path / "layout.h5")["fingerprint"]
    capsys.readouterr()
    assert main(["layout", str(tmp_path), "--set", "layout.device=auto"]) == 0  # where it runs is not what it is
    assert "layout: up to date, skipped" in capsys.readouterr().out
    assert main(["layout", str(tmp_path), "--set", "layout.metric=manhattan"]) == 2
    err = capsys.readouterr().err
    assert "lays out with the cosine, correlation, euclidean metrics, not 'manhattan'" in err and err.count("\n") == 1
    config = toy_config(tmp_path, layout={"n_neighbors": 10, "backend": "torchdr"})
    assert Run(tmp_path, config).expected_layout_fingerprint() == fingerprint
    umap_learn = toy_config(tmp_path, layout={"n_neighbors": 10})
    assert Run(tmp_path, umap_learn).expected_layout_fingerprint() != fingerprint


def test_layout_stage_reads_the_samples_a_block_at_a_time(tmp_path, monkeypatch):
    acts, _ = toy_clusters(1000, 8, 4)
    write_activations(tmp_path, {"blocks.1": acts.astype(np.float16)})
    monkeypatch.setattr(blocks, "BLOCK_BYTES", 4 * 8 * 100)  # 100-row blocks
    reads = record_sample_reads(monkeypatch)
    config = toy_config(tmp_path, layout={"backend": "torchdr", "device": "cpu", "fit_samples": 300})
    assert run(config, log=lambda _: None).samples == {"blocks.1": 1000}
    assert reads and max(reads) <= 100  # the 300 fit samples are gathered block by block, never the whole layer


def test_every_layout_key_is_in_the_readme_config_reference():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [f.name for f in dataclasses.fields(LayoutConfig) if f"| `layout.{f.name}` |" not in readme]
    assert not missing
