"""Random image transforms that make a visualisation robust (Lucid's transformation robustness).

A transform is a callable `t(images, generators) -> images` over a (B, C, H, W) batch; factories
below build them and `compose` chains them. Every random choice for image i is drawn from
`generators[i]`, one draw sequence per image, so an image's transforms do not depend on which
other images share its batch. All transforms are differentiable in the images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor, Sequence[torch.Generator]], torch.Tensor]


def uniform_rows(generators: Sequence[torch.Generator], n: int) -> torch.Tensor:
    """(B, n) float64 uniform [0, 1) draws on the CPU, row i from generators[i]."""
    return torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in generators])


def _check_batch(images: torch.Tensor, generators: Sequence[torch.Generator]) -> None:
    if images.dim() != 4 or len(generators) != images.shape[0]:
        raise ValueError(f"expected a (B, C, H, W) batch and B generators, got shape {tuple(images.shape)} "
                         f"and {len(generators)} generators")


def pad(width: int, *, mode: str = "constant", value: float = 0.5) -> Transform:
    """Pads every side by `width` pixels: mode "constant" (with `value`; 0.5 is mid grey),
    "reflect" or "replicate". Output (B, C, H + 2w, W + 2w); not random."""
    if width < 0:
        raise ValueError(f"pad width must be >= 0, got {width}")
    if mode not in ("constant", "reflect", "replicate"):
        raise ValueError(f"pad mode must be constant, reflect or replicate, got {mode!r}")

    def transform(images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        if width == 0:
            return images
        if mode == "constant":
            return F.pad(images, (width,) * 4, mode="constant", value=value)
        return F.pad(images, (width,) * 4, mode=mode)

    return transform


def jitter(d: int) -> Transform:
    """Crops each image to (H - d, W - d) at its own random offset in [0, d] on each axis: a
    random shift of up to d pixels."""
    if d < 0:
        raise ValueError(f"jitter must be >= 0 pixels, got {d}")

    def transform(images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        _check_batch(images, generators)
        if d == 0:
            return images
        b, _, height, width = images.shape
        if d >= min(height, width):
            raise ValueError(f"jitter({d}) needs images larger than {d} pixels, got {height}x{width}")
        offsets = (uniform_rows(generators, 2) * (d + 1)).floor().long().to(images.device)  # (B, 2) dy, dx
        rows = offsets[:, 0, None] + torch.arange(height - d, device=images.device)  # (B, H - d)
        cols = offsets[:, 1, None] + torch.arange(width - d, device=images.device)  # (B, W - d)
        batch = torch.arange(b, device=images.device)[:, None, None]
        # Advanced indexing gathers every image's window in one op: (B, H - d, W - d, C).
        return images.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    return transform


def _affine(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Resamples each image through its own (2, 3) affine map of output to input coordinates
    (normalised [-1, 1]); bilinear, borders replicated, same size out."""
    grid = F.affine_grid(matrices.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_scale(amount: float) -> Transform:
    """Zooms each image about its centre by its own factor drawn uniformly from
    [1 - amount, 1 + amount], keeping its size (zooming out repeats the border pixels)."""
    if not 0 <= amount < 1:
        raise ValueError(f"scale amount must be in [0, 1), got {amount}")

    def transform(images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        _check_batch(images, generators)
        if amount == 0:
            return images
        factor = 1 - amount + 2 * amount * uniform_rows(generators, 1)[:, 0]
        matrices = torch.zeros(len(factor), 2, 3, dtype=torch.float64)
        matrices[:, 0, 0] = matrices[:, 1, 1] = 1 / factor
        return _affine(images, matrices.to(images.device))

    return transform


def random_rotate(degrees: float) -> Transform:
    """Rotates each image about its centre by its own angle drawn uniformly from
    [-degrees, degrees], keeping its size (corners repeat the border pixels)."""
    if degrees < 0:
        raise ValueError(f"rotation must be >= 0 degrees, got {degrees}")

    def transform(images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        _check_batch(images, generators)
        if degrees == 0:
            return images
        angle = (2 * uniform_rows(generators, 1)[:, 0] - 1) * math.radians(degrees)
        cos, sin = torch.cos(angle), torch.sin(angle)
        height, width = images.shape[-2:]
        aspect = width / height  # normalised coordinates stretch non-square images
        matrices = torch.zeros(len(angle), 2, 3, dtype=torch.float64)
        matrices[:, 0, 0], matrices[:, 0, 1] = cos, -sin / aspect
        matrices[:, 1, 0], matrices[:, 1, 1] = sin * aspect, cos
        return _affine(images, matrices.to(images.device))

    return transform


def crop(size: int | tuple[int, int]) -> Transform:
    """Crops the centre (height, width) window; not random. Raises ValueError on a smaller image."""
    height, width = (size, size) if isinstance(size, int) else size

    def transform(images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        h, w = images.shape[-2:]
        if h < height or w < width:
            raise ValueError(f"crop to {height}x{width} got a smaller {h}x{w} image")
        top, left = (h - height) // 2, (w - width) // 2
        return images[..., top:top + height, left:left + width]

    return transform


def compose(transforms: Sequence[Transform]) -> Transform:
    """Applies the transforms in order; each image's draws follow that order."""
    transforms = list(transforms)

    def transform(images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        for t in transforms:
            images = t(images, generators)
        return images

    return transform


def random_affine(size: int | tuple[int, int], *, jitter_px: int = 0, scale: float = 0.0,
                  degrees: float = 0.0) -> Transform:
    """jitter, random_scale, random_rotate, jitter and a centre crop to `size`, in one resampling.

    The same random geometry as `compose([jitter(d), random_scale(s), random_rotate(r), jitter(d),
    crop(size)])` (draws: two integer shifts in [0, d] per jitter, one factor, one angle), but one
    bilinear resampling instead of three, so it costs a third and blurs less. Output
    (B, C, height, width); the input must be at least `size` + 2 * jitter_px pixels.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if jitter_px < 0 or not 0 <= scale < 1 or degrees < 0:
        raise ValueError(f"need jitter_px >= 0, scale in [0, 1), degrees >= 0; got {jitter_px}, {scale}, {degrees}")

    def transform(images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        _check_batch(images, generators)
        h_in, w_in = images.shape[-2:]
        if h_in < height + 2 * jitter_px or w_in < width + 2 * jitter_px:
            raise ValueError(f"random_affine to {height}x{width} with jitter {jitter_px} needs images of at least "
                             f"{height + 2 * jitter_px}x{width + 2 * jitter_px}, got {h_in}x{w_in}")
        draws = uniform_rows(generators, 6)  # (B, 6): shift 1 (y, x), factor, angle, shift 2 (y, x)
        shift1 = (draws[:, [1, 0]] * (jitter_px + 1)).floor() - jitter_px / 2  # (B, 2) as (x, y), pixels
        factor = 1 - scale + 2 * scale * draws[:, 2]
        angle = (2 * draws[:, 3] - 1) * math.radians(degrees)
        shift2 = (draws[:, [5, 4]] * (jitter_px + 1)).floor() - jitter_px / 2
        # Output pixel u (centred, pixels) samples the input at R (u + shift2) / factor + shift1.
        cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
        linear = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
        offset = (linear @ shift2[:, :, None])[:, :, 0] + shift1  # (B, 2) pixels
        # affine_grid works in [-1, 1] coordinates of the output and of the input frames.
        out_half = torch.tensor([width / 2, height / 2], dtype=torch.float64)
        in_half = torch.tensor([w_in / 2, h_in / 2], dtype=torch.float64)
        matrices = torch.cat([linear * out_half[None, None, :] / in_half[None, :, None],
                              (offset / in_half)[:, :, None]], dim=2)
        grid = F.affine_grid(matrices.to(images.device, images.dtype), [len(images), images.shape[1], height, width],
                             align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    return transform


def standard_transforms(size: int, *, pad_px: int = 4, jitter_px: int = 4, scale: float = 0.1,
                        rotate: float = 5.0) -> Transform:
    """The icon recipe: pad, then jitter, random scale, random rotate, jitter and crop back to
    `size` (fused in `random_affine`).

    `pad_px` >= `jitter_px` keeps every output pixel inside the padded image.
    """
    if pad_px < jitter_px:
        raise ValueError(f"pad ({pad_px}) must be >= jitter ({jitter_px}): the two jitters crop 2 x jitter pixels")
    return compose([pad(pad_px), random_affine(size, jitter_px=jitter_px, scale=scale, degrees=rotate)])
