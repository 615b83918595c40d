"""Overrides that compose: the keys of a config file that a `--set` made stale are dropped.

A smaller grid.sizes or fewer layers should not force the user to also rewrite render.sizes,
render.sizes_for, render.icon_size_for and layout.focus_layers. Only keys the user did not give are dropped, and only
when the file's own values agreed with each other, so a conflict between two values the user gave
is still an error (atlas.config says which).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .config import _STAGE_TABLES, LayoutConfig, _coerce, _layer_of
from .errors import AtlasError


def drop_stale(before: Mapping[str, Any], after: dict[str, Any], given: Sequence[str]) -> list[str]:
    """Drops keys of the file that its own values allowed but the overrides do not; says what it dropped.

    A smaller grid.sizes or fewer layers should not force the user to also rewrite render.sizes,
    render.sizes_for and layout.focus_layers. A key the user gave (a `given` path equals it or is
    a prefix of it) is kept, so a conflict between two --set values, or one the file had already,
    is still an error. Edits `after` in place.
    """
    def explicit(key: str) -> bool:
        return any(key == path or key.startswith(path + ".") for path in given)

    def replace(key: str, value: Any, note: str) -> None:
        stage, name = key.split(".")
        after[stage] = {**after.get(stage, {}), name: value}  # a copy: `before` may share the inner table
        dropped.append(note)

    parsed = [_parsed(table, key) for table in (before, after) for key in ("grid", "layers")]
    render, layout, layout_then = _parsed(after, "render"), _parsed(after, "layout"), _parsed(before, "layout")
    if any(value is None for value in (*parsed, render, layout, layout_then)):
        return []  # validation will say what is wrong
    (grid_then, layers_then, grid_now, layers_now), dropped = parsed, []
    lost_sizes, lost_layers = set(grid_then.sizes) - set(grid_now.sizes), set(layers_then) - set(layers_now)
    now = f"grid.sizes {list(grid_now.sizes)}"
    if not explicit("render.sizes") and (stale := [s for s in render.sizes if s in lost_sizes]):
        kept = [s for s in render.sizes if s not in stale]
        every = "" if kept else "; every size is rendered"
        replace("render.sizes", kept, f"render.sizes {stale} (not in {now}{every})")
    sizes_for, notes = {}, []
    focus_maps = _focus_slugs(layout) if (layout.classes, layout.pairs) != (layout_then.classes, layout_then.pairs) \
        else None  # the focus maps an override of layout.classes / pairs leaves
    for name, sizes in render.sizes_for.items():
        key, kept = f"render.sizes_for.{name}", [s for s in sizes if s not in lost_sizes]
        gone = focus_maps is not None and "/" in name and name.split("/", 1)[1] not in focus_maps
        if explicit(key) or (_layer_of(name) not in lost_layers and len(kept) == len(sizes) and not gone):
            sizes_for[name] = list(sizes)
        elif _layer_of(name) in lost_layers:
            notes.append(f"{key} (its layer is not in layers)")
        elif gone:
            notes.append(f"{key} (layout.classes / layout.pairs no longer make that map)")
        else:
            notes.append(f"{key} {sorted(set(sizes) - set(kept))} (not in {now})")
            if kept:
                sizes_for[name] = kept
    if notes:
        replace("render.sizes_for", sizes_for, "; ".join(notes))
    lost = [name for name in render.icon_size_for if _layer_of(name) in lost_layers
            and not explicit(f"render.icon_size_for.{name}")]
    if lost:
        replace("render.icon_size_for", {k: v for k, v in render.icon_size_for.items() if k not in lost},
                "; ".join(f"render.icon_size_for.{name} (its layer is not in layers)" for name in lost))
    stale = [name for name in layout.focus_layers if name in lost_layers]
    if stale and not explicit("layout.focus_layers"):
        kept = [name for name in layout.focus_layers if name not in stale]
        replace("layout.focus_layers", kept, f"layout.focus_layers {stale} (not in layers)")
        for key in ("layout.classes", "layout.pairs"):
            # An empty focus_layers means every layer: the focus maps the file asked for on its
            # focus layers would be made on every layer instead.
            if not kept and getattr(layout, key.split(".")[1]) and not explicit(key):
                replace(key, [], f"{key} (no focus layer is left)")
    if render.whiten and grid_then.whiten and not grid_now.whiten and not explicit("render.whiten"):
        replace("render.whiten", False, "render.whiten (needs grid.whiten = true)")
    return dropped


def _focus_slugs(layout: LayoutConfig) -> set[str]:
    """The focus-map names (after "<layer>/") that classes and pairs given by name make."""
    from .focus import slug

    return ({f"class-{slug(c)}" for c in layout.classes}
            | {f"pair-{slug(a)}-{slug(b)}" for a, b in layout.pairs})


def _parsed(table: Mapping[str, Any], key: str) -> Any:
    """A stage table or the layers of a raw config table, checked; None when they are invalid."""
    try:
        if key == "layers":
            return _coerce(table["layers"], tuple[str, ...], key)
        return _coerce(table.get(key, {}), _STAGE_TABLES[key], key)
    except (AtlasError, KeyError):
        return None
