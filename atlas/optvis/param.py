"""Image parameterisations: what the optimiser changes, and how that becomes an image batch.

Each factory returns `(params, image_fn)`: `params` are the leaf tensors to optimise and
`image_fn()` returns the current (B, 3, H, W) float32 image batch with pixels in (0, 1). Row i's
initial noise comes from `generators[i]` alone, so an image does not depend on which other images
share its batch (see `make_generators`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

ImageFn = Callable[[], torch.Tensor]

# Square root of the colour covariance of ImageNet pixels (Lucid's `color_correlation_svd_sqrt`):
# optimising in these decorrelated coordinates keeps icons from drifting into saturated noise.
_COLOR_CORRELATION_SQRT = np.array([[0.26, 0.09, 0.02],
                                    [0.27, 0.00, -0.05],
                                    [0.27, -0.09, 0.03]], dtype=np.float32)
COLOR_CORRELATION = _COLOR_CORRELATION_SQRT / np.linalg.norm(_COLOR_CORRELATION_SQRT, axis=0).max()


def make_generators(seeds: Iterable[int]) -> list[torch.Generator]:
    """One CPU `torch.Generator` per seed: the explicit random source of each image of a batch."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def _normal_rows(generators: Sequence[torch.Generator], shape: tuple[int, ...], sd: float,
                 device: torch.device | str) -> torch.Tensor:
    """(B, *shape) standard normal noise times sd; row i drawn from generators[i] on the CPU, so the
    same seeds give the same start on every device."""
    rows = [torch.randn(shape, generator=g) for g in generators]
    return (torch.stack(rows) * sd).to(device)


def decorrelate_colors(image: torch.Tensor) -> torch.Tensor:
    """Maps (B, 3, H, W) decorrelated colour coordinates to RGB with `COLOR_CORRELATION`."""
    matrix = torch.as_tensor(COLOR_CORRELATION, dtype=image.dtype, device=image.device)
    return torch.einsum("ij,bjhw->bihw", matrix, image)


def fft_frequencies(height: int, width: int) -> np.ndarray:
    """(height, width // 2 + 1) float64 spatial frequency magnitudes of a real 2-D FFT, cycles/pixel."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    return np.sqrt(fx * fx + fy * fy)


def fourier_image(size: int | tuple[int, int], generators: Sequence[torch.Generator], *, sd: float = 0.01,
                  decay_power: float = 1.0, decorrelate: bool = True,
                  device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], ImageFn]:
    """An image batch parameterised by its Fourier spectrum, in decorrelated colour, through a sigmoid.

    Each frequency's coefficient is scaled by 1 / max(f, 1 / max(H, W)) ** decay_power, so Adam's
    equal-sized steps change low frequencies more than high ones: the optimiser finds shapes
    before it finds pixel noise.

    Args:
        size: side in pixels, or (height, width).
        generators: one per image (B = len(generators)); image i's initial spectrum is drawn from
            generators[i].
        sd: standard deviation of the initial spectrum; default 0.01 (a grey start).
        decay_power: how fast the frequency scaling falls; default 1.
        decorrelate: map the three channels through `COLOR_CORRELATION` before the sigmoid; default True.
        device: where the parameters live (the model's device).

    Returns:
        params: [(B, 3, H, W // 2 + 1, 2) float32 spectrum, real and imaginary parts].
        image_fn: returns (B, 3, H, W) float32 in (0, 1).
    """
    height, width = (size, size) if isinstance(size, int) else size
    freqs = fft_frequencies(height, width)
    spectrum = _normal_rows(generators, (3, *freqs.shape, 2), sd, device).requires_grad_(True)
    scale = 1.0 / np.maximum(freqs, 1.0 / max(height, width)) ** decay_power
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=spectrum.device)[None, None, :, :, None]

    def image_fn() -> torch.Tensor:
        coefficients = torch.view_as_complex(scale_t * spectrum)
        image = torch.fft.irfft2(coefficients, s=(height, width), norm="ortho")
        image = image / 4.0  # keeps the initial sigmoid input small, as Lucid's fft_image does
        return torch.sigmoid(decorrelate_colors(image) if decorrelate else image)

    return [spectrum], image_fn


def pixel_image(size: int | tuple[int, int], generators: Sequence[torch.Generator], *, sd: float = 0.01,
                decorrelate: bool = False, device: torch.device | str = "cpu") -> tuple[list[torch.Tensor], ImageFn]:
    """An image batch parameterised by its pixels (before a sigmoid), the plain baseline.

    Args:
        size: side in pixels, or (height, width).
        generators: one per image; image i's initial noise is drawn from generators[i].
        sd: standard deviation of the initial values; default 0.01.
        decorrelate: map the channels through `COLOR_CORRELATION` before the sigmoid; default False.
        device: where the parameters live.

    Returns:
        params: [(B, 3, H, W) float32]; image_fn: returns (B, 3, H, W) float32 in (0, 1).
    """
    height, width = (size, size) if isinstance(size, int) else size
    pixels = _normal_rows(generators, (3, height, width), sd, device).requires_grad_(True)

    def image_fn() -> torch.Tensor:
        return torch.sigmoid(decorrelate_colors(pixels) if decorrelate else pixels)

    return [pixels], image_fn
