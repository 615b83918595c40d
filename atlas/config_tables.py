"""Raw config tables: `--set key=value` overrides applied to them, and writing them back as TOML.

The typed, validated view of a table is atlas.config's `Config`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import AtlasError


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses `key.sub=value`; the value is read as TOML, or as a plain string if that fails."""
    if "=" not in text:
        raise AtlasError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise AtlasError(f"--set expects key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    path = key.split(".")
    if path[:2] in (["render", "sizes_for"], ["render", "icon_size_for"]) and len(path) > 3:
        path = path[:2] + [".".join(path[2:])]  # a map name has dots of its own: blocks.10, blocks.15/class-x
    return path, value


def apply_overrides(table: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns a copy of a raw config table with `--set` overrides applied."""
    table = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in table.items()}
    for text in overrides:
        path, value = parse_override(text)
        node = table
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise AtlasError(f"--set {text}: {part} is not a table")
        node[path[-1]] = value
    return table


def dumps_toml(table: Mapping[str, Any]) -> str:
    """Writes a config table as TOML (scalars and lists first, then one [table] per stage)."""
    lines: list[str] = []
    nested = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            nested.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in nested:
        lines.append("")
        lines.append(f"[{key}]")
        for sub, item in value.items():
            lines.append(f"{sub} = {_toml_value(item)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")
