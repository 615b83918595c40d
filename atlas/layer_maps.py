"""How a layer's output becomes a (C, H, W) map: channels first, channels last, or tokens.

Every stage works on (B, C, H, W) maps: positions are sampled on them, attribution pushes tangents
through them, icons are optimised at their centre. Convolutional layers give such maps; Swin's
stages and ConvNeXt's inner LayerNorms give (B, H, W, C); a vision transformer's blocks give
(B, T, C) tokens: `prefix` class/register tokens followed by an H x W grid of patch tokens in row
order. A `LayerMap` says which, and `to_map` / `from_map` turn the output into a map and back, so
the network can be cut at the map (`layers.LayerTap`) and run on from it.

Prefix tokens are kept aside, not sampled: they have no position in the image (the class token
pools the whole image), so they cannot be binned with patch tokens or cut as patches. The rest of
the network still receives them unchanged, so logits and attribution are the model's own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .config import LAYOUTS
from .errors import AtlasError
MAX_GUESSED_PREFIX = 16  # at most this many prefix tokens are inferred from a token count alone


@dataclasses.dataclass(frozen=True)
class LayerMap:
    """How one layer's output (without the batch dimension) reads as a (C, H, W) map.

    layout: "nchw" (C, H, W) as it is; "nhwc" (H, W, C) permuted; "tokens" (T, C) with `prefix`
        leading tokens kept aside and the other T - prefix reshaped to the `grid` (H, W) in row order.
    prefix: leading non-patch tokens (class, distillation, register tokens); tokens only.
    grid: (H, W) of the patch grid at the size it was resolved for; tokens only. Another input
        size gives another count of tokens: `to_map` then takes the square grid that fits.
    source: where prefix and grid came from ("model", "config", "guessed"), for `atlas layers`.
    """

    layout: str = "nchw"
    prefix: int = 0
    grid: tuple[int, int] | None = None
    source: str = ""

    def describe(self) -> str:
        """A short human description, e.g. "tokens 14x14 + 1 prefix (model)"."""
        if self.layout != "tokens":
            return self.layout
        grid = f"{self.grid[0]}x{self.grid[1]}" if self.grid else "?"
        note = f" ({self.source})" if self.source else ""
        return f"tokens {grid} + {self.prefix} prefix{note}"

    def map_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """The (C, H, W) map of an output of `shape` (without batch)."""
        if self.layout == "nchw":
            c, h, w = shape
            return int(c), int(h), int(w)
        if self.layout == "nhwc":
            h, w, c = shape
            return int(c), int(h), int(w)
        t, c = shape
        gh, gw = token_grid(int(t) - self.prefix, self.grid)
        return int(c), gh, gw

    def to_json(self) -> dict[str, Any]:
        return {"layout": self.layout, "prefix": self.prefix, "grid": list(self.grid) if self.grid else None}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> "LayerMap":
        grid = value.get("grid")
        return cls(str(value["layout"]), int(value.get("prefix", 0)), tuple(int(v) for v in grid) if grid else None)


NCHW = LayerMap()


def token_grid(n: int, hint: tuple[int, int] | None) -> tuple[int, int]:
    """The (H, W) patch grid of n patch tokens: `hint` when it holds n tokens, else the square one."""
    if hint is not None and hint[0] * hint[1] == n:
        return int(hint[0]), int(hint[1])
    side = math.isqrt(max(n, 0))
    if n > 0 and side * side == n:
        return side, side
    raise ValueError(f"{n} patch tokens do not form a square grid")


def to_map(x: torch.Tensor, layout: str, prefix: int, grid: tuple[int, int] | None) -> torch.Tensor:
    """A layer's output (B, ...) -> its (B, C, H, W) map (a view where the layout allows)."""
    if layout == "nhwc":
        return x.permute(0, 3, 1, 2)
    if layout == "tokens":
        b, t, c = x.shape
        try:
            gh, gw = token_grid(t - prefix, grid)
        except ValueError:
            raise AtlasError(f"{t - prefix} patch tokens (of {t}, {prefix} prefix) do not form a square grid at this "
                             "input size; give the model a square input") from None
        return x[:, prefix:].transpose(1, 2).reshape(b, c, gh, gw)
    return x


def prefix_of(x: torch.Tensor, prefix: int) -> torch.Tensor:
    """The (B, prefix, C) leading tokens of a (B, T, C) token output."""
    return x[:, :prefix]


def from_map(h: torch.Tensor, prefix: torch.Tensor | None, layout: str) -> torch.Tensor:
    """The inverse of `to_map`: a (B, C, H, W) map (and the prefix tokens) -> the layer's output."""
    if layout == "nhwc":
        return h.permute(0, 2, 3, 1)
    if layout == "tokens":
        tokens = h.flatten(2).transpose(1, 2)
        return tokens if prefix is None else torch.cat([prefix, tokens], dim=1)
    return h


