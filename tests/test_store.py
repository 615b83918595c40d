"""The run store: artifact round trips, the one freshness rule across every stage and reader, and
that no module outside the store spells an HDF5 key or an artifact file name."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from atlas.cli import main
from atlas.config import load_config
from atlas.errors import AtlasError
from atlas.store import Activations, IconSet, Run, png_fingerprint
from tiny import config_text, write_images
from toy_runs import toy_config, write_activations

PACKAGE = Path(__file__).parent.parent / "atlas"


# ---------------------------------------------------------------------------------------------
# Round trips


def test_activations_round_trip_through_the_writer_and_reader(tmp_path):
    acts = np.arange(12, dtype=np.float32).reshape(6, 2)
    attr = np.linspace(-1, 1, 18).reshape(6, 3).astype(np.float32)
    yx = np.array([[1, 2], [3, 4], [5, 6], [1, 1], [2, 2], [3, 3]])
    path = write_activations(tmp_path, {"a.b": acts}, {"a.b": attr}, n_images=3, class_names=["x", "y", "z"],
                             wnids=["n1", "n2", "n3"], paths=["d/i0.png", "d/i1.png", "d/i2.png"], labels=[0, -1, 2],
                             yx={"a.b": yx}, shapes={"a.b": [2, 7, 7]}, preprocess={"size": 8, "resize": 8})
    with Activations(path) as read:
        assert read.complete and read.fingerprint == "toy-activations" and read.layers == ["a.b"]
        assert read.class_names == ["x", "y", "z"] and read.class_wnids == ["n1", "n2", "n3"]
        assert read.images.path.tolist() == ["d/i0.png", "d/i1.png", "d/i2.png"]
        assert read.images.label.tolist() == [0, -1, 2] and read.images.status.tolist() == ["ok"] * 3
        samples = read.layer("a.b")
        np.testing.assert_array_equal(samples.acts[()], acts)
        np.testing.assert_array_equal(samples.attr[()], attr.astype(np.float16))
        np.testing.assert_array_equal(samples.yx, yx)
        assert samples.image.tolist() == [0, 1, 2, 0, 1, 2] and samples.shape == (2, 7, 7)
        assert read.preprocess == {"size": 8, "resize": 8} and not read.has_layer("c")
        with pytest.raises(AtlasError, match="has no layer 'c'"):
            read.layer("c")


def test_a_writer_that_does_not_finish_leaves_no_file(tmp_path):
    store = Run(tmp_path, toy_config(tmp_path))
    with pytest.raises(RuntimeError, match="without finish"):
        with store.write_activations() as out:
            out.images(["a.png"], [0])
    assert not store.activations_path.exists() and not list(tmp_path.glob(".*tmp*"))


def test_icon_sets_and_png_fingerprints(tmp_path):
    store = Run(tmp_path, toy_config(tmp_path))
    images = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (10, 20)])
    entries = [{"cell": [0, 1], "file": "cell-0-1.png"}, {"cell": [2, 0], "file": "cell-2-0.png"}]
    icons = store.write_icons("a/class-b", 3, images, entries, {"fingerprint": "f", "icons": entries})
    assert icons.folder == tmp_path / "a" / "class-b" / "icons-3" and icons.complete()
    assert (icons.read(2, 0) == 20).all() and icons.read(1, 1) is None
    assert icons.path(0, 1) == icons.folder / "cell-0-1.png"
    store.write_picture(images[0], tmp_path / "p.png", "fp-1", stage="mosaic")
    assert png_fingerprint(tmp_path / "p.png") == "fp-1" and png_fingerprint(tmp_path / "none.png") is None
    (icons.folder / "cell-0-1.png").unlink()
    assert not IconSet(icons.folder, icons.meta).complete()


# ---------------------------------------------------------------------------------------------
# One freshness rule: every stage and reader refuses, or redoes its own stage, never mixes


LAYER = "deep"


@pytest.fixture(scope="module")
def built_run(tmp_path_factory):
    """A finished tiny run (tiny model, 12 generated images, one layer, icons at 2x2 and 3x3)."""
    root = tmp_path_factory.mktemp("store-run")
    write_images(root / "images", 12)
    text = config_text(root / "run", root / "images", samples_per_image=2).replace(
        'layers = ["features", "deep"]', f'layers = ["{LAYER}"]')
    text += ("[layout]\nn_neighbors = 5\ntrust_samples = 0\n[grid]\nsizes = [2, 3]\nmin_count = 1\n"
             "[render]\nicon_size = 16\nsteps = 3\nbatch_size = 8\npad = 1\njitter = 1\n")
    (root / "run.toml").write_text(text)
    assert main(["run", str(root / "run.toml")]) == 0
    return root / "run"


def copy_run(built_run: Path, dest: Path) -> Path:
    """A copy of the run and of its images (tests change both), its config pointing at the copies."""
    from atlas.config import save_config

    shutil.copytree(built_run.parent, dest.parent / "copy")
    run = dest.parent / "copy" / built_run.name
    save_config(load_config(run, [f"images={dest.parent / 'copy' / 'images'}"]))
    return run


def cli(*args: str) -> int:
    return main([str(a) for a in args])


READERS = {  # command -> the stage it stands for (a stage redoes itself; a reader only refuses)
    "grid": ("grid",), "render": ("render",), "mosaic": ("mosaic",),
    "inspect": ("inspect", "--layer", LAYER, "--grid", "2", "--class", "tench"),
    "patches": ("patches", "--layer", LAYER, "--channel", "1"),
    "compare": ("compare",),
}


def run_reader(name: str, run: Path, *extra: str) -> int:
    command, *rest = READERS[name]
    return cli(command, run, *rest, *extra)


def one_line_refusal(capsys, *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("atlas: error: "), err
    assert any(why in err for why in ("out of date", "incomplete", "not found", "changed since")), err
    for text in expected:
        assert text in err, (text, err)
    return err


def test_after_recollecting_with_another_seed_nothing_reads_the_old_grid(built_run, tmp_path, capsys):
    run = copy_run(built_run, tmp_path / "run")
    old_grid = (run / "grid.h5").read_bytes()
    pngs = {p: p.read_bytes() for p in run.rglob("*.png")}
    assert cli("collect", run, "--set", "collect.seed=1") == 0
    capsys.readouterr()
    for name in ("grid", "render", "mosaic", "inspect", "compare"):
        assert run_reader(name, run) == 2, name
        one_line_refusal(capsys, "layout.h5 is out of date (made from other activations)", "`atlas layout")
    assert (run / "grid.h5").read_bytes() == old_grid  # nothing was rewritten from mixed inputs
    assert all(p.read_bytes() == data for p, data in pngs.items())

    # patches reads nothing but the activations, which are current: it shows the new samples
    assert run_reader("patches", run) == 0
    with Run.open(run).activations() as acts:
        values = acts.layer(LAYER).acts[:, 1].astype(np.float32)
    shown = capsys.readouterr().out.splitlines()[0]
    assert shown.endswith(", ".join(f"{v:.3g}" for v in np.sort(values)[::-1][:9]))

    # running the stages in order brings everything back to one generation
    assert cli("run", run) == 0
    for name in READERS:
        assert run_reader(name, run) == 0, name


def test_after_a_new_layout_each_stage_redoes_itself_and_readers_refuse(built_run, tmp_path, capsys):
    run = copy_run(built_run, tmp_path / "run")
    assert cli("layout", run, "--set", "layout.n_neighbors=4") == 0
    capsys.readouterr()
    for name in ("render", "mosaic", "inspect", "compare"):
        assert run_reader(name, run) == 2, name
        one_line_refusal(capsys, "grid.h5 is out of date (made from another layout", "`atlas grid")
    assert run_reader("grid", run) == 0  # the grid stage redoes its own artifact
    assert "grid: layer deep" in capsys.readouterr().out
    store = Run.open(run)
    states = {size: store.icons_state(store.find_map(LAYER), store.grid(LAYER, size))[0] for size in (2, 3)}
    stale = [size for size, state in states.items() if state == "stale"]
    assert stale and set(states.values()) <= {"stale", "current"}  # the new layout moved some cells
    assert run_reader("mosaic", run) == 2
    one_line_refusal(capsys, f"icons-{stale[0]} is out of date", "`atlas render")
    assert cli("inspect", run, "--layer", LAYER, "--grid", stale[0], "--class", "tench") == 2
    one_line_refusal(capsys, f"icons-{stale[0]} is out of date", "`atlas render")
    assert run_reader("render", run) == 0 and run_reader("mosaic", run) == 0
    assert run_reader("compare", run) == 0 and run_reader("inspect", run) == 0


def test_an_incomplete_activations_file_is_refused_by_everything(built_run, tmp_path, capsys):
    run = copy_run(built_run, tmp_path / "run")
    with h5py.File(run / "activations.h5", "a") as h5:  # as a collect killed while writing would leave it
        h5.attrs["complete"] = False
    for name in READERS:
        assert run_reader(name, run) == 2, name
        one_line_refusal(capsys, "activations.h5 is incomplete", "`atlas collect")


def test_a_killed_first_collect_leaves_nothing_to_read(tmp_path, capsys):
    write_images(tmp_path / "images", 8)
    (tmp_path / "run.toml").write_text(config_text(tmp_path / "run", tmp_path / "images"))
    config = load_config(tmp_path / "run.toml")
    from atlas import collect

    def die(*args, **kwargs):
        raise KeyboardInterrupt

    collect_part = collect.sample_batch
    try:
        collect.sample_batch = die
        with pytest.raises(KeyboardInterrupt):
            collect.run(config, log=lambda s: None)
    finally:
        collect.sample_batch = collect_part
    from atlas.config import save_config

    save_config(config)
    for name in READERS:
        assert run_reader(name, config.run_dir) == 2, name
        one_line_refusal(capsys, "activations.h5 not found", "`atlas collect")


def test_a_config_changed_since_collect_is_refused_until_recollected(built_run, tmp_path, capsys):
    run = copy_run(built_run, tmp_path / "run")
    assert cli("layout", run, "--set", "collect.samples_per_image=3") == 2
    err = one_line_refusal(capsys, "is out of date (collected with collect.samples_per_image = 2, now 3)",
                           "`atlas collect")
    # the stages it names must run with the same override, which RUN/config.toml does not hold yet
    assert err.endswith("then layout (each with --set collect.samples_per_image=3)")


def test_an_image_changed_since_collect_is_never_cut_into_patches(built_run, tmp_path, capsys):
    run = copy_run(built_run, tmp_path / "run")
    store = Run.open(run)
    with store.activations() as acts:
        first = acts.images.path[acts.layer(LAYER).image[0]]
    path = store.config.images / first
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path.with_suffix(".tmp.png"))  # new pixels, new size
    path.with_suffix(".tmp.png").replace(path)
    for name in ("mosaic", "patches"):
        assert run_reader(name, run, "--force") == 2 if name == "mosaic" else run_reader(name, run) == 2, name
        one_line_refusal(capsys, f"{first} changed since it was collected", "`atlas collect")


def test_missing_images_are_counted_and_none_at_all_is_an_error(built_run, tmp_path, capsys):
    run = copy_run(built_run, tmp_path / "run")
    store = Run.open(run)
    with store.activations() as acts:
        values = acts.layer(LAYER).acts[:, 1].astype(np.float32)
        top = acts.images.path[acts.layer(LAYER).image[int(np.argmax(values))]]
    (store.config.images / top).unlink()
    assert run_reader("patches", run) == 0
    assert "note: 1 source image(s) could not be read" in capsys.readouterr().out
    shutil.rmtree(store.config.images)
    assert run_reader("patches", run) == 2
    assert "none of the" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Only the store knows files and keys


def _string_constants(tree: ast.AST) -> list[str]:
    """Every string literal of a module except docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


