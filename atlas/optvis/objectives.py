"""Objectives: what a visualisation maximises, one value per image of the batch.

An `Objective` reads the activations of named layers (a dict layer -> (B, C, H, W) tensor, plus
`LOGITS` -> (B, n_classes) for class objectives) and returns a (B,) tensor. Objectives add,
subtract and scale (`channel("a", 3) + 0.5 * neuron("b", 7)`), and `sum()` of a list works.
Vectors given per image ((B, C)) let one batch optimise a different direction in every image,
which is how the render stage draws all cells of a grid together.

Positions are (x, y) = (column, row) of the layer's activation map; None means its centre
(W // 2, H // 2), the position the atlas objective uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

LOGITS = "logits"  # the name under which objectives read the model's output

Acts = Mapping[str, torch.Tensor]


class Objective:
    """A differentiable score per image, computed from named layer outputs.

    Args:
        fn: maps {layer: activations} to a (B,) tensor.
        layers: the layer names `fn` reads (`LOGITS` for the model's output).
        name: a short description, shown in reports.
    """

    def __init__(self, fn: Callable[[Acts], torch.Tensor], layers: Sequence[str], name: str):
        self.fn = fn
        self.layers = tuple(dict.fromkeys(layers))
        self.name = name

    def __call__(self, acts: Acts) -> torch.Tensor:
        return self.fn(acts)

    def __repr__(self) -> str:
        return f"Objective({self.name})"

    def __add__(self, other: "Objective | float") -> "Objective":
        if isinstance(other, (int, float)):
            if other == 0:
                return self
            return Objective(lambda acts: self(acts) + other, self.layers, f"{self.name} + {other}")
        return Objective(lambda acts: self(acts) + other(acts), self.layers + other.layers,
                         f"{self.name} + {other.name}")

    __radd__ = __add__  # sum([...]) starts from 0

    def __mul__(self, factor: float) -> "Objective":
        if not isinstance(factor, (int, float)):
            return NotImplemented
        return Objective(lambda acts: factor * self(acts), self.layers, f"{factor} * ({self.name})")

    __rmul__ = __mul__

    def __neg__(self) -> "Objective":
        return self * -1.0

    def __sub__(self, other: "Objective | float") -> "Objective":
        return self + (-other)


class _Vectors:
    """(C,) or (B, C) vectors, handed out as a (1 or B, C) tensor on the activations' device and
    dtype; the copy is made once per device, not at every step."""

    def __init__(self, vectors: np.ndarray | torch.Tensor):
        self.vectors = torch.as_tensor(vectors)
        self._copies: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def like(self, h: torch.Tensor) -> torch.Tensor:
        key = (h.device, h.dtype)
        if key not in self._copies:
            v = self.vectors.detach().to(device=h.device, dtype=h.dtype)
            self._copies[key] = v[None] if v.dim() == 1 else v
        v = self._copies[key]
        if v.dim() != 2 or v.shape[1] != h.shape[1] or v.shape[0] not in (1, h.shape[0]):
            raise ValueError(f"vectors of shape {tuple(v.shape)} do not fit activations of shape {tuple(h.shape)}; "
                             "give (C,) or (B, C)")
        return v


def at_position(h: torch.Tensor, x: int | None = None, y: int | None = None) -> torch.Tensor:
    """(B, C) activations at column x, row y of a (B, C, H, W) map; None = the centre (W // 2, H // 2)."""
    height, width = h.shape[-2:]
    return h[:, :, height // 2 if y is None else y, width // 2 if x is None else x]


def _where(x: int | None, y: int | None) -> str:
    return "centre" if x is None and y is None else f"x={x}, y={y}"


def channel(layer: str, n: int) -> Objective:
    """Mean activation of channel n over all positions of the layer's map."""
    return Objective(lambda acts: acts[layer][:, n].mean(dim=(-2, -1)), [layer], f"channel {layer}:{n}")


def neuron(layer: str, n: int, x: int | None = None, y: int | None = None) -> Objective:
    """Activation of channel n at one position (column x, row y; default the centre)."""
    return Objective(lambda acts: at_position(acts[layer], x, y)[:, n], [layer],
                     f"neuron {layer}:{n} at {_where(x, y)}")


def direction(layer: str, vectors: np.ndarray | torch.Tensor) -> Objective:
    """Mean over positions of dot(h, v): how far the map points along v.

    Args:
        vectors: (C,) one direction for every image, or (B, C) one per image.
    """
    v = _Vectors(vectors)

    def fn(acts: Acts) -> torch.Tensor:
        h = acts[layer]
        return torch.einsum("bchw,bc->b", h, v.like(h).expand(h.shape[0], -1)) / (h.shape[2] * h.shape[3])

    return Objective(fn, [layer], f"direction {layer}")


def direction_neuron(layer: str, vectors: np.ndarray | torch.Tensor, x: int | None = None,
                     y: int | None = None) -> Objective:
    """dot(h, v) at one position (default the centre); vectors (C,) or (B, C)."""
    v = _Vectors(vectors)

    def fn(acts: Acts) -> torch.Tensor:
        h = at_position(acts[layer], x, y)
        return (h * v.like(h)).sum(dim=1)

    return Objective(fn, [layer], f"direction neuron {layer} at {_where(x, y)}")


def cosine_at(h: torch.Tensor, vectors: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B,) cosine similarity between (B, C) activations and (B or 1, C) vectors."""
    return (h * vectors).sum(dim=1) / (h.norm(dim=1) * vectors.norm(dim=1)).clamp_min(eps)


def atlas_direction(layer: str, vectors: np.ndarray | torch.Tensor, cos_power: float = 3.0, *,
                    whitening: np.ndarray | torch.Tensor | None = None, floor: float = 0.1,
                    x: int | None = None, y: int | None = None) -> Objective:
    """The activation atlas objective: dot(h, w) * max(floor, cos(h, w)) ** cos_power at one position.

    h is the activation at the position (default the centre), w = v, or v @ S with `whitening` S.
    The cosine factor rewards pointing along w, not just far along it; the floor keeps a gradient
    while the image still points away (Lucid's `direction_neuron_cossim_S`).

    Args:
        layer: the layer name.
        vectors: (C,) or (B, C) cell directions v.
        cos_power: p, the article's 2-4; default 3.
        whitening: optional (C, C) S; default None.
        floor: lower bound of the cosine factor; default 0.1.
        x, y: column and row; default the centre.
    """
    w_all = torch.as_tensor(vectors, dtype=torch.float32)
    if whitening is not None:
        w_all = w_all @ torch.as_tensor(whitening, dtype=torch.float32)
    v = _Vectors(w_all)

    def fn(acts: Acts) -> torch.Tensor:
        h = at_position(acts[layer], x, y)
        w = v.like(h)
        dot = (h * w).sum(dim=1)
        return dot * cosine_at(h, w).clamp_min(floor) ** cos_power

    white = ", whitened" if whitening is not None else ""
    return Objective(fn, [layer], f"dot * max({floor}, cos)^{cos_power:g} at {_where(x, y)} of {layer}{white}")


def class_logit(n: int) -> Objective:
    """The model's output (logit) for class n."""
    return Objective(lambda acts: acts[LOGITS][:, n], [LOGITS], f"logit {n}")
