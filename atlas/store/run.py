"""`Run`: a run directory, the paths of its artifacts, and the one rule that says which are current.

The rule: an artifact is current when it is complete and the fingerprint it carries equals the one
`atlas.store.fingerprints` computes from the run's config and the fingerprints of its inputs as
they are on disk now. The fingerprints chain (each includes its inputs'), so a current artifact was
made from the current generation of everything upstream of it. A stage redoes what is not current;
a reader refuses it with one line naming the command to run. Nothing combines two generations.

Readers and stages name the last stage they stand for (`upto`, one of STAGES), so a refusal lists
the stages to run from the stale one up to it. Source images are checked against the size and
modification time recorded at collect whenever pixels are cut from them (`source_image`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..artifacts import atomic_path
from ..errors import AtlasError, unknown_name
from ..focus import MapSpec
from . import fingerprints as fp
from .activations import Activations, ActivationsWriter, write_activations
from .images import IconSet, folder_swap, png_fingerprint, read_icon_set, write_icon_set, write_png
from .maps import Grid, GridFile, GridSet, Layout
from .provenance import read_provenance

if TYPE_CHECKING:
    from ..config import Config

CONFIG = "config.toml"
ACTIVATIONS = "activations.h5"
LAYOUT = "layout.h5"
GRID = "grid.h5"
COLLECT_PARTS = ".collect-parts"
RECEPTIVE_FIELD = "receptive-field.json"
VIEWER = "viewer"
VIEWER_MANIFEST = "viewer.json"  # the viewer folder's fingerprint
STAGES = ("collect", "layout", "grid", "render", "mosaic", "view")


class Run:
    """A run directory and its config: paths, readers, writers and freshness of every artifact.

    Args:
        root: the run directory (`config.run_dir`).
        config: the run's config; None reads `root/config.toml`.
    """

    def __init__(self, root: str | Path, config: Config | None = None):
        self.root = Path(root)
        if config is None:
            from ..config import load_config

            config = load_config(self.root)
        self.config = config

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        """Opens an existing run directory by its config copy; one-line AtlasError if it is not one."""
        path = Path(path)
        if path.is_file():
            raise AtlasError(f"{path} is a file (a config?), not a run directory; pass the run_dir a config "
                             "names, once `atlas run CONFIG` has built it")
        if not path.is_dir():
            raise AtlasError(f"run directory {path} not found; build one with `atlas run CONFIG` (a config's run_dir)")
        if not (path / CONFIG).is_file():
            raise AtlasError(f"{path} has no {CONFIG}, so it is not a run directory; build one with `atlas run CONFIG`")
        from ..config import load_config

        config = load_config(path)
        return cls(config.run_dir, config)

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    # ------------------------------------------------------------------------------------- paths

    @property
    def activations_path(self) -> Path:
        """RUN/activations.h5: the collect stage's samples."""
        return self.root / ACTIVATIONS

    @property
    def layout_path(self) -> Path:
        """RUN/layout.h5: every map's 2-D positions."""
        return self.root / LAYOUT

    @property
    def grid_path(self) -> Path:
        """RUN/grid.h5: every map's grids."""
        return self.root / GRID

    @property
    def collect_parts_dir(self) -> Path:
        """Where collect keeps finished parts until activations.h5 is assembled."""
        return self.root / COLLECT_PARTS

    def map_dir(self, name: str) -> Path:
        """RUN/<map>: a layer's folder, or a focus map's inside its layer's."""
        return self.root / name

    def icons_dir(self, name: str, size: int) -> Path:
        """RUN/<map>/icons-<N>: an icon per cell and icons.json."""
        return self.map_dir(name) / f"icons-{size}"

    def icons_work_dir(self, name: str, size: int) -> Path:
        """Where render keeps finished batches of an unfinished icons folder."""
        return self.map_dir(name) / f".icons-{size}.partial"

    def atlas_png(self, name: str, size: int, labels: bool = False) -> Path:
        """RUN/<map>/atlas-<N>.png (or its labelled copy)."""
        return self.map_dir(name) / f"atlas-{size}{'-labels' if labels else ''}.png"

    def preview_png(self, name: str, size: int, labels: bool = False) -> Path:
        """RUN/<map>/atlas-preview-<N>.png (or its labelled copy)."""
        return self.map_dir(name) / f"atlas-preview-{size}{'-labels' if labels else ''}.png"

    def inspect_path(self, name: str, size: int, x: int, y: int) -> Path:
        """The panel PNG of `atlas inspect` (its JSON has the same name with .json)."""
        return self.map_dir(name) / "inspect" / f"cell-{size}-{x}-{y}.png"

    def attack_path(self, name: str, size: int, source: str | None = None) -> Path:
        """The figure of `atlas attack` on a map's N x N grid (its JSON has the same name with
        .json); `source` names the attacked class when it is not the pair's own first class."""
        return self.map_dir(name) / "attack" / f"attack-{size}{f'-from-{source}' if source else ''}.png"

    def patches_path(self, layer: str, channel: int) -> Path:
        """The panel PNG of `atlas patches`."""
        return self.map_dir(layer) / "patches" / f"channel-{channel}.png"

    def place_png(self, name: str, stem: str, size: int) -> Path:
        """RUN/<map>/place/<stem>-<N>.png: a placed image's samples on the map's atlas picture."""
        return self.map_dir(name) / "place" / f"{stem}-{size}.png"

    def place_json(self, name: str, stem: str) -> Path:
        """RUN/<map>/place/<stem>.json: where a placed image's samples fell on the map, per grid size."""
        return self.map_dir(name) / "place" / f"{stem}.json"

    def compare_path(self, size: int) -> Path:
        """The default figure of `atlas compare`."""
        return self.root / f"compare-{size}.png"

    @property
    def viewer_dir(self) -> Path:
        """RUN/viewer: the interactive atlas (index.html and its data)."""
        return self.root / VIEWER

    # ------------------------------------------------------------------------------- freshness

    def _refuse(self, path: Path, why: str, stale: str, upto: str) -> AtlasError:
        """The one line for an artifact that is missing or not current: what, why, and the stages
        to run (from the stale one to the one the caller stands for)."""
        if upto not in STAGES:
            raise ValueError(f"upto must be one of {', '.join(STAGES)}, got {upto!r}")
        first = STAGES.index(stale)
        first_stage, *then = STAGES[first:max(first, STAGES.index(upto)) + 1]
        return AtlasError(f"{path} {why}; run `atlas {first_stage} {self.root}`"
                          + (f", then {', '.join(then)}" if then else ""))

    def activations_fingerprint(self, upto: str = "collect") -> str:
        """The fingerprint of a complete activations.h5 collected with this config (the root of
        every chain; that its images are unchanged is checked where they are read, `source_image`)."""
        path = self.activations_path
        recorded = self._recorded(path, "collect", upto)
        made, now = fp.collect_settings(json.loads(recorded["config"])), fp.collect_settings(self.config)
        changed = [key for key in {**made, **now} if fp.setting(made, key) != fp.setting(now, key)]
        if changed:
            key = changed[0]
            raise self._refuse(path, f"is out of date (collected with {key} = {json.dumps(fp.setting(made, key))}, "
                               f"now {json.dumps(fp.setting(now, key))})", "collect", upto)
        return recorded["fingerprint"]

    def expected_layout_fingerprint(self, upto: str = "layout") -> str:
        """The fingerprint layout.h5 must carry to be current (given current activations)."""
        return fp.layout_fingerprint(self.config, self.activations_fingerprint(upto))

    def layout_fingerprint(self, upto: str = "layout") -> str:
        """The fingerprint of a current layout.h5; AtlasError when it is missing or stale."""
        expected = self.expected_layout_fingerprint(upto)
        recorded = self._recorded(self.layout_path, "layout", upto)
        if recorded["fingerprint"] != expected:
            why = ("made from other activations" if recorded.get("inputs") != self.activations_fingerprint(upto)
                   else "made with another [layout] config or other layers")
            raise self._refuse(self.layout_path, f"is out of date ({why})", "layout", upto)
        return expected

    def _recorded(self, path: Path, stage: str, upto: str) -> dict[str, str]:
        """The provenance of a complete artifact; AtlasError when it is missing or unfinished."""
        if not path.is_file():
            raise self._refuse(path, "not found", stage, upto)
        recorded = read_provenance(path)
        if recorded is None:
            raise self._refuse(path, "is incomplete or unreadable", stage, upto)
        return recorded

    def expected_grid_fingerprint(self, upto: str = "grid") -> str:
        """The fingerprint grid.h5 must carry to be current (given a current layout)."""
        return fp.grid_fingerprint(self.config, self.layout_fingerprint(upto), self.activations_fingerprint(upto))

    def grid_fingerprint(self, upto: str = "grid") -> str:
        """The fingerprint of a current grid.h5; AtlasError when it (or what it is made from) is
        missing or stale."""
        expected = self.expected_grid_fingerprint(upto)
        recorded = self._recorded(self.grid_path, "grid", upto)
        if recorded["fingerprint"] != expected:
            why = ("made from another layout or other activations"
                   if recorded.get("inputs") != self.layout_fingerprint(upto) else "made with another [grid] config")
            raise self._refuse(self.grid_path, f"is out of date ({why})", "grid", upto)
        return expected

    def is_current(self, path: Path, expected: str) -> bool:
        """Whether the HDF5 artifact at `path` is complete and carries `expected`."""
        recorded = read_provenance(path)
        return recorded is not None and recorded["fingerprint"] == expected

    def icons_state(self, spec: MapSpec, grid: Grid) -> tuple[str, IconSet | None]:
        """("missing" | "stale" | "incomplete" | "current", the icon set) of a map's icons at the
        grid's size. Missing: render has not finished that folder. Stale: made for another grid,
        [render] config or model. Incomplete: an icon file is gone or unreadable."""
        icons = read_icon_set(self.icons_dir(spec.name, grid.size))
        if icons is None:
            return "missing", None
        if icons.fingerprint != fp.icons_fingerprint(self.config, grid, spec):
            return "stale", icons
        return ("current" if icons.complete() else "incomplete"), icons

    def icons(self, spec: MapSpec, grid: Grid, upto: str = "render") -> IconSet | None:
        """A map's current icons at the grid's size; None when not rendered; AtlasError when they
        are stale or incomplete (render redoes them)."""
        state, icons = self.icons_state(spec, grid)
        why = {"stale": "is out of date (made from another grid, [render] config or model)",
               "incomplete": "is incomplete (an icon file is missing or unreadable)"}
        if state in why:
            raise self._refuse(self.icons_dir(spec.name, grid.size), why[state], "render", upto)
        return icons

    def atlas_png_fingerprint(self, spec: MapSpec, grid: Grid, grid_fp: str, icons: IconSet) -> str:
        """The fingerprint atlas-N.png of a map must carry, drawn from these (current) icons."""
        return fp.atlas_png_fingerprint(self.config, spec.name, grid.size, grid_fp, icons.fingerprint)

    def preview_png_fingerprint(self, spec: MapSpec, grid: Grid, grid_fp: str) -> str:
        """The fingerprint atlas-preview-N.png of a map must carry."""
        return fp.preview_png_fingerprint(self.config, spec.name, grid.size, grid_fp)

    @staticmethod
    def picture_is_current(path: Path, expected: str) -> bool:
        """Whether the atlas picture at `path` carries `expected` (PNG text chunk)."""
        return png_fingerprint(path) == expected

    def atlas_image(self, name: str, size: int) -> tuple[Path, str] | None:
        """The current picture of a map at grid N, (path, "icons") for atlas-N.png, else
        (path, "preview") for atlas-preview-N.png; None when neither is current."""
        grid_fp = self.grid_fingerprint("mosaic")
        grids = self.grid_file("mosaic")
        spec = grids.spec(name)
        if spec is None or size not in grids.sizes(name):
            return None
        grid = grids.grid(name, size)
        state, icons = self.icons_state(spec, grid)
        if state == "current" and icons is not None and self.picture_is_current(
                self.atlas_png(name, size), self.atlas_png_fingerprint(spec, grid, grid_fp, icons)):
            return self.atlas_png(name, size), "icons"
        if self.picture_is_current(self.preview_png(name, size), self.preview_png_fingerprint(spec, grid, grid_fp)):
            return self.preview_png(name, size), "preview"
        return None

    def viewer_fingerprint(self) -> str | None:
        """The fingerprint the viewer folder was built with, or None when there is none."""
        try:
            return str(json.loads((self.viewer_dir / VIEWER_MANIFEST).read_text())["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def source_image(self, acts: Activations, i: int) -> Path:
        """The path of image i for cutting patches from; AtlasError when the file changed since it
        was collected (size or modification time), since positions from the old pixels would be
        shown on new ones. A missing file is returned as is (readers skip and count it)."""
        path = self.config.images / str(acts.images.path[i])
        recorded = acts.images.stat
        if recorded is None:
            return path  # collected before sizes and times were recorded
        try:
            st = path.stat()
        except OSError:
            return path
        if (st.st_size, st.st_mtime_ns) != tuple(int(v) for v in recorded[i]):
            raise self._refuse(path, "changed since it was collected (size or modification time differs)",
                               "collect", "collect")
        return path

    def receptive_field(self, layer: str, key: Mapping[str, Any]) -> dict[str, Any] | None:
        """The receptive field cached for a layer when it was measured for the same `key` (model,
        layer, input size), else None."""
        try:
            data = json.loads((self.map_dir(layer) / RECEPTIVE_FIELD).read_text())
        except (OSError, ValueError):
            return None
        return data.get("field") if isinstance(data, dict) and data.get("key") == dict(key) else None

    # --------------------------------------------------------------------------------- readers

    def activations(self, upto: str = "collect") -> Activations:
        """The complete activations.h5, open (use `with`). `upto`: the stage the caller stands for."""
        self.activations_fingerprint(upto)
        return Activations(self.activations_path)

    def layout(self, names: Sequence[str] | None = None, upto: str = "layout", placement: bool = False) -> Layout:
        """The current layout (all maps, or the named ones; `placement`: with what placing new
        samples needs, see `Layout.load`)."""
        self.layout_fingerprint(upto)
        return Layout.load(self.layout_path, names, placement)

    def grid_file(self, upto: str = "grid") -> GridFile:
        """The current grid.h5, read one grid at a time."""
        self.grid_fingerprint(upto)
        return GridFile(self.grid_path, self.root)

    def grid(self, name: str, size: int, upto: str = "grid") -> Grid:
        """One map's current grid of one size."""
        return self.grid_file(upto).grid(name, size)

    def maps(self, upto: str = "grid") -> list[MapSpec]:
        """Every map of the run (layers, then their focus maps), from the current grid.h5."""
        return self.grid_file(upto).specs

    def find_map(self, name: str, upto: str = "grid") -> MapSpec:
        """A map by name (a layer or a focus map); AtlasError with close names when there is none."""
        specs = self.maps(upto)
        for spec in specs:
            if spec.name == name:
                return spec
        raise unknown_name("layer", name, [m.name for m in specs], f"run {self.root} has")

    # --------------------------------------------------------------------------------- writers

    @contextlib.contextmanager
    def write_activations(self) -> Iterator[ActivationsWriter]:
        """A writer of activations.h5; the file appears only when the block succeeds."""
        with write_activations(self.activations_path) as writer:
            yield writer

    def write_layout(self, layout: Layout) -> Path:
        """Writes layout.h5 atomically."""
        with atomic_path(self.layout_path) as tmp:
            layout.save(tmp)
        return self.layout_path

    def write_grids(self, grids: GridSet) -> Path:
        """Writes grid.h5 atomically."""
        with atomic_path(self.grid_path) as tmp:
            grids.save(tmp)
        return self.grid_path

    def write_icons(self, name: str, size: int, images: np.ndarray, entries: Sequence[Mapping[str, Any]],
                    meta: Mapping[str, Any]) -> IconSet:
        """Writes a map's icons folder for one grid size, swapped in whole."""
        return write_icon_set(self.icons_dir(name, size), images, entries, meta)

    @contextlib.contextmanager
    def write_viewer(self, fingerprint: str) -> Iterator[Path]:
        """Yields an empty folder to build the viewer in; it replaces RUN/viewer (with its
        fingerprint recorded) only when the block succeeds."""
        with folder_swap(self.viewer_dir) as tmp:
            yield tmp
            (tmp / VIEWER_MANIFEST).write_text(json.dumps({"fingerprint": fingerprint}) + "\n")

    def write_picture(self, canvas: np.ndarray, path: Path, fingerprint: str, **provenance: str) -> None:
        """An atlas image with its fingerprint, so it is redrawn only when what made it changes."""
        write_png(canvas, path, fingerprint, **provenance)

    def write_receptive_field(self, layer: str, key: Mapping[str, Any], field: Mapping[str, Any]) -> None:
        """Caches a layer's measured receptive field with the key it was measured for."""
        with atomic_path(self.map_dir(layer) / RECEPTIVE_FIELD) as tmp:
            tmp.write_text(json.dumps({"key": dict(key), "field": dict(field)}, indent=1))