KEY_OR_FILE = re.compile(r"(^|/)(layers|images|classes)/|\.h5\b|icons\.json|config\.toml|receptive-field\.json|"
                         r"(^|/)atlas-(preview-)?(\{|\d)|(^|/)icons-\{|(^|[/\"])cell-\{|compare-\{")


def test_no_module_outside_the_store_spells_an_hdf5_key_or_an_artifact_file_name():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "store" in path.relative_to(PACKAGE).parts:
            continue
        source = path.read_text()
        tree = ast.parse(source)
        imports = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for alias in node.names} | {node.module for node in ast.walk(tree)
                                              if isinstance(node, ast.ImportFrom) and node.module}
        if "h5py" in imports:
            offenders.append(f"{path.name}: imports h5py")
        offenders += [f"{path.name}: {text!r}" for text in _string_constants(tree) if KEY_OR_FILE.search(text)]
    assert not offenders, offenders


def test_help_lists_the_public_api():
    import pydoc

    import atlas

    text = pydoc.render_doc(atlas, renderer=pydoc.plaintext)
    expected = {"Run", "load_config", "run_stages", "run_collect", "run_layout", "run_grid", "run_render",
                "run_mosaic", "collect_activations", "layout_2d", "bin_grid", "render_icons", "compose_atlas"}
    assert expected <= set(atlas.__all__)
    for name in atlas.__all__:
        assert re.search(rf"\b{name}\b", text), name
        assert getattr(atlas, name).__doc__, name  # every public name says what it is
