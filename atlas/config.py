"""Run configuration: frozen dataclasses loaded from TOML, each checked when it is built.

A config has top-level `run_dir`, `images`, `model`, `weights`, `layers` (and an optional
`[preprocess]` table for models that need one) plus one table per stage. `--set key=value`
overrides any key; the effective config is written to `RUN/config.toml`, so a run directory can
stand in for the config file it was made from. Every dataclass checks its fields' types (as TOML
values are checked), ranges and cross-field rules in `__post_init__`, so a config built in Python
fails with the same one-line AtlasError as a file.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import sys
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config_tables import apply_overrides, dumps_toml, parse_override
from .errors import AtlasError
from .store.run import CONFIG as CONFIG_NAME

LAYOUTS = ("nchw", "nhwc", "tokens")  # the layouts of atlas.layer_maps (importing it would import torch)
METRICS = ("cosine", "euclidean", "correlation", "manhattan", "chebyshev", "braycurtis", "canberra")  # UMAP metrics offered
LAYOUT_BACKENDS = ("umap-learn", "torchdr")  # the UMAP implementations of atlas.reducers
TORCHDR_METRICS = ("cosine", "correlation", "euclidean")  # the metrics the torchdr backend lays out (atlas.placement)
# The fields of models.zoo.Preprocess, which checks their values once the model's defaults are
# known; importing it here would make reading a config import torch.
_PREPROCESS_KEYS = ("size", "resize", "mean", "std", "interpolation")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise AtlasError(message)


def check_device(device: str, key: str) -> None:
    """AtlasError unless `device` is "auto", "cpu", "cuda" or "cuda:N" (key names the setting in the message)."""
    _check(device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device) is not None,
           f"{key} must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got {device!r}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_fields(obj: Any, prefix: str, **at_least: float) -> None:
    """Checks every field of a config dataclass against its type hint, then the lower bounds given."""
    for name, hint in _hints(type(obj)).items():
        object.__setattr__(obj, name, _coerce(getattr(obj, name), hint, prefix + name))  # frozen
    for name, low in at_least.items():
        _check(getattr(obj, name) >= low, f"{prefix}{name} must be >= {low}, got {getattr(obj, name)!r}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Checks a value against a field's type hint and converts it (lists to tuples, str to Path, tables to configs)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, key)
            except AtlasError:
                continue
    elif hint is bool or hint is str:
        if isinstance(value, hint):
            return value
    elif hint is int or hint is float:  # a float field takes an integer too; neither takes a bool
        if isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool):
            if math.isfinite(value):
                return hint(value)
    elif hint is Path:
        if isinstance(value, Path) or (isinstance(value, str) and value):
            return Path(value)
    elif origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, item, key) for v in value)
        return (_coerce(value, item, key),)  # a single value where a list is expected
    elif origin is Mapping or hint is Mapping:
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return dict(value)
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return _build(hint, value, key + ".")
    raise AtlasError(f"{key} = {value!r} has the wrong type; expected {_describe(hint)}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if hint is Path:
        return "a non-empty path string"
    if origin is Mapping or hint is Mapping or dataclasses.is_dataclass(hint):
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _unknown_key(key: str, known: Sequence[str]) -> AtlasError:
    close = difflib.get_close_matches(key.split(".")[-1], known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
    return AtlasError(f"unknown config key {key!r}{hint}")


def _build(cls: type, table: Mapping[str, Any], prefix: str) -> Any:
    """Builds a config dataclass from a raw TOML table, naming unknown and missing keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise _unknown_key(prefix + key, list(fields))
    missing = [name for name, f in fields.items()
               if name not in table and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    if missing:
        raise AtlasError(f"config is missing {', '.join(prefix + m for m in missing)}")
    return cls(**table)


@dataclasses.dataclass(frozen=True)
class CollectConfig:
    """How activations are sampled from the images (the `[collect]` table)."""

    samples_per_image: int | str = 16  # random positions per image and layer; "all" = every position inside the border
    border: int = 1  # positions closer than this to the map's edge are never sampled (the article avoids edges)
    batch_size: int = 32  # images per forward pass
    images_per_part: int = 256  # images per part, rounded up to whole batches: the unit of resume and of sharing work between processes
    workers: int = 1  # image-decoding worker processes; 0 decodes in the main process
    attribution: bool = True  # store each sample's attribution to every class (h . dlogit/dh)
    attribution_batch: int = 256  # (image, position) tangents pushed through the network at once; more is faster until memory runs out
    predict: bool = True  # run the network to the logits to store each image's top-1 prediction
    dtype: str = "float16"  # storage type of the activations: "float16" or "float32"
    seed: int = 0  # seeds the sampled positions; same seed, same file
    max_images: int = 0  # use only the first N images (sorted by path); 0 = all
    max_image_pixels: int = 89_478_485  # larger images are skipped as decompression bombs
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda", "cuda:N"
    threads: int = 0  # torch CPU threads; 0 = torch's default
    layout: str | Mapping[str, str] = "auto"  # how layer outputs read as maps: "auto", "nchw", "nhwc" (channels last), "tokens" (ViT), or a table layer = layout
    prefix_tokens: int | str = "auto"  # class/register tokens before a token layer's patch grid (kept aside, not sampled); "auto" = as the model declares

    def __post_init__(self) -> None:
        _check_fields(self, "collect.", border=0, batch_size=1, images_per_part=1, workers=0, attribution_batch=1, seed=0,
                      max_images=0, max_image_pixels=1, threads=0)
        spi = self.samples_per_image
        _check(spi == "all" or (isinstance(spi, int) and spi >= 1),
               f"collect.samples_per_image must be a positive integer or \"all\", got {spi!r}")
        _check(self.dtype in ("float16", "float32"),
               f"collect.dtype must be \"float16\" or \"float32\", got {self.dtype!r}")
        check_device(self.device, "collect.device")
        if isinstance(self.layout, Mapping):  # entries at "auto" say nothing: one config, one fingerprint
            table = {k: v for k, v in self.layout.items() if v != "auto"}
            object.__setattr__(self, "layout", table or "auto")
        layouts = self.layout.values() if isinstance(self.layout, Mapping) else [self.layout]
        for value in layouts:
            _check(value in ("auto", *LAYOUTS), "collect.layout must be \"auto\", \"nchw\", \"nhwc\" or \"tokens\" "
                   f"(or a table of layer = layout), got {value!r}")
        _check(self.prefix_tokens == "auto" or (isinstance(self.prefix_tokens, int) and self.prefix_tokens >= 0),
               f"collect.prefix_tokens must be \"auto\" or an integer >= 0, got {self.prefix_tokens!r}")


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """How the activations are laid out in 2-D (the `[layout]` table)."""

    n_neighbors: int = 20  # UMAP neighbourhood size (Lucid notebooks: 20, article: 50)
    min_dist: float = 0.01  # UMAP minimum distance (Lucid notebooks: 0.01, article: 0.05)
    metric: str = "cosine"  # UMAP metric
    pca_dims: int = 0  # reduce to this many dimensions with PCA first; 0 = no PCA
    fit_samples: int = 100_000  # fit UMAP on at most this many samples, place the rest with transform
    clip_percentile: float = 1.0  # clip each axis to [p, 100-p] percentiles before scaling
    margin: float = 0.1  # margin added around the clipped range before scaling to [0, 1]
    seed: int = 0  # seeds UMAP and the subsamples
    trust_samples: int = 2000  # samples used to report trustworthiness; 0 = skip it
    trust_neighbors: int = 10  # neighbourhood size of the trustworthiness score
    classes: tuple[str, ...] = ()  # a class atlas per class (name, wnid or output index): the samples ranking it first plus the class_top most attributed to it
    pairs: tuple[tuple[str, ...], ...] = ()  # two-class views [[a, b], ...]: x = attribution to b minus to a, y = a 1-D layout
    class_top: int = 2000  # samples most attributed to the class added to its class atlas (and to a pair's view)
    focus_layers: tuple[str, ...] = ()  # layers that get the class atlases and two-class views; empty = every layer
    backend: str = "umap-learn"  # "umap-learn" (numba, CPU) or "torchdr" (PyTorch UMAP on the CPU or a GPU; rest placed by nearest fit samples)
    device: str = "auto"  # torchdr's device: "auto" (cuda if present), "cpu", "cuda", "cuda:N"; umap-learn runs on the CPU
    align: bool = False  # move each layer's map onto the one before (rotation/mirror, scale, shift fitted on image centroids), so a region can be followed from layer to layer

    def __post_init__(self) -> None:
        _check_fields(self, "layout.", n_neighbors=2, min_dist=0, pca_dims=0, fit_samples=0, margin=0, seed=0,
                      trust_samples=0, trust_neighbors=1, class_top=0)
        close = difflib.get_close_matches(self.metric, METRICS, n=1)
        _check(self.metric in METRICS, f"layout.metric must be one of {', '.join(METRICS)}; got {self.metric!r}"
               + (f"; did you mean {close[0]!r}?" if close else ""))
        close = difflib.get_close_matches(self.backend, LAYOUT_BACKENDS, n=1)
        _check(self.backend in LAYOUT_BACKENDS, "layout.backend must be \"umap-learn\" or \"torchdr\"; got "
               f"{self.backend!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        check_device(self.device, "layout.device")
        _check(self.backend == "torchdr" or self.device in ("auto", "cpu"),
               f"layout.device = {self.device!r} needs layout.backend = \"torchdr\"; umap-learn runs on the CPU")
        _check(self.backend != "torchdr" or self.metric in TORCHDR_METRICS,
               f"layout.backend = \"torchdr\" lays out with the {', '.join(TORCHDR_METRICS)} metrics, not "
               f"{self.metric!r}; use one of those or layout.backend = \"umap-learn\"")
        _check(0 <= self.clip_percentile < 50, "layout.clip_percentile must be in [0, 50)")
        _check(all(self.classes), "layout.classes must list class names, wnids or output indices, e.g. [\"fireboat\"]")
        for pair in self.pairs:
            _check(len(pair) == 2 and all(pair), "layout.pairs: each entry must be two classes like "
                   f"[\"snorkel\", \"scuba diver\"], got {list(pair)}")
        _check(all(self.focus_layers), "layout.focus_layers must list layer names (entries of layers)")


@dataclasses.dataclass(frozen=True)
class GridConfig:
    """How the layout is binned into cells (the `[grid]` table)."""

    sizes: tuple[int, ...] = (10, 20, 40)  # N for each N x N grid (the article's zoom levels)
    min_count: int = 3  # cells with fewer samples are dropped
    whiten: bool = False  # also store directions whitened by inv(A^T A / n) (article: layers 4a-5b)
    whiten_eps: float = 1e-3  # ridge added to A^T A / n, relative to its mean diagonal
    top_classes: int = 5  # class labels stored per cell

    def __post_init__(self) -> None:
        _check_fields(self, "grid.", min_count=1, top_classes=1)
        _check(len(self.sizes) >= 1 and all(s >= 1 for s in self.sizes) and len(set(self.sizes)) == len(self.sizes),
               f"grid.sizes must be a non-empty list of distinct positive integers, e.g. [10, 20, 40]; "
               f"got {list(self.sizes)}")
        _check(self.whiten_eps > 0, "grid.whiten_eps must be > 0")


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """How each grid cell's icon is optimised (the `[render]` table)."""

    sizes: tuple[int, ...] = ()  # grid sizes to render icons for; empty = every size in grid.sizes
    sizes_for: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # per map (layer or focus-map name): its own list of sizes instead of render.sizes, e.g. {"blocks.10" = [10, 20]}
    icon_size: int = 0  # icon side in pixels (the article: 80); 0 = per layer, the smallest odd number (>= 5) of the layer's strides that is at least 64 px, so the icon's map has a true centre position (Lite0: blocks.4 72, blocks.10 80, blocks.15 160)
    icon_size_for: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # per layer or map: its own icon side, e.g. {"blocks.15" = 128}; overrides icon_size
    steps: int = 256  # optimisation steps per icon at most (the article: 512-1024); early stopping ends most icons sooner
    attempts: int = 1  # optimise this many candidates per cell and keep the best
    batch_size: int = 32  # icons optimised together; bigger is faster until memory runs out; 0 = auto (32 on the CPU, what fits in half the free memory on a GPU)
    lr: float = 0.05  # Adam learning rate (its peak, under a schedule)
    schedule: str = "constant"  # learning rate over the steps: "constant", or "cosine" (linear warm-up over render.warmup steps, then a half cosine down to 0 at the last step)
    warmup: int = 0  # with schedule = "cosine": warm-up steps (fewer than render.steps)
    stop_window: int = 32  # early stopping: an icon stops once its mean objective over the last stop_window steps rose less than stop_rise (relative) over the window before; 0 = every icon takes every step
    stop_rise: float = 0.01  # early stopping's threshold: relative rise per window (0.01 = 1%) below which an icon stops
    precision: str = "float32"  # "float32", or "bfloat16": the model runs under bf16 autocast (for GPUs with bf16 units; slower on a CPU)
    compile: bool = False  # run the model through torch.compile (a one-off compile per batch shape; pays on a GPU for long renders, slower on a CPU)
    cos_power: float = 3.0  # p in dot(h, v) * max(0.1, cos(h, v))^p (the article: 2-4)
    whiten: bool = False  # optimise towards the whitened direction (needs grid.whiten = true)
    decorrelate: bool = True  # decorrelated-colour Fourier parameterisation; false = plain pixels
    pad: int = 4  # pixels of constant padding before the random transforms
    jitter: int = 4  # random translation in pixels, before and after scaling/rotation
    scale: float = 0.1  # random scale factor drawn from [1 - scale, 1 + scale]
    rotate: float = 5.0  # random rotation in degrees drawn from [-rotate, rotate]
    seed: int = 0  # seeds every icon (each cell's icon depends only on the seed and the cell)
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda", "cuda:N"

    def __post_init__(self) -> None:
        _check_fields(self, "render.", icon_size=0, steps=1, attempts=1, batch_size=0, cos_power=0, pad=0, jitter=0,
                      rotate=0, seed=0, warmup=0, stop_window=0, stop_rise=0)
        _check(self.icon_size == 0 or self.icon_size >= 16,
               f"render.icon_size must be 0 (automatic, per layer) or >= 16 pixels, got {self.icon_size}")
        for name, side in self.icon_size_for.items():
            _check(isinstance(side, int) and not isinstance(side, bool) and side >= 16,
                   f"render.icon_size_for.{name} must be an icon side in pixels, >= 16, e.g. 96")
        _check(self.schedule in ("constant", "cosine"),
               f"render.schedule must be \"constant\" or \"cosine\", got {self.schedule!r}")
        _check(self.warmup < self.steps,
               f"render.warmup ({self.warmup}) must be fewer than render.steps ({self.steps})")
        _check(self.precision in ("float32", "bfloat16"),
               f"render.precision must be \"float32\" or \"bfloat16\", got {self.precision!r}")
        _check(all(s >= 1 for s in self.sizes),
               "render.sizes must list positive grid sizes (empty = all of grid.sizes)")
        for name, sizes in self.sizes_for.items():
            _check(isinstance(sizes, (list, tuple)) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                                            for s in sizes),
                   f"render.sizes_for.{name} must be a list of grid sizes, e.g. [10, 20]")
        object.__setattr__(self, "sizes_for", {name: tuple(sizes) for name, sizes in self.sizes_for.items()})
        object.__setattr__(self, "icon_size_for", dict(self.icon_size_for))
        _check(self.lr > 0, f"render.lr must be > 0, got {self.lr!r}")
        _check(self.pad >= self.jitter, f"render.pad ({self.pad}) must be >= render.jitter ({self.jitter}): "
               "the two random shifts crop 2 x jitter pixels that the padding has to give back")
        _check(0 <= self.scale < 1, f"render.scale must be in [0, 1), got {self.scale!r}")
        check_device(self.device, "render.device")

    def icon_size_of(self, name: str) -> int:
        """The icon side set for a map (`icon_size_for` by map name, then by its layer, else
        `icon_size`); 0 = automatic, from the layer's stride (atlas.render.auto_icon_size)."""
        return self.icon_size_for.get(name) or self.icon_size_for.get(_layer_of(name)) or self.icon_size

    def sizes_of(self, name: str, grid_sizes: Sequence[int]) -> tuple[int, ...]:
        """The grid sizes to render for one map (`sizes_for`, else `sizes`, else all of grid.sizes)."""
        return tuple(self.sizes_for.get(name, ()) or self.sizes or grid_sizes)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """How icons are laid out into the atlas image (the `[mosaic]` table)."""

    icon_px: int = 0  # pixels per cell in the atlas image (icons are resized to it); 0 = render.icon_size, or 64 when that is 0 (automatic, per layer)
    scale_by_density: bool = False  # draw sparse cells smaller (icon side grows with the cell's count)
    density_floor: float = 0.3  # with scale_by_density: icon side of a nearly empty cell, as a fraction of the cell
    labels: bool = False  # also write atlas-N-labels.png, atlas-preview-N-labels.png: top class printed on each cell
    preview: bool = True  # also write atlas-preview-N.png: each cell as the mean of its members' image patches
    preview_members: int = 16  # members averaged per preview tile: those most similar (cosine) to the cell's direction
    preview_patch: float = 2.0  # side of a member's image patch in map strides (input size / map size)

    def __post_init__(self) -> None:
        _check_fields(self, "mosaic.", icon_px=0, preview_members=1)
        _check(0 < self.density_floor <= 1, "mosaic.density_floor must be in (0, 1]")
        _check(self.preview_patch > 0, "mosaic.preview_patch must be > 0 (map strides)")


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment: a model, its layers, the images and every stage's settings."""

    run_dir: Path  # where every artifact of the run is written
    images: Path  # folder searched recursively for images
    model: str  # "efficientnet_lite0", a torchvision classifier name, or "package.module:factory"
    layers: tuple[str, ...]  # dotted named_modules() paths (see `atlas layers MODEL`)
    weights: str = "DEFAULT"  # "DEFAULT" (pretrained), "none" (random init) or a path to a state dict
    preprocess: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # overrides of the model's input preprocessing
    collect: CollectConfig = CollectConfig()
    layout: LayoutConfig = LayoutConfig()
    grid: GridConfig = GridConfig()
    render: RenderConfig = RenderConfig()
    mosaic: MosaicConfig = MosaicConfig()

    def __post_init__(self) -> None:
        _check_fields(self, "")
        _check(bool(self.model), "model must name a model: \"efficientnet_lite0\", a torchvision classifier "
               "or \"package.module:factory\"")
        _check(len(self.layers) >= 1, "layers must name at least one layer; `atlas layers MODEL` lists them")
        _check(all(self.layers), "layers must be dotted module paths like \"blocks.9\"; `atlas layers MODEL` lists them")
        twice = [name for i, name in enumerate(self.layers) if name in self.layers[:i]]
        if twice:
            raise AtlasError(f"layers lists {twice[0]!r} twice; list each layer once")
        _check(bool(self.weights), "weights must be \"DEFAULT\", \"none\" or the path of a state dict")
        for key in self.preprocess:
            if key not in _PREPROCESS_KEYS:
                raise _unknown_key(f"preprocess.{key}", _PREPROCESS_KEYS)
        self._check_across_tables()

    def _check_across_tables(self) -> None:
        grid_sizes, layers = list(self.grid.sizes), list(self.layers)
        missing = sorted({s for s in self.render.sizes if s not in grid_sizes})
        _check(not missing, f"render.sizes {missing} are not in grid.sizes {grid_sizes}; "
               "add them to grid.sizes or drop them from render.sizes")
        for name, sizes in self.render.sizes_for.items():
            missing = sorted({s for s in sizes if s not in grid_sizes})
            _check(not missing, f"render.sizes_for.{name} {missing} are not in grid.sizes {grid_sizes}; "
                   f"add them to grid.sizes or drop them from render.sizes_for.{name}")
        for name in self.render.icon_size_for:
            if _layer_of(name) not in layers:
                raise AtlasError(f"render.icon_size_for names {name!r}, whose layer is not in layers {layers}; "
                                 "name a layer or one of its focus maps")
        for name in self.render.sizes_for:
            if _layer_of(name) not in layers:
                raise AtlasError(f"render.sizes_for names {name!r}, whose layer is not in layers {layers}; "
                                 "name a layer or one of its focus maps, e.g. \"blocks.15/class-fireboat\"")
        for name in self.layout.focus_layers:
            if name not in layers:
                raise AtlasError(f"layout.focus_layers names {name!r}, which is not in layers {layers}; "
                                 "add it to layers or drop it from layout.focus_layers")
        _check(not self.render.whiten or self.grid.whiten,
               "render.whiten = true needs grid.whiten = true (the whitened directions come from the grid stage)")


def _layer_of(map_name: str) -> str:
    """The layer of a map name: "blocks.15/class-fireboat" -> "blocks.15"."""
    return map_name.split("/", 1)[0]


_STAGE_TABLES = {"collect": CollectConfig, "layout": LayoutConfig, "grid": GridConfig,
                 "render": RenderConfig, "mosaic": MosaicConfig}


def read_table(source: str | Path) -> tuple[dict[str, Any], Path]:
    """Reads the raw TOML table of a config file or of a run directory's config copy.

    Returns the table and the folder relative paths in it are resolved against (the current
    directory for a config file, as users type paths relative to where they run; none needed for
    a run directory, whose copy holds absolute paths).
    """
    path = Path(source)
    if path.is_dir():
        path = path / CONFIG_NAME
        if not path.is_file():
            raise AtlasError(f"{source} is a folder without {CONFIG_NAME}; pass a TOML config or a run directory")
    elif not path.is_file():
        raise AtlasError(f"config {source} does not exist; pass a TOML config file or a run directory")
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise AtlasError(f"config {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise AtlasError(f"cannot read config {path}: {exc.strerror}") from None
    return table, Path.cwd()


def _print_note(message: str) -> None:
    print(f"atlas: note: {message}", file=sys.stderr)


def load_config(source: str | Path, overrides: Sequence[str] = (),
                warn: Callable[[str], None] = _print_note) -> Config:
    """Loads, overrides and validates a config from a TOML file or a run directory.

    Args:
        source: a TOML config file, or a run directory (its config.toml).
        overrides: `key=value` strings, as `--set` takes them (the value is read as TOML, or as a
            plain string); e.g. ["collect.samples_per_image=8", 'layers=["blocks.10"]'].
        warn: receives one line naming the keys of the file that the overrides made stale and
            that were dropped (atlas.config_overrides); default: printed to stderr.

    Returns:
        The validated Config, with run_dir and images absolute (relative paths in a config file
        are resolved against the current directory).

    Raises:
        AtlasError: a missing or unreadable file, an unknown key, a bad value (one line each).
    """
    table, base = read_table(source)
    is_run = Path(source).is_dir()
    overridden = apply_overrides(table, overrides)
    from .config_overrides import drop_stale

    dropped = drop_stale(table, overridden, [".".join(parse_override(o)[0]) for o in overrides])
    if is_run and "run_dir" not in [o.split("=", 1)[0].strip() for o in overrides]:
        overridden["run_dir"] = str(Path(source))  # a moved run directory still finds itself
    config = _build(Config, overridden, "")
    if dropped:  # said only once the result is valid: a failed load changes nothing
        warn(f"dropped what the --set values made stale: {'; '.join(dropped)}")
    return dataclasses.replace(
        config,
        run_dir=(base / config.run_dir).resolve(),
        images=(base / config.images).resolve(),
        weights=_resolve_weights(config.weights, base),
    )


def _resolve_weights(weights: str, base: Path) -> str:
    if weights.lower() in ("default", "none") or not (weights.endswith((".pth", ".pt")) or "/" in weights):
        return weights
    return str((base / weights).resolve())


def config_table(config: Config) -> dict[str, Any]:
    """The config as a plain TOML-able table (paths as strings, tuples as lists)."""
    from .artifacts import to_jsonable

    return to_jsonable(config)


def save_config(config: Config) -> Path:
    """Writes the effective config to the run directory (atomically) and returns its path."""
    from .artifacts import atomic_path

    path = config.run_dir / CONFIG_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(dumps_toml(config_table(config)))
    return path
