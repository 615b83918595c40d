"""Class names of a classifier's outputs, with lookup by WordNet id or name."""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass, field
from importlib import resources

from ..errors import AtlasError


def _normalise_key(key: str) -> str:
    """Case-folded, underscores as spaces, runs of spaces collapsed: 'Great_White  shark' -> 'great white shark'."""
    return " ".join(key.replace("_", " ").split()).casefold()


@dataclass(frozen=True)
class ClassNames:
    """Names of a classifier's outputs.

    Args:
        names: index -> human-readable name (ImageNet has two 'crane's and two 'maillot's).
        wnids: index -> WordNet id (`n01440764`) for ImageNet, else None.
    """

    names: tuple[str, ...]
    wnids: tuple[str, ...] | None = None
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        if self.wnids is not None:
            object.__setattr__(self, "wnids", tuple(self.wnids))
            if len(self.wnids) != len(self.names):
                raise ValueError(f"{len(self.wnids)} wnids for {len(self.names)} class names")
        index: dict[str, int] = {}
        # Reversed so that a name shared by two classes maps to the lower index.
        for i in reversed(range(len(self.names))):
            index[_normalise_key(self.names[i])] = i
        for i, wnid in enumerate(self.wnids or ()):
            index[_normalise_key(wnid)] = i
        object.__setattr__(self, "_index", index)

    def lookup(self, key: str) -> int | None:
        """Index of a class given its wnid or name, or None if there is no such class.

        Case does not matter and underscores stand for spaces ('Great_White_Shark' -> 2). A
        name shared by two classes gives the lower index; use the wnid to pick the other.
        """
        return self._index.get(_normalise_key(key))

    def __len__(self) -> int:
        return len(self.names)


@functools.cache
def imagenet_classes() -> ClassNames:
    """The 1000 ImageNet classes in the standard (sorted wnid) order, from the packaged TSV."""
    try:
        text = resources.files("atlas").joinpath("data/imagenet_classes.tsv").read_text(encoding="utf-8")
    except OSError as exc:
        raise AtlasError(f"the packaged ImageNet class list is missing ({exc}); reinstall atlas") from None
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
    rows.sort(key=lambda row: int(row["index"]))
    if [int(row["index"]) for row in rows] != list(range(1000)):
        raise AtlasError("the packaged ImageNet class list is damaged (expected indices 0-999); reinstall atlas")
    return ClassNames(names=tuple(row["name"] for row in rows), wnids=tuple(row["wnid"] for row in rows))
