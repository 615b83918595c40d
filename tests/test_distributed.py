"""Collect and render shared out between processes: torchrun ranks (gloo, on the CPU) and
independent `--shard I/N` jobs with a final `--merge`, each against a one-process run."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import atlas.collect as collect
import atlas.grid as grid_stage
import atlas.render as render
from atlas.artifacts import prepare_work_dir
from atlas.cli import main
from atlas.config import RenderConfig, load_config, save_config
from atlas.distributed import ALONE, Shard, parse_shard
from atlas.errors import AtlasError
from atlas.store import Run

from tiny import SIZE, config_text, write_images
from toy_runs import toy_clusters, toy_config, write_activations, write_layout

TESTS = Path(__file__).parent

# Rank 1 kills itself (SIGKILL) inside its second part; torchrun then ends rank 0 as well.
KILL_RANK_1 = """
import os, signal, sys
import atlas.collect as collect
from atlas.cli import main
if os.environ["RANK"] == "1":
    calls = []
    original = collect.sample_batch
    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    collect.sample_batch = dying
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(autouse=True)
def tiny_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


@pytest.fixture(autouse=True)
def torch_threads_kept():
    """collect.threads sets this process's torch threads; later tests get theirs back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(TESTS))


def atlas_cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """`atlas ARGS` in this process (what a job of a job array runs): exit code, stdout, stderr."""
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """Two processes on this machine, as a user would start them."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], capture_output=True, text=True, env=env())


def test_shard_parsing_and_ownership():
    assert parse_shard("1/4") == Shard(1, 4) and parse_shard(" 0 / 1 ") == Shard(0, 1)
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(AtlasError, match="--shard must be I/N"):
            parse_shard(bad)
    shards = [Shard(i, 3) for i in range(3)]
    assert [[i for i in range(7) if s.owns(i)] for s in shards] == [[0, 3, 6], [1, 4], [2, 5]]
    assert ALONE.writes_result and not Shard(0, 2).writes_result and Shard(0, 2, group=True).writes_result
    masks = [render.shard_mask(70, s) for s in shards]
    assert (sum(m.astype(int) for m in masks) == 1).all()  # every job once
    assert masks[1][render.SHARE_JOBS:2 * render.SHARE_JOBS].all() and not masks[1][:render.SHARE_JOBS].any()


def test_work_folder_is_kept_for_its_fingerprint_only(tmp_path):
    folder = prepare_work_dir(tmp_path / "w", "a")
    (folder / "part-1.npz").write_text("x")
    assert prepare_work_dir(tmp_path / "w", "a") == folder and (folder / "part-1.npz").exists()
    prepare_work_dir(tmp_path / "w", "b")
    assert not (folder / "part-1.npz").exists() and (folder / "fingerprint").read_text() == "b\n"
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no temporary folder left behind


def test_collect_over_two_ranks_shards_and_a_killed_rank_is_byte_identical(tmp_path, capsys):
    write_images(tmp_path / "images", 22)  # 6 parts of 4 images, the last one short
    path = tmp_path / "run.toml"
    # torchrun gives each rank one thread; byte identity holds at equal thread counts (README)
    path.write_text(config_text(tmp_path / "run", tmp_path / "images", images_per_part=4, threads=1))
    config = load_config(path)
    out = config.run_dir / "activations.h5"
    collect.run(config, log=lambda line: None)
    reference = out.read_bytes()

    def fresh() -> None:
        out.unlink()

    fresh()
    two = torchrun("-m", "atlas", "collect", str(path))
    assert two.returncode == 0, two.stderr
    assert "[rank 1] collect: rank 1 of 2: 3 part(s), 10 images" in two.stdout
    assert out.read_bytes() == reference

    fresh()
    killer = tmp_path / "killer.py"
    killer.write_text(KILL_RANK_1)
    killed = torchrun(str(killer), "collect", str(path))
    assert killed.returncode != 0 and not out.exists()
    parts = sorted(p.name for p in Run(config.run_dir, config).collect_parts_dir.glob("part-*.npz"))
    assert "part-000000004.npz" in parts and "part-000000012.npz" not in parts  # rank 1 did its first part only
    again = torchrun("-m", "atlas", "collect", str(path))
    assert again.returncode == 0, again.stderr
    assert f"collect: {len(parts)} of 6 parts" in again.stdout and "are already on disk" in again.stdout
    done_by_rank_1 = 3 - sum(name in parts for name in ("part-000000004.npz", "part-000000012.npz",
                                                         "part-000000020.npz"))
    assert f"rank 1 of 2: {done_by_rank_1} part(s)" in again.stdout
    assert out.read_bytes() == reference

    fresh()
    first = atlas_cli(capsys, "collect", str(path), "--shard", "0/2")
    assert first.returncode == 0, first.stderr
    assert "3 of 6 parts still missing" in first.stdout and "--merge" in first.stdout and not out.exists()
    early = atlas_cli(capsys, "collect", str(config.run_dir), "--merge")
    assert early.returncode == 2 and early.stderr.count("\n") == 1
    assert "3 of 6 collect parts are missing (part 1, 3, 5;" in early.stderr
    second = atlas_cli(capsys, "collect", str(path), "--shard", "1/2")
    assert second.returncode == 0 and "every part is done" in second.stdout
    merged = atlas_cli(capsys, "collect", str(config.run_dir), "--merge")
    assert merged.returncode == 0, merged.stderr
    assert out.read_bytes() == reference
    assert not Run(config.run_dir, config).collect_parts_dir.exists()