def model_token_hints(model: nn.Module) -> tuple[int | None, tuple[int, int] | None]:
    """(prefix tokens, patch grid) as the model declares them, None where it does not.

    Reads torchvision's VisionTransformer (`class_token`, `image_size`, `patch_size`) and timm's
    convention (`num_prefix_tokens`, `patch_embed.grid_size`).
    """
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None and isinstance(getattr(model, "class_token", None), torch.Tensor):
        prefix = int(model.class_token.shape[1]) if model.class_token.dim() == 3 else 1
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None and isinstance(getattr(model, "image_size", None), int) \
            and isinstance(getattr(model, "patch_size", None), int):
        grid = (model.image_size // model.patch_size,) * 2
    if grid is not None:
        grid = tuple(int(v) for v in grid)
    return (int(prefix) if prefix is not None else None), grid


def choose_map(layer: str, shape: Sequence[int] | None, *, layout: str = "auto", prefix: int | str = "auto",
               hints: tuple[int | None, tuple[int, int] | None] = (None, None)) -> LayerMap:
    """The LayerMap of a layer whose output has `shape` (without batch), for a square input.

    Args:
        layer: the layer's name, for messages.
        shape: its output shape at the model's input size; None if it gave no tensor.
        layout: "auto" (from the shape: 2 dims are tokens, 3 dims are channels-last when the first
            two are equal and the last differs, else channels-first) or one of LAYOUTS.
        prefix: leading non-patch tokens, or "auto": the model's declaration, else the fewest
            (at most MAX_GUESSED_PREFIX) that leave a square grid.
        hints: `model_token_hints(model)`.

    Raises:
        AtlasError: one line naming the shape when no (C, H, W) map can be read from it.
    """
    if shape is None:
        raise AtlasError(f"layer {layer!r} does not output a tensor; pick another layer from `atlas layers`")
    shape = tuple(int(v) for v in shape)
    if len(shape) < 2:
        raise AtlasError(f"layer {layer!r} outputs shape {shape}, a vector with no positions, not a feature map; "
                         "pick a layer with a spatial or token output from `atlas layers`")
    fix = ("set collect.layout to \"nchw\", \"nhwc\" or \"tokens\" (or a table of layer = layout), or pick "
           "another layer from `atlas layers`")
    if layout == "auto":
        if len(shape) == 2:
            layout = "tokens"
        elif len(shape) == 3:
            layout = "nhwc" if shape[0] == shape[1] != shape[2] else "nchw"
        else:
            raise AtlasError(f"layer {layer!r} outputs shape {shape}, which is not a (C, H, W), (H, W, C) or "
                             f"(tokens, C) map; {fix}")
    if layout not in LAYOUTS:
        raise AtlasError(f"collect.layout of layer {layer!r} must be \"auto\", {', '.join(map(repr, LAYOUTS))}; "
                         f"got {layout!r}")
    if layout == "tokens":
        return _token_map(layer, shape, prefix, hints)
    if len(shape) != 3:
        raise AtlasError(f"layer {layer!r} outputs shape {shape}, which collect.layout = {layout!r} cannot read as "
                         f"a map ({'C, H, W' if layout == 'nchw' else 'H, W, C'}); {fix}")
    chosen = LayerMap(layout)
    _, h, w = chosen.map_shape(shape)
    other = "nhwc" if layout == "nchw" else "nchw"
    _, oh, ow = LayerMap(other).map_shape(shape)
    if h != w and oh == ow:
        raise AtlasError(f"collect.layout = {layout!r} reads layer {layer!r}'s output {shape} as a {h}x{w} map of a "
                         f"square input; it is probably \"{other}\"; {fix}")
    return chosen


def _token_map(layer: str, shape: tuple[int, ...], prefix: int | str,
               hints: tuple[int | None, tuple[int, int] | None]) -> LayerMap:
    if len(shape) != 2:
        raise AtlasError(f"layer {layer!r} outputs shape {shape}, which collect.layout = \"tokens\" cannot read as "
                         "(tokens, C); set collect.layout to \"nchw\" or \"nhwc\" for it")
    t = shape[0]
    hint_prefix, grid = hints
    if prefix != "auto":
        source, options = "config", [int(prefix)]
    elif hint_prefix is not None:  # before the class token is added (timm's patch_embed) there is none
        source, options = "model", list(dict.fromkeys([hint_prefix, 0]))
    else:
        source, options = "guessed", list(range(min(MAX_GUESSED_PREFIX, t - 1) + 1))
    for p in options:
        try:
            found = token_grid(t - p, grid)
        except ValueError:
            continue
        return LayerMap("tokens", p, found, source)
    tried = f"0 to {options[-1]}" if source == "guessed" else " or ".join(map(str, options))
    raise AtlasError(f"layer {layer!r} outputs {t} tokens of width {shape[1]}, and {t} minus {tried} prefix tokens "
                     "is no square patch grid; set collect.prefix_tokens to its count of class/register tokens")


def resolve_maps(model: nn.Module, shapes: Mapping[str, Sequence[int]], layers: Sequence[str],
                 layout: str | Mapping[str, str] = "auto", prefix: int | str = "auto") -> dict[str, LayerMap]:
    """Each layer's LayerMap from its output shape at the model's input size.

    Args:
        model: the network (its token declarations are read, see `model_token_hints`).
        shapes: layer -> output shape without batch (`layers.layer_shapes`).
        layers: the layers to resolve.
        layout: one layout for every layer, or a table layer -> layout (others "auto").
        prefix: see `choose_map`.
    """
    hints = model_token_hints(model)
    if isinstance(layout, Mapping):
        unknown = sorted(set(layout) - set(layers))
        if unknown:
            raise AtlasError(f"collect.layout names {', '.join(map(repr, unknown))}, which is not in layers; "
                             "name layers of the run")
    return {layer: choose_map(layer, shapes.get(layer), prefix=prefix, hints=hints,
                              layout=layout.get(layer, "auto") if isinstance(layout, Mapping) else layout)
            for layer in layers}


def maps_to_json(maps: Mapping[str, LayerMap]) -> dict[str, Any]:
    return {layer: m.to_json() for layer, m in maps.items()}


def maps_from_json(value: Mapping[str, Any] | None, layers: Sequence[str]) -> dict[str, LayerMap]:
    """The recorded maps; layers without a record are channels-first (runs from before layouts)."""
    value = value or {}
    return {layer: LayerMap.from_json(value[layer]) if layer in value else NCHW for layer in layers}
