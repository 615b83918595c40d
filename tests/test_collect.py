"""The collect stage on a tiny hand-set model and generated images."""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import atlas.collect as collect
from atlas.collect import interior_positions, sample_positions
from atlas.config import load_config
from atlas.store import Run

from tiny import SIZE, config_text, pattern, write_images

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def tiny_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def make_config(tmp_path: Path, n_images: int = 10, name: str = "run", **collect_opts):
    images = tmp_path / "images"
    if not images.exists():
        write_images(images, n_images)
    path = tmp_path / f"{name}.toml"
    path.write_text(config_text(tmp_path / name, images, **collect_opts))
    return load_config(path)


def read_all(path: Path) -> dict:
    """Every dataset of an HDF5 file as arrays, keyed by path."""
    out = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        out["attrs"] = {k: v for k, v in h5.attrs.items()}
    return out


def assert_same_file(a: Path, b: Path) -> None:
    da, db = read_all(a), read_all(b)
    assert da.keys() == db.keys()
    for key in da:
        if key == "attrs":
            continue
        assert np.array_equal(da[key], db[key]), key  # bit-identical, not merely close


def test_positions_stay_inside_the_border_and_are_seeded():
    candidates = interior_positions(6, 5, border=1)
    assert candidates.min(0).tolist() == [1, 1] and candidates.max(0).tolist() == [4, 3]
    a = sample_positions(np.random.default_rng([0, 0, 7]), candidates, 5)
    b = sample_positions(np.random.default_rng([0, 0, 7]), candidates, 5)
    assert np.array_equal(a, b) and len({tuple(p) for p in a}) == 5
    assert len(sample_positions(np.random.default_rng(0), candidates, "all")) == 12
    assert len(sample_positions(np.random.default_rng(0), candidates, 99)) == 12
    assert len(interior_positions(2, 2, border=3)) == 4  # a map smaller than its border: every position


def test_activations_are_the_exact_pixels_at_the_sampled_positions(tmp_path):
    config = make_config(tmp_path)
    summary = collect.run(config, log=lambda s: None)
    assert summary.n_ok == 10 and summary.samples == {"features": 30, "deep": 30}
    with h5py.File(config.run_dir / "activations.h5", "r") as h5:
        assert h5.attrs["complete"]
        acts = h5["layers/features/acts"][()]
        image = h5["layers/features/image"][()]
        yx = h5["layers/features/yx"][()]
        assert acts.dtype == np.float32 and acts.shape == (30, 3)
        assert yx.min() >= 1 and yx.max() <= SIZE - 2  # never on the border
        paths = [p.decode() for p in h5["images/path"][()]]
        number = [int(p.split("img")[1][:3]) for p in paths]  # which pattern each image is
        for a, i, (y, x) in zip(acts, image, yx):
            assert np.allclose(a, pattern(number[i])[y, x] / 255.0, atol=1e-6)
        assert np.array_equal(np.bincount(image), np.full(10, 3))
        assert h5["layers/deep/yx"][()].max() <= 2  # the 4x4 map's interior
        assert h5["layers/features/attr"].shape == (30, 1000)
        assert h5["layers/features/attr"].dtype == np.float16
        assert list(h5["images/label"][()]) == [0] * 5 + [1] * 5  # from the wnid folder names
        assert h5["images/pred"][()].min() >= 0
        assert [s.decode() for s in h5["images/status"][()]] == ["ok"] * 10
        assert h5["images/path"][0].decode() == "n01440764/img000.png"
        assert h5["classes/name"][0].decode() == "tench"
    assert not (Run(config.run_dir, config).collect_parts_dir).exists()


def test_bad_images_are_skipped_and_counted(tmp_path):
    images = tmp_path / "images"
    write_images(images, 4)
    (images / "n01440764" / "notes.jpg").write_text("not an image")
    (images / "n01440764" / "empty.png").write_bytes(b"")
    config = make_config(tmp_path, name="bad")
    lines = []
    summary = collect.run(config, log=lines.append)
    assert summary.n_images == 6 and summary.n_ok == 4 and sum(summary.skipped.values()) == 2
    with h5py.File(config.run_dir / "activations.h5", "r") as h5:
        status = [s.decode() for s in h5["images/status"][()]]
        assert status.count("ok") == 4
        assert set(h5["layers/features/image"][()]) == {i for i, s in enumerate(status) if s == "ok"}
    assert "2 skipped" in lines[0]


