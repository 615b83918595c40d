"""The optimisation loop: Adam on an image parameterisation to maximise an objective.

`Network` cuts a model after the deepest layer the objective reads (with `atlas.layers.LayerTap`),
so nothing past it is computed; `optimize` runs Adam on the image parameters alone, on whatever
device the model and the parameters are on.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..layer_maps import LayerMap
from ..layers import LayerTap
from .objectives import LOGITS, Objective
from .param import ImageFn
from .transform import Transform


class Network:
    """A model run on [0, 1] pixels up to the layers an objective needs.

    Args:
        model: an nn.Module traceable by torch.fx (unless only `LOGITS` is needed).
        layers: dotted layer names, and/or `LOGITS` for the model's output.
        normalise: maps (B, 3, H, W) pixels in [0, 1] to the model's input (differentiable);
            default None = identity.
        channels_last: feed the model channels-last inputs (faster for convolutions on the CPU
            when the model's weights are channels-last too).
        maps: layer -> `atlas.layer_maps.LayerMap` for layers whose outputs are channels-last or
            tokens; default channels-first.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *,
                 normalise: Callable[[torch.Tensor], torch.Tensor] | None = None, channels_last: bool = False,
                 maps: Mapping[str, LayerMap] | None = None):
        self.model = model
        self.layers = tuple(dict.fromkeys(layers))
        if not self.layers:
            raise ValueError("a Network needs at least one layer (or LOGITS)")
        self.normalise = normalise
        self.channels_last = channels_last
        self.logits = LOGITS in self.layers
        self._inner = [name for name in self.layers if name != LOGITS]
        self._tap = LayerTap(model, self._inner, maps=maps) if self._inner else None

    @classmethod
    def for_objective(cls, model: nn.Module, objective: Objective, **kwargs) -> "Network":
        """The network cut where `objective` needs it (keywords as for the constructor)."""
        return cls(model, objective.layers, **kwargs)

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter or buffer (CPU for a model without any)."""
        for tensor in (*self.model.parameters(), *self.model.buffers()):
            return tensor.device
        return torch.device("cpu")

    def __call__(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) pixels in [0, 1] -> {layer: (B, C, h, w) activations, LOGITS: (B, n)}."""
        x = self.normalise(pixels) if self.normalise is not None else pixels
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._tap is None:
            return {LOGITS: self.model(x)}
        out = self._tap.run(x, logits=self.logits)
        acts = dict(out.acts)
        if self.logits:
            acts[LOGITS] = out.logits
        return acts


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside the block; both put back as they were after."""
    was_training = model.training
    needs_grad = [p for p in model.parameters() if p.requires_grad]
    try:
        model.eval()
        for p in needs_grad:
            p.requires_grad_(False)
        yield model
    finally:
        for p in needs_grad:
            p.requires_grad_(True)
        model.train(was_training)


@dataclasses.dataclass
class Visualization:
    """What `optimize` returns."""

    images: torch.Tensor  # (B, 3, H, W) float32 in [0, 1], detached, on the network's device
    values: torch.Tensor  # (B,) float32 objective of the last step (of the transformed images)
    history: torch.Tensor  # (steps,) float32 mean objective over the batch at each step


def optimize(network: Network, objective: Objective, image: tuple[Sequence[torch.Tensor], ImageFn], *,
             generators: Sequence[torch.Generator], transform: Transform | None = None, steps: int = 256,
             lr: float = 0.05, on_step: Callable[[int], None] | None = None) -> Visualization:
    """Maximises `objective` over an image batch with Adam; gradients flow to the image only.

    The loss is minus the sum of the per-image objectives, so every image's gradient (and, since
    Adam is elementwise, its whole trajectory) depends on that image alone.

    Args:
        network: the model cut at the objective's layers (see `Network.for_objective`).
        objective: what to maximise; its layers must be among `network.layers`.
        image: (params, image_fn) from a parameterisation such as `fourier_image`, with the
            parameters on the network's device.
        generators: one per image: the random source of its transforms.
        transform: applied to the images before the network at every step; default None.
        steps: Adam steps; default 256.
        lr: Adam learning rate; default 0.05.
        on_step: called with the step number after each step (progress bars).

    Returns:
        A `Visualization` with the final images.
    """
    params, image_fn = image
    params = list(params)
    missing = [name for name in objective.layers if name not in network.layers]
    if missing:
        raise ValueError(f"the network does not compute {missing}; build it with Network.for_objective")
    device = network.device
    if any(p.device != device for p in params):
        raise ValueError(f"the image parameters are on {params[0].device} but the model is on {device}")
    optimizer = torch.optim.Adam(params, lr=lr)
    history = torch.zeros(steps, device=device)  # kept on the device: no sync per step
    values = torch.zeros(len(generators))
    with frozen(network.model), torch.enable_grad():
        for step in range(steps):
            images = image_fn()
            if transform is not None:
                images = transform(images, generators)
            values = objective(network(images))
            grads = torch.autograd.grad(-values.sum(), params)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            history[step] = values.detach().mean()
            if on_step is not None:
                on_step(step + 1)
        with torch.no_grad():
            final = image_fn().detach()
    return Visualization(final, values.detach().float(), history.cpu())


@torch.no_grad()
def evaluate(network: Network, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The network's activations for (B, 3, H, W) [0, 1] images, without transforms or gradients."""
    with frozen(network.model):
        return network(images.to(network.device))
