"""README's Python API example, run exactly as written (real model, real images: slow)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SHARED = ROOT.parent / "shared"


def python_api_example() -> str:
    """The first python code block of README's "Python API" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_python_api_example_runs_as_written(tmp_path):
    # The example runs in a folder laid out like the project's (configs/, ../shared/), so its
    # run directory goes to a temporary place rather than into the working tree.
    work = tmp_path / "project"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "shared").symlink_to(SHARED)
    (work / "example.py").write_text(python_api_example())
    proc = subprocess.run([sys.executable, "example.py"], cwd=work, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "mosaic: wrote" in out and "first sample from n0" in out
    assert re.search(r"\(1024, 112\) first sample from", out)
    assert re.search(r"atlas image: \(PosixPath\('.*/atlas-8.png'\), 'icons'\)", out)
    assert re.search(r"trustworthiness 0\.\d\d, median icon cosine 0\.\d\d", out)
    assert (work / "data/runs/api-example/in-memory-atlas-4.png").is_file()
    # the one-layer override dropped the demo's focus maps and render sizes with a note
    assert "atlas: note: dropped" in proc.stderr
