"""The picture artifacts: icon folders (`icons-<N>/` with icons.json) and PNGs that carry their
fingerprint in a text chunk.

`RUN/<map>/icons-<N>/cell-<x>-<y>.png` plus `icons.json` ({"layer", "map", "size", "icon_size",
"fingerprint", "grid_fingerprint", "objective", "steps", "attempts", "seed", "member_similarity",
"icons": [{"cell", "file", "objective", "cosine", "member_cosine", "steps", "seed", "attempt"}],
"median_cosine", "median_member_cosine"}); see atlas.render.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .. import __version__
from ..artifacts import atomic_path

ICONS_JSON = "icons.json"
FINGERPRINT_KEY = "atlas-fingerprint"  # the PNG text chunk holding an image's fingerprint


def icon_file(x: int, y: int) -> str:
    """The file name of cell (x, y)'s icon inside its icons folder."""
    return f"cell-{x}-{y}.png"


@dataclasses.dataclass
class IconSet:
    """A finished icons folder: its icons.json and where the PNGs are."""

    folder: Path
    meta: dict[str, Any]  # the parsed icons.json

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("fingerprint", ""))

    @property
    def entries(self) -> list[dict[str, Any]]:
        return list(self.meta.get("icons", []))

    def path(self, x: int, y: int) -> Path | None:
        """The icon of cell (x, y), or None when the set has none for it."""
        for entry in self.entries:
            if list(entry.get("cell", [])) == [x, y]:
                return self.folder / str(entry.get("file", icon_file(x, y)))
        return None

    def read(self, x: int, y: int) -> np.ndarray | None:
        """Cell (x, y)'s icon as (S, S, 3) uint8, or None when it is absent or unreadable."""
        path = self.path(x, y)
        if path is None:
            return None
        try:
            with Image.open(path) as icon:
                return np.asarray(icon.convert("RGB"))
        except OSError:
            return None

    def complete(self) -> bool:
        """Whether every icon icons.json lists is on disk and reads as a whole image (a damaged
        file would otherwise be drawn white as if it were current)."""
        for entry in self.entries:
            try:
                with Image.open(self.folder / str(entry.get("file", ""))) as icon:
                    icon.verify()
            except (OSError, SyntaxError, ValueError):  # PIL's verify raises SyntaxError on bad chunks
                return False
        return True


def read_icon_set(folder: Path) -> IconSet | None:
    """The icons folder's IconSet, or None when it has no readable icons.json (render unfinished)."""
    try:
        meta = json.loads((folder / ICONS_JSON).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("icons", []), list):
        return None
    return IconSet(folder, meta)


def write_icon_set(folder: Path, images: np.ndarray, entries: Sequence[Mapping[str, Any]],
                   meta: Mapping[str, Any]) -> IconSet:
    """Writes the PNGs and icons.json into a hidden folder, then swaps it in for `folder`, so a
    reader sees the old set or the new one, never a mixture."""
    with folder_swap(folder) as tmp:
        for image, entry in zip(images, entries):
            Image.fromarray(image).save(tmp / entry["file"])
        (tmp / ICONS_JSON).write_text(json.dumps(dict(meta), indent=1) + "\n")
    return IconSet(folder, dict(meta))


@contextlib.contextmanager
def folder_swap(folder: Path) -> Iterator[Path]:
    """Yields an empty hidden folder beside `folder`; if the block succeeds it replaces `folder`
    (in two renames), else it is removed and `folder` is untouched."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def png_fingerprint(path: Path) -> str | None:
    """The `atlas-fingerprint` text chunk of a PNG, or None when absent or unreadable."""
    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:  # text chunks written before the pixels are read by open()
            return image.info.get(FINGERPRINT_KEY)
    except (OSError, ValueError):
        return None


def write_png(canvas: np.ndarray, path: Path, fingerprint: str, **provenance: str) -> None:
    """Writes an image atomically with its fingerprint and provenance (`atlas-<key>`) as PNG text."""
    info = PngInfo()
    info.add_text(FINGERPRINT_KEY, fingerprint)
    for key, value in provenance.items():
        info.add_text(f"atlas-{key}", str(value))
    info.add_text("atlas-version", __version__)
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG", pnginfo=info)


def write_image(picture: np.ndarray | Image.Image, path: Path) -> None:
    """Writes a picture atomically in the format its suffix names (.png when none).

    Raises ValueError for a suffix PIL cannot write, rather than a PNG under a misleading name.
    """
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    suffix = path.suffix.lower()
    image_format = Image.registered_extensions().get(suffix, "PNG" if suffix in ("", ".png") else None)
    if image_format is None:
        raise ValueError(f"unknown image format {suffix!r}")
    with atomic_path(path) as tmp:
        picture.save(tmp, format=image_format, **({"quality": 90} if image_format == "JPEG" else {}))


def write_json(info: Any, path: Path) -> None:
    """Writes JSON atomically (indented, for people to read)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(info, indent=1))
