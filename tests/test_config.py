"""Config loading: TOML into frozen dataclasses, --set overrides, validation, the run-dir copy."""

from pathlib import Path

import pytest

from atlas.config import CollectConfig, load_config, parse_override, save_config
from atlas.errors import AtlasError

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
    (BASE + "[render]\nsizes_for = {\"blocks.9\" = [10, 7]}\n", r"render.sizes \[7\] are not in grid.sizes"),
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