def test_no_attribution_no_prediction_stops_early(tmp_path):
    config = make_config(tmp_path, attribution=False, predict=False)
    collect.run(config, log=lambda s: None)
    with h5py.File(config.run_dir / "activations.h5", "r") as h5:
        assert "attr" not in h5["layers/features"]
        assert (h5["images/pred"][()] == -1).all()


def test_up_to_date_is_skipped_and_a_changed_config_starts_fresh(tmp_path, monkeypatch):
    config = make_config(tmp_path, images_per_part=4)
    collect.run(config, log=lambda s: None)
    assert collect.run(config, log=lambda s: None).skipped_up_to_date
    # An interrupted run with another seed leaves parts; a third seed must not reuse them.
    other = make_config(tmp_path, seed=1, images_per_part=4)
    save_part = collect._Part.save

    def save_then_die(part, path):  # as a kill right after the first part was written
        save_part(part, path)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(collect._Part, "save", save_then_die)
        collect.run(other, log=lambda s: None)
    assert (Run(other.run_dir, other).collect_parts_dir).exists()
    third = make_config(tmp_path, seed=2, images_per_part=4)
    summary = collect.run(third, log=lambda s: None)
    assert summary.resumed_from == 0 and summary.samples["features"] == 30
    clean = make_config(tmp_path, name="clean", seed=2)
    collect.run(clean, log=lambda s: None)
    assert_same_file(third.run_dir / "activations.h5", clean.run_dir / "activations.h5")


def test_resume_after_kill_is_bit_identical(tmp_path):
    """A subprocess is killed with SIGKILL in the middle of a batch, then the run is resumed."""
    config = make_config(tmp_path, n_images=12, samples_per_image="all", images_per_part=4)
    killer = f"""
import os, signal, sys
sys.path.insert(0, {str(TESTS)!r})
import atlas.collect as collect
from atlas.config import load_config
calls = []
original = collect.sample_batch
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:  # two parts of one batch each are on disk; die inside the third
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
collect.sample_batch = dying
collect.run(load_config({str(tmp_path / 'run.toml')!r}), log=print)
"""
    proc = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    parts = sorted((Run(config.run_dir, config).collect_parts_dir).glob("part-*.npz"))
    assert len(parts) == 2 and not (config.run_dir / "activations.h5").exists()

    summary = collect.run(config, log=lambda s: None)
    assert summary.resumed_from == 8 and summary.parts_done == 1
    clean = make_config(tmp_path, name="clean", samples_per_image="all")
    collect.run(clean, log=lambda s: None)
    assert_same_file(config.run_dir / "activations.h5", clean.run_dir / "activations.h5")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    return subprocess.run([sys.executable, "-m", "atlas", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_cli_exit_codes_and_one_line_errors(tmp_path):
    config = make_config(tmp_path, n_images=4)
    path = tmp_path / "run.toml"
    ok = run_cli("collect", str(path), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "model top-1 accuracy" in ok.stdout
    assert (config.run_dir / "config.toml").is_file()
    again = run_cli("collect", str(config.run_dir), cwd=tmp_path)
    assert again.returncode == 0 and "up to date" in again.stdout

    for args, message in [
        (("collect", str(path), "--set", "layers=[\"featurs\"]"), "model tiny:make; closest: features"),
        (("collect", str(path), "--set", "images=nowhere"), "does not exist"),
        (("collect", str(tmp_path / "missing.toml")), "does not exist"),
        (("collect", str(path), "--set", "collect.bogus=1"), "unknown config key"),
        (("collect", str(path), "--set", "layers=[\"fc\"]"), "feature map"),
        (("layers", "no_such_model"), "model"),
        (("frobnicate",), "invalid choice"),
    ]:
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_cli_lists_layers_with_shapes(tmp_path):
    proc = run_cli("layers", "tiny:make", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("deep "))
    assert "(4, 112, 112)" in line or "(4," in line
