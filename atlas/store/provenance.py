"""Provenance of the HDF5 artifacts: who made a file, from what, and whether it is finished.

Every HDF5 artifact carries file attributes `stage`, `fingerprint` (everything that decided its
content), `inputs` (the fingerprint of the artifact it was made from), `config` (JSON),
`atlas_version` and `complete` (set last, so a file without it was never finished).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py

from .. import __version__
from ..artifacts import to_jsonable


def write_provenance(h5: h5py.File | h5py.Group, *, stage: str, fingerprint: str, config: Any,
                     inputs: str | None = None, **extra: Any) -> None:
    """Stores who made this artifact: stage, fingerprint, input fingerprint, config, version.

    Extra values that are not plain scalars are stored as JSON.
    """
    h5.attrs["stage"] = stage
    h5.attrs["fingerprint"] = fingerprint
    h5.attrs["inputs"] = inputs or ""
    h5.attrs["config"] = json.dumps(to_jsonable(config), sort_keys=True)
    h5.attrs["atlas_version"] = __version__
    for key, value in extra.items():
        h5.attrs[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(
            to_jsonable(value), sort_keys=True)


def mark_complete(h5: h5py.File) -> None:
    """The last write of every artifact: readers take a file without it for an interrupted one."""
    h5.attrs["complete"] = True


def read_provenance(path: str | Path) -> dict[str, str] | None:
    """The provenance attributes of a complete artifact as strings, or None when the file is
    absent, unreadable or unfinished."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as h5:
            if not bool(h5.attrs.get("complete", False)) or "fingerprint" not in h5.attrs:
                return None
            return {str(k): _text(v) for k, v in h5.attrs.items()}
    except OSError:
        return None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    return value if isinstance(value, str) else json.dumps(to_jsonable(value))