def test_shard_and_merge_refusals(tmp_path, capsys):
    write_images(tmp_path / "images", 4)
    path = tmp_path / "run.toml"
    path.write_text(config_text(tmp_path / "run", tmp_path / "images"))
    for args, message in [
        (("collect", str(path), "--shard", "2/2"), "--shard must be I/N"),
        (("collect", str(path), "--merge", "--force"), "--merge takes neither --shard nor --force"),
        (("collect", str(path), "--merge", "--shard", "0/2"), "--merge takes neither"),
        (("layout", str(path), "--shard", "0/2"), "unrecognized arguments"),
    ]:
        proc = atlas_cli(capsys, *args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1


def render_run(run_dir: Path):
    """A tiny-model run up to grid.h5 with more icon jobs (about 100) than one SHARE_JOBS block."""
    acts, labels = toy_clusters(200, 4, 6, seed=2)
    rng = np.random.default_rng(1)
    xy = np.clip(np.stack([labels / 6 + 0.15 * rng.random(len(labels)), rng.random(len(labels))], 1), 0, 1)
    preprocess = {"size": SIZE, "resize": SIZE, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    config = toy_config(run_dir, layers=("deep",), grid={"sizes": (7,), "min_count": 1}, model="tiny:make",
                        preprocess=preprocess, render=RenderConfig(icon_size=16, steps=4, batch_size=5, pad=2,
                                                                   jitter=2, attempts=2))
    write_activations(run_dir, {"deep": acts}, config=config)
    write_layout(config, {"deep": xy.astype(np.float32)})
    grid_stage.run(config, log=lambda line: None)
    save_config(config)
    return config


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_render_over_two_ranks_and_shards_equals_one_process(tmp_path, capsys):
    config = render_run(tmp_path / "run")
    icons = Run(config.run_dir, config).icons_dir("deep", 7)
    summary = render.run(config, log=lambda line: None)
    assert summary.grids[0].icons * 2 > render.SHARE_JOBS  # rank 1 has blocks to do
    reference = folder_bytes(icons)

    shutil.rmtree(icons)
    two = torchrun("-m", "atlas", "render", str(config.run_dir))
    assert two.returncode == 0, two.stderr
    assert "[rank 1] render: deep 7x7: rank 1 of 2:" in two.stdout and "rank 0 writes the icon folders" in two.stdout
    assert folder_bytes(icons) == reference

    shutil.rmtree(icons)
    first = atlas_cli(capsys, "render", str(config.run_dir), "--shard", "1/2")
    assert first.returncode == 0 and "--merge" in first.stdout and not icons.exists()
    early = atlas_cli(capsys, "render", str(config.run_dir), "--merge")
    assert early.returncode == 2 and "lacks" in early.stderr and early.stderr.count("\n") == 1
    assert atlas_cli(capsys, "render", str(config.run_dir), "--shard", "0/2").returncode == 0
    merged = atlas_cli(capsys, "render", str(config.run_dir), "--merge")
    assert merged.returncode == 0, merged.stderr
    assert folder_bytes(icons) == reference


def test_a_shard_job_leaves_the_file_to_merge(tmp_path):
    write_images(tmp_path / "images", 6)
    path = tmp_path / "run.toml"
    path.write_text(config_text(tmp_path / "run", tmp_path / "images", images_per_part=4))
    config = load_config(path)
    summary = collect.run(config, log=lambda line: None, shard=parse_shard("0/2"))
    assert not summary.assembled and summary.parts_done == 1
    assert not (config.run_dir / "activations.h5").exists()
    with pytest.raises(AtlasError, match="1 of 2 collect parts are missing"):
        collect.run(config, log=lambda line: None, merge=True)
    changed = dataclasses.replace(config, collect=dataclasses.replace(config.collect, seed=5))
    # neither a merge nor another job throws parts away: another config's folder is refused
    with pytest.raises(AtlasError, match="holds collect parts of another config"):
        collect.run(changed, log=lambda line: None, merge=True)
    with pytest.raises(AtlasError, match="holds collect parts of another config"):
        collect.run(changed, log=lambda line: None, shard=parse_shard("1/2"))
    assert len(list(Run(config.run_dir, config).collect_parts_dir.glob("part-*.npz"))) == 1
    collect.run(config, log=lambda line: None, shard=parse_shard("1/2"))
    assert collect.run(config, log=lambda line: None, merge=True).assembled
    parts_dir = Run(config.run_dir, config).collect_parts_dir
    assert not parts_dir.exists()

    # shards forced over a current file: the merge assembles their parts rather than calling it current
    for share in ("0/2", "1/2"):
        collect.run(config, log=lambda line: None, shard=parse_shard(share), force=True)
    assert len(list(parts_dir.glob("part-*.npz"))) == 2
    assert collect.run(config, log=lambda line: None, merge=True).assembled
    assert not parts_dir.exists()
