"""`atlas run` end to end through the CLI: tiny model, a handful of generated images, few steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tiny import config_text, write_images

TESTS = Path(__file__).parent


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    return subprocess.run([sys.executable, "-m", "atlas", *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_atlas_run_builds_every_artifact_and_then_skips(tmp_path):
    write_images(tmp_path / "images", 12)
    text = config_text(tmp_path / "run", tmp_path / "images", samples_per_image=4)
    text = text.replace('layers = ["features", "deep"]', 'layers = ["deep"]')
    text += ("[layout]\nn_neighbors = 5\ntrust_samples = 0\n"
             "[grid]\nsizes = [2, 3]\nmin_count = 1\n"
             "[render]\nicon_size = 16\nsteps = 4\nbatch_size = 3\npad = 1\njitter = 1\n"
             "[mosaic]\nlabels = true\n")
    config = tmp_path / "run.toml"
    config.write_text(text)

    first = run_cli("run", str(config), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "run"
    for name in ("config.toml", "activations.h5", "layout.h5", "grid.h5"):
        assert (run / name).is_file(), name
    for size in (2, 3):
        icons = json.loads((run / "deep" / f"icons-{size}" / "icons.json").read_text())
        assert icons["icons"] and all((run / "deep" / f"icons-{size}" / i["file"]).is_file()
                                      for i in icons["icons"])
        for name in (f"atlas-{size}.png", f"atlas-preview-{size}.png", f"atlas-{size}-labels.png"):
            with Image.open(run / "deep" / name) as image:
                assert image.size == (16 * size, 16 * size), name
    for stage in ("collect", "layout", "grid", "render", "mosaic"):
        assert stage in first.stdout

    second = run_cli("run", str(run), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    lines = second.stdout.splitlines()
    for stage in ("collect", "layout", "grid", "render"):  # nothing was redone
        assert any(line.startswith(f"{stage}: ") and "up to date" in line for line in lines), (stage, lines)
    assert any(line.startswith("mosaic: wrote 0 image(s)") for line in lines), lines

    # A class atlas and a two-class view go through the same stages; the layer's icons are kept.
    focused = run_cli("run", str(run), "--set", 'layout.classes=["goldfish"]', "--set",
                      'layout.pairs=[["tench", "goldfish"]]', "--set", "layout.class_top=24", cwd=tmp_path)
    assert focused.returncode == 0, focused.stderr
    assert "render: deep 2x2" not in focused.stdout and "render: deep/class-goldfish 2x2" in focused.stdout
    for name in ("class-goldfish", "pair-tench-goldfish"):
        for size in (2, 3):
            with Image.open(run / "deep" / name / f"atlas-{size}.png") as image:
                assert image.size == (16 * size, 16 * size)
    panel = run_cli("inspect", str(run), "--layer", "deep/class-goldfish", "--grid", "2", "--class", "goldfish",
                    cwd=tmp_path)
    assert panel.returncode == 0, panel.stderr
    assert list((run / "deep" / "class-goldfish" / "inspect").glob("*.png"))
    compared = run_cli("compare", str(run), cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    assert (run / "compare-3.png").is_file() and (run / "compare-3.json").is_file()

    changed = run_cli("run", str(run), "--set", "grid.min_count=2", cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr
    assert "collect: " in changed.stdout and "grid: " in changed.stdout


def test_reading_commands_fail_with_one_line_through_the_cli(tmp_path):
    for args, message in [
        (("vis", "tiny:make", "--weights", "none", "--layer", "features", "--channel", "99"), "channel"),
        (("vis", "tiny:make", "--weights", "none", "--layer", "featurs", "--channel", "0"), "closest: features"),
        (("inspect", str(tmp_path / "no-run"), "--layer", "deep", "--grid", "2", "--cell", "0", "0"), "atlas run"),
        (("patches", str(tmp_path / "no-run"), "--layer", "deep", "--channel", "0"), "no-run"),
        (("maps", str(tmp_path / "missing.png"), "--model", "tiny:make", "--weights", "none",
          "--layer", "features"), "missing.png"),
        (("filters", "no_such_model"), "model"),
        (("compare", str(tmp_path / "no-run")), "no-run"),
    ]:
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
