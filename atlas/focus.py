"""Focus maps: class atlases and two-class views of a layer, made by the same stages as its atlas.

A run's *maps* are what the stages after collect lay out, bin, render and draw. Every layer has its
own map over all of its samples, named after the layer. `layout.classes` adds a class atlas per
class, `<layer>/class-<slug>`, over the samples that matter for that class: those whose attribution
ranks it first, plus the `layout.class_top` samples attributed to it most (the article's "focusing
on a single classification"). `layout.pairs` adds a two-class view `<layer>/pair-<a>-<b>` over the
samples of both classes, placed by `x = attr[b] - attr[a]` divided by the 99th percentile of its
magnitude and clipped to [-1, 1] (class a on the left, b on the right) and `y` = a 1-D UMAP.

A focus map keeps the rows of the layer's samples it holds (its layout's `rows`), so grid members,
`atlas inspect` and the preview mosaic still index the layer's samples. Its artifacts sit beside
the layer's, under the map's name (`<layer>/class-<slug>`) in every file and folder of the run.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from .blocks import iter_blocks
from .errors import AtlasError

PAIR_PERCENTILE = 99.0  # the two-class axis is scaled so this percentile of |attr[b] - attr[a]| is 1


@dataclasses.dataclass(frozen=True)
class MapSpec:
    """One map of a run: a layer's own atlas or one of its focus maps."""

    name: str  # "<layer>", "<layer>/class-<slug>" or "<layer>/pair-<slug a>-<slug b>"
    layer: str  # the layer whose samples it lays out
    kind: str = "layer"  # "layer", "class" or "pair"
    classes: tuple[int, ...] = ()  # the class (class atlas) or the classes (a, b) (two-class view)
    class_names: tuple[str, ...] = ()  # their names, for titles

    @property
    def title(self) -> str:
        """How the map is named in pictures and summaries."""
        if self.kind == "class":
            return f"{self.layer}, class atlas of {self.class_names[0]}"
        if self.kind == "pair":
            return f"{self.layer}, {self.class_names[0]} (left) vs {self.class_names[1]} (right)"
        return self.layer


def slug(text: str) -> str:
    """A file-name-safe form of a class name: lower case, runs of other characters as one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "class"


def find_class(query: str, class_names: Sequence[str] | None, wnids: Sequence[str] | None = None) -> int:
    """The index of a class by name, WordNet id (both case-insensitive) or number; AtlasError with
    close matches when there is no such class."""
    key = query.strip().lower()
    for pool in (class_names or [], wnids or []):
        for i, name in enumerate(pool):
            if str(name).lower() == key:
                return i
    if key.isdigit() and (class_names is None or int(key) < len(class_names)):
        return int(key)
    if not class_names:
        raise AtlasError(f"this run has no class names, so class {query!r} cannot be looked up by name; "
                         "give the class's output index instead")
    lowered = [str(n).lower() for n in class_names]
    close = difflib.get_close_matches(key, lowered, n=5, cutoff=0.6)
    close += [n for n in lowered if key and key in n and n not in close][:5 - len(close)]
    hint = f"; did you mean {', '.join(repr(class_names[lowered.index(c)]) for c in close)}?" if close else ""
    raise AtlasError(f"unknown class {query!r}{hint}")


def plan_maps(layers: Sequence[str], classes: Sequence[str], pairs: Sequence[Sequence[str]],
              class_names: Sequence[str] | None, wnids: Sequence[str] | None = None,
              focus_layers: Sequence[str] = ()) -> list[MapSpec]:
    """Every map of a run: per layer its own map, then its class atlases, then its two-class views.

    Args:
        layers: the run's layers, in config order.
        classes: `layout.classes`, class names, wnids or output indices.
        pairs: `layout.pairs`, each two classes (a, b).
        class_names, wnids: the run's classes (None when unknown: then only indices work).
        focus_layers: the layers that get focus maps (`layout.focus_layers`); empty = all.

    Raises:
        AtlasError: an unknown class (with close matches), or two maps with one name.
    """
    def named(query: str) -> tuple[int, str]:
        c = find_class(query, class_names, wnids)
        return c, (str(class_names[c]) if class_names is not None and c < len(class_names) else str(c))

    maps: list[MapSpec] = []
    for layer in layers:
        maps.append(MapSpec(layer, layer))
        if focus_layers and layer not in focus_layers:
            continue
        for query in classes:
            c, name = named(query)
            maps.append(MapSpec(f"{layer}/class-{slug(name)}", layer, "class", (c,), (name,)))
        for a_query, b_query in pairs:
            (a, a_name), (b, b_name) = named(a_query), named(b_query)
            if a == b:
                raise AtlasError(f"layout.pairs: {a_query!r} and {b_query!r} are the same class; "
                                 "a two-class view needs two classes")
            maps.append(MapSpec(f"{layer}/pair-{slug(a_name)}-{slug(b_name)}", layer, "pair", (a, b),
                                (a_name, b_name)))
    names = [m.name for m in maps]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise AtlasError(f"two focus maps would both be named {twice[0]!r}; list each class (or pair) once")
    return maps


# ---------------------------------------------------------------------------------------------
# Pure core


def class_scores(attr: Any, columns: Sequence[int], rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's top attributed class and its attribution to some classes, in one pass.

    Args:
        attr: (n, n_classes) float16/float32 array or h5py dataset, read `rows` at a time.
        columns: the classes whose attribution is returned.
        rows: rows per read; None = about 64 MiB of float32 (`atlas.blocks.block_rows`), so memory
            does not grow with n or with the number of classes (1,000 classes: 16,384 rows).

    Returns:
        top: (n,) int64, the argmax over classes of each row (ties: the lowest class index).
        scores: (n, len(columns)) float32, attr[:, columns].
    """
    n = len(attr)
    top = np.empty(n, np.int64)
    scores = np.empty((n, len(columns)), np.float32)
    for start, block in iter_blocks(attr, rows):
        top[start:start + len(block)] = block.argmax(axis=1)
        scores[start:start + len(block)] = block[:, list(columns)]
    return top, scores


