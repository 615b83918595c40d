"""Helpers for writing files safely: atomic paths, work folders, fingerprints of JSON-able values.

The run store (atlas.store) builds on them: every artifact carries the fingerprint of everything
that made it, and is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any



def to_jsonable(value: Any) -> Any:
    """Turns dataclasses, paths, tuples, numpy arrays and scalars into plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if getattr(value, "ndim", 0) > 0 and hasattr(value, "tolist"):  # numpy array (an HDF5 list attribute)
        return to_jsonable(value.tolist())
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    return value


def fingerprint(*parts: Any) -> str:
    """Returns a short stable hash of JSON-able parts (dict key order does not matter)."""
    text = json.dumps([to_jsonable(p) for p in parts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it to `path` only if the block succeeds.

    A crash or exception leaves the old file (if any) untouched and no half-written file under
    the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def work_dir_matches(path: str | Path, fingerprint_: str) -> bool:
    """Whether a work folder exists and holds pieces made with this fingerprint."""
    stamp = Path(path) / "fingerprint"
    return stamp.is_file() and stamp.read_text().strip() == fingerprint_


def prepare_work_dir(path: str | Path, fingerprint_: str) -> Path:
    """Makes the folder of a stage's finished pieces, keeping them only if made with this fingerprint.

    A resumable stage writes finished pieces of work into such a folder; pieces of a run with
    another config are thrown away, never appended to.
    """
    import shutil

    path = Path(path)
    if work_dir_matches(path, fingerprint_):
        return path
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    # The folder appears with its stamp in one rename: independent shard jobs starting together
    # never see a folder without a stamp (which they would take for another run's and delete).
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    (fresh / "fingerprint").write_text(fingerprint_ + "\n")
    try:
        os.rename(fresh, path)
    except OSError:  # another process made it first
        shutil.rmtree(fresh, ignore_errors=True)
    return path
