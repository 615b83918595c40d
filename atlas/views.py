"""Single-unit views: feature visualisation, DeepDream, feature maps and first-layer filters.

Four subcommands, each writing one PNG (atomically) and printing one line:

    atlas vis MODEL --layer L --channel K    a channel's (mean over positions) or, with --class NAME,
                                             a class logit's feature visualisation (optvis engine)
    atlas dream IMAGE --layer L [--channel K]  multi-octave DeepDream on a photo
    atlas maps IMAGE --layer L               one input's feature maps at a layer, as a labelled grid
    atlas filters MODEL                      the first RGB convolution's filters as colour tiles

The pure cores (`visualize`, `deep_dream`, `feature_maps`, `pick_channels`, `maps_grid`,
`first_rgb_conv`, `filter_tiles`, `tile_grid`) take and return tensors or arrays; the commands
(`vis`, `dream`, `maps`, `filters`) load the model and image, call a core and save; atlas.cli
parses their arguments.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from .corpus import BadImage, load_image
from .errors import AtlasError
from .layer_maps import LayerMap
from .layers import check_layers, map_shapes
from .models import fixed_input_size, load_model
from .models.zoo import OFFLINE_DEFAULT
from .draw import font
from .optvis import (Network, Objective, class_logit, fourier_image, frozen, make_generators,
                     optimize, standard_transforms)
from .optvis import channel as channel_objective
from .runtime import keep_freed_memory, pick_device
from .store import write_image

__all__ = ["deep_dream", "dream", "feature_maps", "filter_tiles", "filters", "first_rgb_conv", "maps", "maps_grid",
           "pick_channels", "tile_grid", "vis", "visualize"]

BACKGROUND = 255  # gap and margin colour of every grid (white)
TEXT = (0, 0, 160)  # labels and titles: dark blue, so no text pixel is gray like a feature map


# ---------------------------------------------------------------------------------------------
# vis: feature visualisation of a channel or a class logit


def visualize(model: nn.Module, objective: Objective, *, size: int = 128, steps: int = 256, seed: int = 0,
              normalise=None, maps: dict[str, LayerMap] | None = None, device: torch.device | str = "cpu"):
    """Optimises one image to maximise `objective` (Fourier parameterisation, standard transforms).

    Args:
        model: the network, on `device`; its mode and parameter gradients are put back after.
        objective: e.g. `optvis.channel("blocks.10", 3)` or `optvis.class_logit(1)`.
        size: side of the image, pixels; default 128.
        steps: Adam steps; default 256.
        seed: seeds the initial spectrum and the transforms; default 0.
        normalise: [0, 1] pixels -> model input (e.g. `preprocess.normalise`); default identity.
        maps: how channels-last or token layers read as maps (`atlas.layer_maps`); default
            channels-first.

    Returns:
        An `optvis.Visualization`: `.images` (1, 3, size, size) in [0, 1], `.history` (steps,).
    """
    generators = make_generators([seed])
    network = Network.for_objective(model, objective, normalise=normalise, maps=maps)
    image = fourier_image(size, generators, device=device)
    return optimize(network, objective, image, generators=generators, transform=standard_transforms(size),
                    steps=steps)


def resolve_class(classes, key: str) -> int:
    """Index of class `key` (name, wnid or index); AtlasError suggesting close names if unknown."""
    if classes is not None:
        index = classes.lookup(key)
        if index is not None:
            return index
    if key.strip().isdigit():
        index = int(key)
        if classes is None or index < len(classes):
            return index
        raise AtlasError(f"class index {index} is out of range; "
                         f"the model has {len(classes)} classes (0-{len(classes) - 1})")
    if classes is None:
        raise AtlasError(f"the model's class names are unknown; give --class as an output index, not {key!r}")
    names = sorted(set(classes.names))
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    raise AtlasError(f"unknown class {key!r}; {hint}give an ImageNet class name (e.g. 'goldfish') or wnid (n01443537)")


def _layer_map(model: nn.Module, input_shape: Sequence[int], layer: str, model_name: str) -> tuple[LayerMap, int]:
    """How the layer's output reads as a (C, H, W) map (channels first, last, or tokens), and C."""
    maps, shapes = map_shapes(model, input_shape, [layer], model_name=model_name)
    return maps[layer], shapes[layer][0]