def class_rows(top: np.ndarray, score: np.ndarray, c: int, n_top: int) -> np.ndarray:
    """The samples of a class atlas: those whose top class is c, plus the n_top samples with the
    largest positive attribution to c (ties: the lower row first).

    Args:
        top: (n,) int, each sample's top attributed class.
        score: (n,) float, each sample's attribution to c.
        c: the class.
        n_top: how many of the most attributed samples to add, >= 0.

    Returns:
        Sorted unique int64 row indices.
    """
    score = np.asarray(score, dtype=np.float64)
    ranked = np.lexsort((np.arange(len(score)), -score))[:n_top]
    ranked = ranked[score[ranked] > 0]  # a sample that argues against c does not belong to its atlas
    return np.union1d(np.flatnonzero(np.asarray(top) == c), ranked).astype(np.int64)


def class_threshold(score: np.ndarray, n_top: int) -> float:
    """The smallest attribution among the n_top samples `class_rows` adds for being most attributed
    to the class (inf when it adds none): a new sample with at least this much attribution, or whose
    top class is the class, belongs to the class atlas (atlas.place)."""
    score = np.asarray(score, dtype=np.float64)
    ranked = np.sort(score[score > 0])[::-1][:n_top]
    return float(ranked[-1]) if len(ranked) else float("inf")


def pair_scale(diff: np.ndarray, percentile: float = PAIR_PERCENTILE) -> float:
    """The percentile of |diff| that `pair_axis` divides by (0 when there is no difference)."""
    diff = np.asarray(diff, dtype=np.float64)
    return float(np.percentile(np.abs(diff), percentile)) if len(diff) else 0.0


def pair_axis(diff: np.ndarray, percentile: float = PAIR_PERCENTILE, scale: float | None = None) -> np.ndarray:
    """The two-class view's x: diff / (the percentile of |diff|), clipped to [-1, 1], mapped to [0, 1].

    Args:
        diff: (n,) attr[b] - attr[a] of each sample.
        scale: divide by this instead (the view's own `pair_scale`, to place new samples on it).

    Returns:
        (n,) float32 in [0, 1]; 0.5 where there is no difference (and everywhere if the scale is 0).
    """
    diff = np.asarray(diff, dtype=np.float64)
    scale = pair_scale(diff, percentile) if scale is None else float(scale)
    x = np.clip(diff / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(diff)
    return ((x + 1.0) / 2.0).astype(np.float32)
