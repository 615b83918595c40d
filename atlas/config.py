"""Run configuration: frozen dataclasses loaded from TOML, validated up front.

A config has top-level `run_dir`, `images`, `model`, `weights`, `layers` (and an optional
`[preprocess]` table for models that need one) plus one table per stage. `--set key=value`
overrides any key; the effective config is written to `RUN/config.toml`, so a run directory can
stand in for the config file it was made from.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import AtlasError

CONFIG_NAME = "config.toml"


@dataclasses.dataclass(frozen=True)
class CollectConfig:
    """How activations are sampled from the images (the `[collect]` table)."""

    samples_per_image: int | str = 16  # random positions per image and layer; "all" = every position inside the border
    border: int = 1  # positions closer than this to the map's edge are never sampled (the article avoids edges)
    batch_size: int = 32  # images per forward pass; also the unit of resume
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

    def validate(self) -> None:
        spi = self.samples_per_image
        if not (spi == "all" or (isinstance(spi, int) and spi >= 1)):
            raise AtlasError(f"collect.samples_per_image must be a positive integer or \"all\", got {spi!r}")
        _check(self.border >= 0, "collect.border must be >= 0")
        _check(self.batch_size >= 1, "collect.batch_size must be >= 1")
        _check(self.attribution_batch >= 1, "collect.attribution_batch must be >= 1")
        _check(self.workers >= 0, "collect.workers must be >= 0")
        _check(self.dtype in ("float16", "float32"), "collect.dtype must be \"float16\" or \"float32\"")
        _check(self.max_images >= 0, "collect.max_images must be >= 0 (0 = all)")
        _check(self.max_image_pixels >= 1, "collect.max_image_pixels must be >= 1")
        _check(self.threads >= 0, "collect.threads must be >= 0 (0 = torch's default)")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "collect.device must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"")


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

    def validate(self) -> None:
        _check(self.n_neighbors >= 2, "layout.n_neighbors must be >= 2")
        _check(self.min_dist >= 0, "layout.min_dist must be >= 0")
        metrics = ("cosine", "euclidean", "correlation", "manhattan", "chebyshev", "braycurtis", "canberra")
        _check(self.metric in metrics, f"layout.metric must be one of {', '.join(metrics)}; got {self.metric!r}")
        _check(self.pca_dims >= 0, "layout.pca_dims must be >= 0 (0 = no PCA)")
        _check(self.fit_samples >= 0, "layout.fit_samples must be >= 0 (0 = fit on all samples)")
        _check(0 <= self.clip_percentile < 50, "layout.clip_percentile must be in [0, 50)")
        _check(self.margin >= 0, "layout.margin must be >= 0")
        _check(self.trust_samples >= 0, "layout.trust_samples must be >= 0")
        _check(self.trust_neighbors >= 1, "layout.trust_neighbors must be >= 1")
        _check(self.class_top >= 0, "layout.class_top must be >= 0")
        for pair in self.pairs:
            _check(len(pair) == 2, f"layout.pairs: each entry must be two classes like [\"snorkel\", \"scuba diver\"], "
                   f"got {list(pair)}")


@dataclasses.dataclass(frozen=True)
class GridConfig:
    """How the layout is binned into cells (the `[grid]` table)."""

    sizes: tuple[int, ...] = (10, 20, 40)  # N for each N x N grid (the article's zoom levels)
    min_count: int = 3  # cells with fewer samples are dropped
    whiten: bool = False  # also store directions whitened by inv(A^T A / n) (article: layers 4a-5b)
    whiten_eps: float = 1e-3  # ridge added to A^T A / n, relative to its mean diagonal
    top_classes: int = 5  # class labels stored per cell

    def validate(self) -> None:
        _check(len(self.sizes) >= 1 and all(s >= 1 for s in self.sizes),
               "grid.sizes must be a non-empty list of positive integers, e.g. [10, 20, 40]")
        _check(self.min_count >= 1, "grid.min_count must be >= 1")
        _check(self.whiten_eps > 0, "grid.whiten_eps must be > 0")
        _check(self.top_classes >= 1, "grid.top_classes must be >= 1")


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """How each grid cell's icon is optimised (the `[render]` table)."""

    sizes: tuple[int, ...] = ()  # grid sizes to render icons for; empty = every size in grid.sizes
    sizes_for: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # per map (layer or focus-map name): its own list of sizes instead of render.sizes, e.g. {"blocks.10" = [10, 20]}
    icon_size: int = 64  # icon side in pixels (the article: 80)
    steps: int = 256  # optimisation steps per icon (the article: 512-1024)
    attempts: int = 1  # optimise this many candidates per cell and keep the best
    batch_size: int = 32  # icons optimised together; bigger is faster until memory runs out; 0 = auto (32 on the CPU, what fits in half the free memory on a GPU)
    lr: float = 0.05  # Adam learning rate
    cos_power: float = 3.0  # p in dot(h, v) * max(0.1, cos(h, v))^p (the article: 2-4)
    whiten: bool = False  # optimise towards the whitened direction (needs grid.whiten = true)
    decorrelate: bool = True  # decorrelated-colour Fourier parameterisation; false = plain pixels
    pad: int = 4  # pixels of constant padding before the random transforms
    jitter: int = 4  # random translation in pixels, before and after scaling/rotation
    scale: float = 0.1  # random scale factor drawn from [1 - scale, 1 + scale]
    rotate: float = 5.0  # random rotation in degrees drawn from [-rotate, rotate]
    seed: int = 0  # seeds every icon (each cell's icon depends only on the seed and the cell)
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda", "cuda:N"

    def validate(self) -> None:
        _check(all(s >= 1 for s in self.sizes), "render.sizes must list positive grid sizes")
        for name, sizes in self.sizes_for.items():
            _check(isinstance(sizes, (list, tuple)) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                                            for s in sizes),
                   f"render.sizes_for.{name} must be a list of grid sizes, e.g. [10, 20]")

    def sizes_of(self, name: str, grid_sizes: Sequence[int]) -> tuple[int, ...]:
        """The grid sizes to render for one map (`sizes_for`, else `sizes`, else all of grid.sizes)."""
        return tuple(self.sizes_for.get(name, ()) or self.sizes or grid_sizes)
        _check(self.icon_size >= 16, "render.icon_size must be >= 16 pixels")
        _check(self.steps >= 1, "render.steps must be >= 1")
        _check(self.attempts >= 1, "render.attempts must be >= 1")
        _check(self.batch_size >= 0, "render.batch_size must be >= 1, or 0 for a batch sized to the device")
        _check(self.lr > 0, "render.lr must be > 0")
        _check(self.cos_power >= 0, "render.cos_power must be >= 0")
        _check(self.pad >= 0 and self.jitter >= 0, "render.pad and render.jitter must be >= 0")
        _check(self.pad >= self.jitter, f"render.pad ({self.pad}) must be >= render.jitter ({self.jitter}): "
               "the two random shifts crop 2 x jitter pixels that the padding has to give back")
        _check(0 <= self.scale < 1, "render.scale must be in [0, 1)")
        _check(self.rotate >= 0, "render.rotate must be >= 0")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "render.device must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"")


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """How icons are laid out into the atlas image (the `[mosaic]` table)."""

    icon_px: int = 0  # pixels per cell in the atlas image; 0 = render.icon_size
    scale_by_density: bool = False  # draw sparse cells smaller (icon side grows with the cell's count)
    density_floor: float = 0.3  # with scale_by_density: icon side of a nearly empty cell, as a fraction of the cell
    labels: bool = False  # also write atlas-N-labels.png, atlas-preview-N-labels.png: top class printed on each cell
    preview: bool = True  # also write atlas-preview-N.png: each cell as the mean of its members' image patches
    preview_members: int = 16  # members averaged per preview tile: those most similar (cosine) to the cell's direction
    preview_patch: float = 2.0  # side of a member's image patch in map strides (input size / map size)

    def validate(self) -> None:
        _check(self.icon_px >= 0, "mosaic.icon_px must be >= 0 (0 = render.icon_size)")
        _check(0 < self.density_floor <= 1, "mosaic.density_floor must be in (0, 1]")
        _check(self.preview_members >= 1, "mosaic.preview_members must be >= 1")
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

    def validate(self) -> None:
        _check(len(self.layers) >= 1, "layers must name at least one layer; `atlas layers MODEL` lists them")
        _check(len(set(self.layers)) == len(self.layers), "layers lists a layer twice")
        for stage in (self.collect, self.layout, self.grid, self.render, self.mosaic):
            stage.validate()
        asked = list(self.render.sizes) + [s for sizes in self.render.sizes_for.values() for s in sizes]
        missing = sorted({s for s in asked if s not in self.grid.sizes})
        _check(not missing, f"render.sizes {missing} are not in grid.sizes {list(self.grid.sizes)}")
        stray = [name for name in self.layout.focus_layers if name not in self.layers]
        if stray:
            raise AtlasError(f"layout.focus_layers names {stray[0]!r}, which is not in layers {list(self.layers)}")
        _check(not self.render.whiten or self.grid.whiten,
               "render.whiten = true needs grid.whiten = true (the whitened directions come from the grid stage)")


