"""Config loading: TOML into frozen dataclasses, --set overrides, validation, the run-dir copy."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atlas.config import (_PREPROCESS_KEYS, CollectConfig, Config, GridConfig, LayoutConfig, MosaicConfig,
                          RenderConfig, load_config, parse_override, save_config)
from atlas.errors import AtlasError
from tiny import config_text, write_images

STAGES = {"collect": CollectConfig, "layout": LayoutConfig, "grid": GridConfig, "render": RenderConfig,
          "mosaic": MosaicConfig}

BASE = 'run_dir = "runs/x"\nimages = "imgs"\nmodel = "efficientnet_lite0"\nlayers = ["blocks.9"]\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_defaults_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(write(tmp_path, BASE))
    assert config.run_dir == tmp_path / "runs/x"
    assert config.images == tmp_path / "imgs"
    assert config.layers == ("blocks.9",)
    assert config.collect == CollectConfig()
    assert config.grid.sizes == (10, 20, 40)


def test_overrides_parse_toml_values_and_plain_strings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(write(tmp_path, BASE), [
        "collect.samples_per_image=8", "collect.attribution=false", "images=other/dir",
        "grid.sizes=[5, 7]", "layout.min_dist=0.05", 'layers=["a", "b"]'])
    assert config.collect.samples_per_image == 8
    assert config.collect.attribution is False
    assert config.images == tmp_path / "other/dir"
    assert config.grid.sizes == (5, 7)
    assert config.layout.min_dist == 0.05
    assert config.layers == ("a", "b")
    assert parse_override("collect.samples_per_image=all") == (["collect", "samples_per_image"], "all")


@pytest.mark.parametrize("text, message", [
    (BASE + "[collect]\nsamples_per_imag = 3\n", "did you mean samples_per_image"),
    (BASE + "[collect]\nsamples_per_image = -1\n", "positive integer"),
    (BASE + "[collect]\nsamples_per_image = \"many\"\n", "positive integer"),
    (BASE + "[collect]\nbatch_size = \"big\"\n", "wrong type"),
    (BASE + "[collect]\nattribution = 1\n", "true or false"),
    (BASE + "[collect]\ndtype = \"int8\"\n", "float16"),
    (BASE + "[grid]\nsizes = []\n", "grid.sizes"),
    (BASE + "[render]\nstep = 3\n", "did you mean steps"),
    ('images = "x"\nmodel = "m"\nlayers = ["a"]\n', "missing run_dir"),
    (BASE + "this is not toml", "not valid TOML"),
    (BASE.replace('["blocks.9"]', "[]"), "at least one layer"),
    (BASE + "[layout]\npairs = [[\"a\", \"b\", \"c\"]]\n", "two classes"),
    (BASE + "[layout]\nfocus_layers = [\"blocks.8\"]\n", "not in layers"),
    (BASE + "[render]\nsizes_for = {\"blocks.9\" = [10, 7]}\n", r"render.sizes_for.blocks.9 \[7\] are not in grid.sizes"),
    (BASE + "[render]\nsizes_for = {\"blocks.9\" = 10}\n", "sizes_for.blocks.9 must be a list"),
])
def test_bad_configs_fail_with_one_clear_line(tmp_path, text, message):
    with pytest.raises(AtlasError, match=message) as info:
        load_config(write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_config_and_bad_set(tmp_path):
    with pytest.raises(AtlasError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(AtlasError, match="without config.toml"):
        load_config(tmp_path)
    with pytest.raises(AtlasError, match="key=value"):
        load_config(write(tmp_path, BASE), ["collect.seed"])


def test_run_dir_copy_round_trips_and_finds_itself_when_moved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(write(tmp_path, BASE), ["collect.samples_per_image=all", "grid.sizes=[4]",
                                                 'layout.pairs=[["a", "b"]]', 'render.sizes_for={"blocks.9" = [4]}'])
    save_config(config)
    again = load_config(config.run_dir)
    assert again == config
    moved = tmp_path / "moved"
    config.run_dir.rename(moved)
    assert load_config(moved).run_dir == moved.resolve()


# ---------------------------------------------------------------------------------------------
# every field: a bad value fails with one line, the same from TOML and from Python

# (field key, bad value written as TOML, regex of the message)
BAD_FIELDS = [
    ("run_dir", '""', r"run_dir = '' has the wrong type; expected a non-empty path string"),
    ("run_dir", "3", r"run_dir = 3 has the wrong type"),
    ("images", '""', r"images = '' has the wrong type"),
    ("model", '""', r"model must name a model"),
    ("layers", "[]", r"at least one layer"),
    ("layers", '["blocks.9", "blocks.9"]', r"layers lists 'blocks.9' twice"),
    ("layers", '[""]', r"layers must be dotted module paths"),
    ("layers", "[1]", r"layers = 1 has the wrong type; expected a string"),
    ("weights", '""', r"weights must be \"DEFAULT\", \"none\""),
    ("preprocess", "{sise = 3}", r"unknown config key 'preprocess.sise'; did you mean size"),
    ("preprocess", "3", r"preprocess = 3 has the wrong type; expected a table"),
    ("collect", "3", r"collect = 3 has the wrong type; expected a table"),
    ("layout", "[1]", r"layout = \[1\] has the wrong type; expected a table"),
    ("grid", "true", r"grid = True has the wrong type; expected a table"),
    ("render", '"fast"', r"render = 'fast' has the wrong type; expected a table"),
    ("mosaic", "1.5", r"mosaic = 1.5 has the wrong type; expected a table"),
    ("collect.samples_per_image", "0", r"collect.samples_per_image must be a positive integer or \"all\""),
    ("collect.samples_per_image", '"many"', r"collect.samples_per_image must be a positive integer or \"all\""),
    ("collect.samples_per_image", "true", r"collect.samples_per_image = True has the wrong type"),
    ("collect.border", "-1", r"collect.border must be >= 0"),
    ("collect.batch_size", "0", r"collect.batch_size must be >= 1"),
    ("collect.batch_size", "true", r"collect.batch_size = True has the wrong type; expected an integer"),
    ("collect.images_per_part", "0", r"collect.images_per_part must be >= 1"),
    ("collect.workers", "-1", r"collect.workers must be >= 0"),
    ("collect.attribution", "1", r"collect.attribution = 1 has the wrong type; expected true or false"),
    ("collect.attribution_batch", "0", r"collect.attribution_batch must be >= 1"),
    ("collect.predict", '"yes"', r"collect.predict = 'yes' has the wrong type; expected true or false"),
    ("collect.dtype", '"int8"', r"collect.dtype must be \"float16\" or \"float32\""),
    ("collect.seed", "-1", r"collect.seed must be >= 0"),
    ("collect.max_images", "-1", r"collect.max_images must be >= 0"),
    ("collect.max_image_pixels", "0", r"collect.max_image_pixels must be >= 1"),
    ("collect.device", '"gpu"', r"collect.device must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got 'gpu'"),
    ("collect.threads", "-1", r"collect.threads must be >= 0"),
    ("collect.layout", '"chw"', r"collect.layout must be \"auto\", \"nchw\", \"nhwc\" or \"tokens\".*got 'chw'"),
    ("collect.prefix_tokens", "-1", r"collect.prefix_tokens must be \"auto\" or an integer >= 0, got -1"),
    ("layout.n_neighbors", "1", r"layout.n_neighbors must be >= 2"),
    ("layout.min_dist", "-0.5", r"layout.min_dist must be >= 0"),
    ("layout.min_dist", "nan", r"layout.min_dist = nan has the wrong type; expected a number"),
    ("layout.metric", '"cosin"', r"layout.metric must be one of .*; did you mean 'cosine'\?"),
    ("layout.pca_dims", "-1", r"layout.pca_dims must be >= 0"),
    ("layout.fit_samples", "-1", r"layout.fit_samples must be >= 0"),
    ("layout.clip_percentile", "50", r"layout.clip_percentile must be in \[0, 50\)"),
    ("layout.margin", "-0.1", r"layout.margin must be >= 0"),
    ("layout.seed", "-1", r"layout.seed must be >= 0"),
    ("layout.trust_samples", "-1", r"layout.trust_samples must be >= 0"),
    ("layout.trust_neighbors", "0", r"layout.trust_neighbors must be >= 1"),
    ("layout.classes", "[1]", r"layout.classes = 1 has the wrong type; expected a string"),
    ("layout.classes", '[""]', r"layout.classes must list class names"),
    ("layout.pairs", '[["a", "b", "c"]]', r"layout.pairs: each entry must be two classes"),
    ("layout.pairs", '["a", "b"]', r"layout.pairs: each entry must be two classes"),
    ("layout.class_top", "-1", r"layout.class_top must be >= 0"),
    ("layout.focus_layers", '["blocks.8"]', r"layout.focus_layers names 'blocks.8', which is not in layers"),
    ("layout.backend", '"torch"', r"layout.backend must be \"umap-learn\" or \"torchdr\"; got 'torch'; did you mean 'torchdr'\?"),
    ("layout.device", '"gpu"', r"layout.device must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got 'gpu'"),
    ("layout.device", '"cuda:0"', r"layout.device = 'cuda:0' needs layout.backend = \"torchdr\"; umap-learn runs on the CPU"),
    ("layout.align", '"yes"', r"layout.align = 'yes' has the wrong type; expected true or false"),
    ("grid.sizes", "[]", r"grid.sizes must be a non-empty list of distinct positive integers"),
    ("grid.sizes", "[10, 10]", r"grid.sizes must be a non-empty list of distinct positive integers"),
    ("grid.sizes", "[0]", r"grid.sizes must be a non-empty list of distinct positive integers"),
    ("grid.min_count", "0", r"grid.min_count must be >= 1"),
    ("grid.whiten", '"yes"', r"grid.whiten = 'yes' has the wrong type; expected true or false"),
    ("grid.whiten_eps", "0", r"grid.whiten_eps must be > 0"),
    ("grid.top_classes", "0", r"grid.top_classes must be >= 1"),
    ("render.sizes", "[0]", r"render.sizes must list positive grid sizes"),
    ("render.sizes", "[7]", r"render.sizes \[7\] are not in grid.sizes \[10, 20, 40\]"),
    ("render.sizes_for", '{"blocks.9" = 10}', r"render.sizes_for.blocks.9 must be a list of grid sizes"),
    ("render.sizes_for", '{"blocks.9" = [10, 7]}', r"render.sizes_for.blocks.9 \[7\] are not in grid.sizes"),
    ("render.sizes_for", '{"blocks.8" = [10]}', r"render.sizes_for names 'blocks.8', whose layer is not in layers"),
    ("render.icon_size", "8", r"render.icon_size must be 0 \(automatic, per layer\) or >= 16 pixels, got 8"),
    ("render.icon_size", "-1", r"render.icon_size must be >= 0"),
    ("render.icon_size_for", '{"blocks.9" = 8}', r"render.icon_size_for.blocks.9 must be an icon side in pixels, >= 16"),
    ("render.icon_size_for", '{"blocks.9" = "big"}', r"render.icon_size_for.blocks.9 must be an icon side in pixels"),
    ("render.icon_size_for", '{"blocks.8" = 96}', r"render.icon_size_for names 'blocks.8', whose layer is not in layers"),
    ("render.schedule", '"linear"', r"render.schedule must be \"constant\" or \"cosine\", got 'linear'"),
    ("render.warmup", "-1", r"render.warmup must be >= 0"),
    ("render.warmup", "300", r"render.warmup \(300\) must be fewer than render.steps \(256\)"),
    ("render.stop_window", "-1", r"render.stop_window must be >= 0"),
    ("render.stop_rise", "-0.1", r"render.stop_rise must be >= 0"),
    ("render.precision", '"float16"', r"render.precision must be \"float32\" or \"bfloat16\", got 'float16'"),
    ("render.compile", '"yes"', r"render.compile = 'yes' has the wrong type; expected true or false"),
    ("render.steps", "0", r"render.steps must be >= 1"),
    ("render.steps", '"x"', r"render.steps = 'x' has the wrong type; expected an integer"),
    ("render.attempts", "0", r"render.attempts must be >= 1"),
    ("render.batch_size", "-1", r"render.batch_size must be >= 0"),
    ("render.lr", "0", r"render.lr must be > 0"),
    ("render.cos_power", "-1", r"render.cos_power must be >= 0"),
    ("render.whiten", "true", r"render.whiten = true needs grid.whiten = true"),
    ("render.decorrelate", "1", r"render.decorrelate = 1 has the wrong type; expected true or false"),
    ("render.pad", "-1", r"render.pad must be >= 0"),
    ("render.pad", "2", r"render.pad \(2\) must be >= render.jitter \(4\)"),
    ("render.jitter", "-1", r"render.jitter must be >= 0"),
    ("render.jitter", "5", r"render.pad \(4\) must be >= render.jitter \(5\)"),
    ("render.scale", "1", r"render.scale must be in \[0, 1\)"),
    ("render.rotate", "-1", r"render.rotate must be >= 0"),
    ("render.seed", "-1", r"render.seed must be >= 0"),
    ("render.device", '"tpu"', r"render.device must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\""),
    ("mosaic.icon_px", "-1", r"mosaic.icon_px must be >= 0"),
    ("mosaic.scale_by_density", '"no"', r"mosaic.scale_by_density = 'no' has the wrong type; expected true or false"),
    ("mosaic.density_floor", "0", r"mosaic.density_floor must be in \(0, 1\]"),
    ("mosaic.labels", "1", r"mosaic.labels = 1 has the wrong type; expected true or false"),
    ("mosaic.preview", "0", r"mosaic.preview = 0 has the wrong type; expected true or false"),
    ("mosaic.preview_members", "0", r"mosaic.preview_members must be >= 1"),
    ("mosaic.preview_patch", "0", r"mosaic.preview_patch must be > 0"),
]


def every_field() -> set[str]:
    keys = {f.name for f in dataclasses.fields(Config)}
    for table, cls in STAGES.items():
        keys |= {f"{table}.{f.name}" for f in dataclasses.fields(cls)}
    return keys


def build_in_python(key: str, value) -> Config:
    """Builds the owning dataclass with one bad value (and a Config around it, for cross-table rules)."""
    base = {"run_dir": Path("runs/x"), "images": Path("imgs"), "model": "efficientnet_lite0", "layers": ("blocks.9",)}
    table, _, name = key.rpartition(".")
    if table:
        return Config(**base, **{table: STAGES[table](**{name: value})})
    return Config(**{**base, key: value})


def test_every_field_has_a_bad_value_case():
    assert {key for key, _, _ in BAD_FIELDS} == every_field()


@pytest.mark.parametrize("key, value, message", [pytest.param(*case, id=f"{case[0]}={case[1]}") for case in BAD_FIELDS])
def test_a_bad_field_fails_with_one_line_from_toml_and_from_python(tmp_path, key, value, message):
    with pytest.raises(AtlasError, match=message) as from_toml:
        load_config(write(tmp_path, BASE), [f"{key}={value}"])
    assert "\n" not in str(from_toml.value)
    with pytest.raises(AtlasError) as from_python:
        build_in_python(key, parse_override(f"{key}={value}")[1])
    assert str(from_python.value) == str(from_toml.value)


def test_python_values_are_normalised_like_toml_values():
    config = Config(run_dir="runs/x", images="imgs", model="m", layers=["a", "b"],  # type: ignore[arg-type]
                    layout=LayoutConfig(pairs=[["x", "y"]], min_dist=0), render={"sizes_for": {"a": [10]}})
    assert config.run_dir == Path("runs/x") and config.images == Path("imgs")
    assert config.layers == ("a", "b") and config.layout.pairs == (("x", "y"),)
    assert config.layout.min_dist == 0.0 and isinstance(config.layout.min_dist, float)
    assert config.render == RenderConfig(sizes_for={"a": (10,)})
    with pytest.raises(AtlasError, match="unknown config key 'render.step'; did you mean steps"):
        Config(run_dir="r", images="i", model="m", layers=["a"], render={"step": 3})  # type: ignore[arg-type]


def test_preprocess_keys_are_those_of_the_models_preprocess():
    from atlas.models.zoo import Preprocess

    assert set(_PREPROCESS_KEYS) == {f.name for f in dataclasses.fields(Preprocess)}


def test_cli_reports_a_bad_value_in_one_line_before_collecting(tmp_path):
    write_images(tmp_path / "images", 2)
    config = tmp_path / "run.toml"
    config.write_text(config_text(tmp_path / "run", tmp_path / "images"))
    result = subprocess.run([sys.executable, "-m", "atlas", "run", str(config), "--set", "render.steps=0"],
                            capture_output=True, text=True, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent)))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "render.steps" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# --set overrides compose: keys of the file they make stale are dropped with one note

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"


def load_demo(*overrides: str) -> tuple[Config, list[str]]:
    notes: list[str] = []
    return load_config(DEMO, overrides, warn=notes.append), notes


def test_demo_with_a_smaller_grid_drops_the_render_sizes_with_one_note():
    config, notes = load_demo("grid.sizes=[6]")
    assert config.grid.sizes == (6,)
    assert config.render.sizes == () and config.render.sizes_for == {}
    assert config.render.sizes_of("blocks.10", config.grid.sizes) == (6,)
    assert len(notes) == 1 and "\n" not in notes[0]
    assert "render.sizes [10]" in notes[0] and "render.sizes_for.blocks.10" in notes[0]
    assert config.layout == load_demo()[0].layout  # nothing else changed


def test_demo_with_a_grid_size_kept_keeps_what_still_applies():
    config, notes = load_demo("grid.sizes=[20, 40]")
    assert config.render.sizes == () and config.render.sizes_for == {"blocks.10": (20,)}
    assert len(notes) == 1


def test_demo_with_one_layer_drops_the_focus_maps_with_one_note():
    config, notes = load_demo('layers=["blocks.10"]')
    assert config.layers == ("blocks.10",)
    assert config.layout.focus_layers == () and config.layout.classes == () and config.layout.pairs == ()
    assert config.render.sizes_for == {"blocks.10": (10, 20)}
    assert len(notes) == 1 and "layout.focus_layers ['blocks.15']" in notes[0] and "layout.classes" in notes[0]


def test_demo_without_the_layer_of_a_sizes_for_entry_drops_it():
    config, notes = load_demo('layers=["blocks.4", "blocks.15"]')
    assert config.render.sizes_for == {} and config.layout.focus_layers == ("blocks.15",)
    assert len(notes) == 1 and "render.sizes_for.blocks.10" in notes[0]


def test_keys_the_user_set_still_conflict():
    with pytest.raises(AtlasError, match=r"render.sizes \[10\] are not in grid.sizes \[6\]"):
        load_demo("grid.sizes=[6]", "render.sizes=[10]")
    with pytest.raises(AtlasError, match="layout.focus_layers names 'blocks.15'"):
        load_demo('layers=["blocks.10"]', 'layout.focus_layers=["blocks.15"]')
    with pytest.raises(AtlasError, match=r"render.sizes \[10\] are not in grid.sizes \[6\]"):
        load_demo("grid.sizes=[6]", "render={sizes = [10]}")  # a --set table sets every key under it


def test_focus_maps_the_user_set_stay_when_the_focus_layers_go():
    config, notes = load_demo('layers=["blocks.10"]', 'layout.classes=["tench"]')
    assert config.layout.focus_layers == () and config.layout.classes == ("tench",) and config.layout.pairs == ()
    assert len(notes) == 1 and "layout.classes" not in notes[0]


def test_a_file_that_contradicts_itself_is_still_an_error(tmp_path):
    path = write(tmp_path, BASE + "[grid]\nsizes = [10, 20]\n[render]\nsizes = [7, 20]\n")
    with pytest.raises(AtlasError, match=r"render.sizes \[7\] are not in grid.sizes \[10\]"):
        load_config(path, ["grid.sizes=[10]"], warn=lambda note: None)


def test_whitening_turned_off_drops_render_whiten(tmp_path, capsys):
    path = write(tmp_path, BASE + "[grid]\nwhiten = true\n[render]\nwhiten = true\n")
    config = load_config(path, ["grid.whiten=false"])
    assert config.render.whiten is False
    err = capsys.readouterr().err
    assert err.startswith("atlas: note: ") and "render.whiten" in err and err.count("\n") == 1
    with pytest.raises(AtlasError, match="render.whiten = true needs grid.whiten = true"):
        load_config(path, ["grid.whiten=false", "render.whiten=true"])


def test_no_overrides_no_notes(tmp_path):
    config, notes = load_demo()
    assert notes == [] and config.render.sizes == (10,) and config.layout.classes == ("fireboat",)