def _check_channel(model: nn.Module, input_shape: Sequence[int], layer: str, index: int,
                   model_name: str = "MODEL") -> LayerMap:
    """The layer's map, after checking that `index` is one of its channels (AtlasError if not)."""
    layer_map, count = _layer_map(model, input_shape, layer, model_name)
    if not 0 <= index < count:
        raise AtlasError(f"channel {index} is out of range for layer {layer!r}, "
                         f"which has {count} channels (0-{count - 1})")
    return layer_map


# ---------------------------------------------------------------------------------------------
# dream: multi-octave DeepDream


def dream_objective(layer: str, channel_index: int | None = None) -> Objective:
    """L2 norm of the layer's activations per image, or with a channel that channel's mean."""
    if channel_index is not None:
        return channel_objective(layer, channel_index)
    return Objective(lambda acts: acts[layer].flatten(1).norm(dim=1), [layer], f"L2 norm {layer}")


def deep_dream(model: nn.Module, pixels: torch.Tensor, objective: Objective, *, octaves: int = 3,
               octave_scale: float = 1.4, steps: int = 10, lr: float = 0.02, jitter_px: int = 32,
               normalise=None, generator: torch.Generator | None = None,
               maps: dict[str, LayerMap] | None = None) -> torch.Tensor:
    """DeepDream: gradient ascent on `objective` w.r.t. the pixels over an image pyramid.

    From the coarsest level to the full size: the level's image plus the detail dreamed so far
    (upsampled), `steps` normalised gradient steps each on a randomly rolled copy (the roll hides
    the grid of strided convolutions), then the new detail is the dreamed image minus the level's
    image. Pixels stay in [0, 1].

    Args:
        model: the network, on the pixels' device (gradients flow to the image only).
        pixels: (3, H, W) float32 in [0, 1].
        objective: one value per image, e.g. `dream_objective("blocks.5")`.
        octaves: pyramid levels, >= 1; default 3.
        octave_scale: side ratio between levels, > 1; default 1.4.
        steps: gradient steps per level; default 10.
        lr: step size in pixel units for a gradient of mean absolute value 1; default 0.02.
        jitter_px: largest roll, pixels (capped at a quarter of the level's side); default 32.
        normalise: [0, 1] pixels -> model input; default identity.
        generator: the rolls' random source; default a fresh one seeded 0.
        maps: how channels-last layers read as maps (`atlas.layer_maps`); default channels-first.

    Returns:
        (3, H, W) float32 in [0, 1], detached.
    """
    if octaves < 1 or octave_scale <= 1:
        raise ValueError(f"need octaves >= 1 and octave_scale > 1, got {octaves} and {octave_scale}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    network = Network.for_objective(model, objective, normalise=normalise, maps=maps)
    base = pixels.detach().float().unsqueeze(0)
    pyramid = [base]
    for _ in range(octaves - 1):
        h, w = pyramid[-1].shape[-2:]
        pyramid.append(F.interpolate(pyramid[-1], size=(max(1, round(h / octave_scale)),
                                                        max(1, round(w / octave_scale))),
                                     mode="bilinear", align_corners=False, antialias=True))
    detail = torch.zeros_like(pyramid[-1])
    image = base
    with frozen(network.model), torch.enable_grad():
        for level in reversed(pyramid):
            detail = F.interpolate(detail, size=level.shape[-2:], mode="bilinear", align_corners=False)
            image = (level + detail).clamp(0, 1)
            limit = min(jitter_px, min(level.shape[-2:]) // 4)
            for _ in range(steps):
                dy, dx = (torch.randint(-limit, limit + 1, (2,), generator=generator).tolist()
                          if limit > 0 else (0, 0))
                rolled = image.roll((dy, dx), dims=(2, 3)).requires_grad_(True)
                value = objective(network(rolled)).sum()
                (grad,) = torch.autograd.grad(value, rolled)
                grad = grad.roll((-dy, -dx), dims=(2, 3))
                # Normalised steps: the same step size works at every layer and every level.
                image = (image + lr * grad / grad.abs().mean().clamp_min(1e-8)).clamp(0, 1).detach()
            detail = image - level
    return image[0].detach()


# ---------------------------------------------------------------------------------------------
# maps: one input's feature maps as a labelled grid


@torch.no_grad()
def feature_maps(model: nn.Module, x: torch.Tensor, layer: str, layer_map: LayerMap | None = None) -> np.ndarray:
    """(3, H, W) network input -> (C, h, w) float32 activations of `layer` (read as a map by
    `layer_map`, default channels-first)."""
    network = Network(model, [layer], maps={layer: layer_map} if layer_map is not None else None)
    with frozen(model):
        h = network(x.unsqueeze(0))[layer]
    if h.dim() != 4:
        raise AtlasError(f"layer {layer!r} gives shape {tuple(h.shape[1:])}, not a (C, H, W) feature map; "
                         "pick a convolutional layer")
    return h[0].float().cpu().numpy()


def pick_channels(maps: np.ndarray, n: int, sort: str = "mean") -> np.ndarray:
    """Indices of the channels to show: the first n ("index") or the n largest means ("mean")."""
    n = min(n, maps.shape[0])
    if sort == "index":
        return np.arange(n)
    if sort == "mean":
        # stable, so equal means keep channel order
        return np.argsort(-maps.reshape(maps.shape[0], -1).mean(axis=1), kind="stable")[:n]
    raise ValueError(f"sort must be 'mean' or 'index', got {sort!r}")


def normalise_maps(maps: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (C, h, w) float32 in [0, 1], each channel from its own min to max (flat -> 0)."""
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1), 0).astype(np.float32)


def maps_grid(maps: np.ndarray, indices: Sequence[int], title: str, *, tile_px: int = 64,
              gap: int = 4) -> Image.Image:
    """Grayscale tiles of the chosen channels, each labelled with its channel number, under a title.

    Args:
        maps: (C, h, w) float activations.
        indices: channels to show, in order.
        title: written above the grid.
        tile_px: smallest tile side; maps are upscaled with nearest by a whole factor to reach it.

    Returns:
        An RGB image.
    """
    tiles = normalise_maps(maps[np.asarray(indices, dtype=int)])
    factor = max(1, math.ceil(tile_px / max(maps.shape[1:])))
    tiles = tiles.repeat(factor, axis=1).repeat(factor, axis=2)
    tiles = np.repeat((tiles * 255).round().astype(np.uint8)[..., None], 3, axis=-1)
    label_px = 12
    body = tile_grid(tiles, gap=gap, label_px=label_px + 2)
    title_px = 16
    canvas = Image.new("RGB", (max(body.shape[1], 8 * len(title) + 2 * gap), body.shape[0] + title_px + gap),
                       (BACKGROUND,) * 3)
    canvas.paste(Image.fromarray(body), (0, title_px + gap))
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, gap // 2), title, fill=TEXT, font=font(title_px - 2))
    cols = _columns(len(tiles))
    th, tw = tiles.shape[1:3]
    for i, channel_index in enumerate(indices):
        row, col = divmod(i, cols)
        x = gap + col * (tw + gap)
        y = title_px + gap + gap + row * (th + gap + label_px + 2) + th
        draw.text((x, y), f"{int(channel_index)}", fill=TEXT, font=font(label_px))
    return canvas


# ---------------------------------------------------------------------------------------------
# filters: the first RGB convolution's kernels


def first_rgb_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first nn.Conv2d with 3 input channels in `named_modules` order; AtlasError if none."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            return name, module
    raise AtlasError("the model has no nn.Conv2d with 3 input channels, so there are no RGB filters to show")


def filter_tiles(weight: torch.Tensor | np.ndarray, tile_px: int = 32) -> np.ndarray:
    """(O, 3, k, k) weights -> (O, s, s, 3) uint8 tiles, s = k x ceil(tile_px / k).

    Each filter is scaled by its own largest |w| so that 0 is mid-gray (128): w / max|w| / 2 + 0.5.
    """
    w = torch.as_tensor(weight).detach().float().cpu().numpy()
    peak = np.abs(w).reshape(w.shape[0], -1).max(axis=1).reshape(-1, 1, 1, 1)
    w = w / np.where(peak > 0, peak, 1) / 2 + 0.5
    factor = max(1, math.ceil(tile_px / max(w.shape[2:])))
    w = w.repeat(factor, axis=2).repeat(factor, axis=3).transpose(0, 2, 3, 1)
    return (w * 255).round().clip(0, 255).astype(np.uint8)


def tile_grid(tiles: np.ndarray, *, gap: int = 4, label_px: int = 0, columns: int | None = None) -> np.ndarray:
    """(N, h, w, 3) uint8 tiles -> (H, W, 3) uint8 grid, ~square, `gap` pixels of background around
    every tile and `label_px` more below each row (room for labels)."""
    n, h, w = tiles.shape[:3]
    cols = columns or _columns(n)
    rows = math.ceil(n / cols)
    grid = np.full((gap + rows * (h + gap + label_px), gap + cols * (w + gap), 3), BACKGROUND, np.uint8)
    for i, tile in enumerate(tiles):
        row, col = divmod(i, cols)
        y, x = gap + row * (h + gap + label_px), gap + col * (w + gap)
        grid[y:y + h, x:x + w] = tile
    return grid


def _columns(n: int) -> int:
    return max(1, math.ceil(math.sqrt(n)))


# ---------------------------------------------------------------------------------------------
# The commands: load, call a core, save, print one line


def vis(model: str, *, layer: str | None = None, channel: int | None = None, class_: str | None = None,
        size: int = 128, steps: int = 256, seed: int = 0, device: str = "auto", weights: str = "DEFAULT",
        out: str | None = None, log=print) -> Path:
    """`atlas vis`: writes a feature visualisation of a channel or a class logit; returns its path."""
    _check_positive(size=size, steps=steps)
    keep_freed_memory()
    torch_device = pick_device(device)
    loaded = load_model(model, weights)
    module = loaded.module.to(torch_device)
    if class_ is not None:
        if channel is not None:
            raise AtlasError("give either --channel (with --layer) or --class, not both")
        index = resolve_class(loaded.classes, class_)
        objective = class_logit(index)
        name = loaded.classes.names[index] if loaded.classes is not None else f"output {index}"
        what, stem = f"class {index} ({name})", f"class-{index}"
    else:
        if layer is None or channel is None:
            raise AtlasError("give --layer and --channel (a channel's visualisation) or --class NAME (a class logit's)")
        check_layers(module, [layer], model)
        layer_map = _check_channel(module, loaded.input_shape, layer, channel, model)
        objective = channel_objective(layer, channel)
        what, stem = f"{layer} channel {channel}", f"{layer}-{channel}"
    fixed = fixed_input_size(module)
    if fixed is not None and fixed != size:
        log(f"note: {model} takes {fixed} px inputs only; the visualisation is {fixed} px, not {size}")
        size = fixed
    result = visualize(module, objective, size=size, steps=steps, seed=seed, normalise=loaded.preprocess.normalise,
                       maps={layer: layer_map} if class_ is None else None, device=torch_device)
    path = Path(out or f"vis-{_slug(model)}-{_slug(stem)}.png")
    _save(result.images[0], path)
    history = result.history.cpu()
    log(f"wrote {path}: {model} {what}, {size}x{size} px, {steps} steps, "
        f"objective {history[0]:.3g} -> {history[-1]:.3g}")
    return path


def dream(image_path: str, *, layer: str, channel: int | None = None, model: str = OFFLINE_DEFAULT,
          octaves: int = 3, octave_scale: float = 1.4, steps: int = 10, lr: float = 0.02, size: int = 384,
          seed: int = 0, device: str = "auto", weights: str = "DEFAULT", out: str | None = None, log=print) -> Path:
    """`atlas dream`: writes a DeepDream of a photo at a layer (or one channel); returns its path."""
    _check_positive(size=size, steps=steps, octaves=octaves)
    if octave_scale <= 1:
        raise AtlasError(f"--octave-scale must be > 1, got {octave_scale}")
    keep_freed_memory()
    torch_device = pick_device(device)
    image = _load_photo(image_path)
    loaded = load_model(model, weights)
    module = loaded.module.to(torch_device)
    check_layers(module, [layer], model)
    if fixed_input_size(module) is not None:
        raise AtlasError(f"DeepDream runs a model on a photo's own size at several scales, and {model} takes "
                         f"{fixed_input_size(module)} px square inputs only; use a convolutional model")
    layer_map = (_check_channel(module, loaded.input_shape, layer, channel, model) if channel is not None
                 else _layer_map(module, loaded.input_shape, layer, model)[0])
    image = _resize_longer(image, size)
    pixels = _to_tensor(image).to(torch_device)
    dreamed = deep_dream(module, pixels, dream_objective(layer, channel), octaves=octaves, octave_scale=octave_scale,
                         steps=steps, lr=lr, normalise=loaded.preprocess.normalise,
                         generator=torch.Generator().manual_seed(seed), maps={layer: layer_map})
    suffix = f"-{channel}" if channel is not None else ""
    path = Path(out or f"dream-{_slug(Path(image_path).stem)}-{_slug(layer)}{suffix}.png")
    _save(dreamed, path)
    log(f"wrote {path}: DeepDream of {image_path} at {layer}{f' channel {channel}' if channel is not None else ''}, "
        f"{image.width}x{image.height} px, {octaves} octaves x {steps} steps")
    return path


def maps(image_path: str, *, layer: str, channels: int = 64, sort: str = "mean", model: str = OFFLINE_DEFAULT,
         device: str = "auto", weights: str = "DEFAULT", out: str | None = None, log=print) -> Path:
    """`atlas maps`: writes one image's feature maps at a layer as a labelled grid; returns its path."""
    _check_positive(channels=channels)
    torch_device = pick_device(device)
    image = _load_photo(image_path)
    loaded = load_model(model, weights)
    module = loaded.module.to(torch_device)
    layer_map, _ = _layer_map(module, loaded.input_shape, layer, model)
    values = feature_maps(module, loaded.preprocess(image).to(torch_device), layer, layer_map)
    indices = pick_channels(values, channels, sort)
    order = "largest mean" if sort == "mean" else "first"
    title = f"{layer} {tuple(values.shape)}: {len(indices)} {order} channels"
    path = Path(out or f"maps-{_slug(Path(image_path).stem)}-{_slug(layer)}.png")
    _save(maps_grid(values, indices, title), path)
    log(f"wrote {path}: {len(indices)} of {values.shape[0]} feature maps of {image_path} at {layer} "
        f"({values.shape[1]}x{values.shape[2]})")
    return path


def filters(model: str, *, weights: str = "DEFAULT", out: str | None = None, log=print) -> Path:
    """`atlas filters`: writes the first RGB convolution's filters as colour tiles; returns its path."""
    loaded = load_model(model, weights)
    name, conv = first_rgb_conv(loaded.module)
    path = Path(out or f"filters-{_slug(model)}.png")
    _save(tile_grid(filter_tiles(conv.weight)), path)
    k = conv.kernel_size
    log(f"wrote {path}: {conv.out_channels} filters {k[0]}x{k[1]} of {model} layer {name}")
    return path


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise AtlasError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def _load_photo(path: str) -> Image.Image:
    try:
        return load_image(path)
    except BadImage as exc:
        raise AtlasError(f"cannot read image {exc}") from None


def _resize_longer(image: Image.Image, side: int) -> Image.Image:
    """The image scaled so that its longer side is `side` pixels (aspect ratio kept)."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).float().div(255)


def _save(picture: torch.Tensor | np.ndarray | Image.Image, out: Path) -> None:
    """Writes a (3, H, W) [0, 1] tensor, an (H, W, 3) uint8 array or a PIL image, atomically, in the
    format --out names (PNG by default); an unknown suffix is an error, not a mislabelled PNG."""
    if isinstance(picture, torch.Tensor):
        picture = (picture.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    try:
        write_image(picture, out)
    except ValueError as exc:
        raise AtlasError(f"--out {out}: {exc}; use .png (or .jpg, .webp)") from None


def _slug(text: str) -> str:
    """A file-name-safe version of a model, layer or file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"