_STAGE_TABLES = {"collect": CollectConfig, "layout": LayoutConfig, "grid": GridConfig,
                 "render": RenderConfig, "mosaic": MosaicConfig}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise AtlasError(message)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Checks a TOML value against a field's type hint and converts it (lists to tuples, str to Path)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, key)
            except AtlasError:
                continue
        raise AtlasError(f"{key} = {value!r} has the wrong type; expected {_describe(hint)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Path:
        if isinstance(value, str) and value:
            return Path(value)
    elif origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, item, key) for v in value)
        return (_coerce(value, item, key),)  # a single value where a list is expected
    elif origin in (Mapping, dict) or hint is Mapping:
        if isinstance(value, Mapping):
            return dict(value)
    raise AtlasError(f"{key} = {value!r} has the wrong type; expected {_describe(hint)}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if hint is Path:
        return "a path string"
    if origin in (Mapping, dict) or hint is Mapping:
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _unknown_key(key: str, known: Sequence[str]) -> AtlasError:
    close = difflib.get_close_matches(key.split(".")[-1], known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
    return AtlasError(f"unknown config key {key!r}{hint}")


def _build(cls: type, table: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        if key not in fields:
            raise _unknown_key(prefix + key, list(fields))
        if key in _STAGE_TABLES and cls is Config:
            if not isinstance(value, Mapping):
                raise AtlasError(f"[{key}] must be a table")
            kwargs[key] = _build(_STAGE_TABLES[key], value, key + ".")
        else:
            kwargs[key] = _coerce(value, hints[key], prefix + key)
    missing = [name for name, f in fields.items()
               if name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    if missing:
        raise AtlasError(f"config is missing {', '.join(prefix + m for m in missing)}")
    return cls(**kwargs)


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
    return key.split("."), value


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


def load_config(source: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Loads, overrides and validates a config from a TOML file or a run directory."""
    table, base = read_table(source)
    is_run = Path(source).is_dir()
    table = apply_overrides(table, overrides)
    if is_run and "run_dir" not in [o.split("=", 1)[0].strip() for o in overrides]:
        table["run_dir"] = str(Path(source))  # a moved run directory still finds itself
    config = _build(Config, table, "")
    config = dataclasses.replace(
        config,
        run_dir=(base / config.run_dir).resolve(),
        images=(base / config.images).resolve(),
        weights=_resolve_weights(config.weights, base),
    )
    config.validate()
    return config


def _resolve_weights(weights: str, base: Path) -> str:
    if weights.lower() in ("default", "none") or not (weights.endswith((".pth", ".pt")) or "/" in weights):
        return weights
    return str((base / weights).resolve())


def config_table(config: Config) -> dict[str, Any]:
    """The config as a plain TOML-able table (paths as strings, tuples as lists)."""
    from .artifacts import to_jsonable

    return to_jsonable(config)


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


def save_config(config: Config) -> Path:
    """Writes the effective config to RUN/config.toml (atomically) and returns its path."""
    from .artifacts import atomic_path

    path = config.run_dir / CONFIG_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(dumps_toml(config_table(config)))
    return path
