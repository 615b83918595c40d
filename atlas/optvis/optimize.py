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
from .schedule import EarlyStop, Schedule
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
        autocast: run the model under `torch.autocast` in this dtype (torch.bfloat16: faster on
            GPUs with bf16 units, slower on a CPU without them); activations come back float32.
            Default None: the model's own dtype.
        compile: run the model cut at the layers through `torch.compile` (a one-off compile of
            tens of seconds, and again for each new batch shape); default False.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *,
                 normalise: Callable[[torch.Tensor], torch.Tensor] | None = None, channels_last: bool = False,
                 maps: Mapping[str, LayerMap] | None = None, autocast: torch.dtype | None = None,
                 compile: bool = False):
        self.model = model
        self.layers = tuple(dict.fromkeys(layers))
        if not self.layers:
            raise ValueError("a Network needs at least one layer (or LOGITS)")
        self.normalise = normalise
        self.channels_last = channels_last
        self.logits = LOGITS in self.layers
        self._inner = [name for name in self.layers if name != LOGITS]
        self._tap = LayerTap(model, self._inner, maps=maps) if self._inner else None
        self.autocast = autocast
        self.compiled = compile
        self._whole = torch.compile(model) if compile and self._tap is None else model
        if compile and self._tap is not None:  # compiled lazily, on the first call of each
            self._tap.front = torch.compile(self._tap.front)
            self._tap.front_saved = torch.compile(self._tap.front_saved)

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
        with torch.autocast(x.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            if self._tap is None:
                acts = {LOGITS: self._whole(x)}
            else:
                out = self._tap.run(x, logits=self.logits)
                acts = dict(out.acts)
                if self.logits:
                    acts[LOGITS] = out.logits
        if self.autocast is not None:  # objectives (norms, cosines) are computed in float32
            acts = {name: a.float() for name, a in acts.items()}
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
    values: torch.Tensor  # (B,) float32 objective of each image's last step (of the transformed images)
    history: torch.Tensor  # (steps,) float32 mean objective at each step over the images still optimised
    steps: torch.Tensor  # (B,) int64 steps each image was optimised for (fewer than asked if it stopped early)


def optimize(network: Network, objective: Objective, image: tuple[Sequence[torch.Tensor], ImageFn], *,
             generators: Sequence[torch.Generator], transform: Transform | None = None, steps: int = 256,
             lr: float = 0.05, schedule: Schedule | None = None, early_stop: EarlyStop | None = None,
             on_step: Callable[[int], None] | None = None) -> Visualization:
    """Maximises `objective` over an image batch with Adam; gradients flow to the image only.

    The loss is minus the sum of the per-image objectives, so every image's gradient (and, since
    Adam is elementwise, its whole trajectory) depends on that image alone.

    Args:
        network: the model cut at the objective's layers (see `Network.for_objective`).
        objective: what to maximise; its layers must be among `network.layers`.
        image: (params, image_fn) from a parameterisation such as `fourier_image`, with the
            parameters on the network's device, each (B, ...) with one row per image.
        generators: one per image: the random source of its transforms.
        transform: applied to the images before the network at every step; default None.
        steps: Adam steps; default 256.
        lr: Adam learning rate; default 0.05.
        schedule: step -> factor of lr (see `atlas.optvis.schedule`); default None = constant.
        early_stop: stop each image once its objective stops rising (`EarlyStop`); stopped images
            leave the batch, so the network runs on fewer rows; default None = all steps.
        on_step: called with the number of steps done after each step, and with `steps` when
            every image stopped early (progress bars).

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
    b = len(generators)
    optimizer = torch.optim.Adam(params, lr=lr)
    history = torch.zeros(steps, device=device)  # kept on the device: no sync per step
    per_image = torch.zeros(steps, b, device=device) if early_stop is not None else None
    last = torch.zeros(b, device=device)
    ran = torch.full((b,), steps, dtype=torch.int64)
    stopped = torch.zeros(b, dtype=torch.bool)
    frozen_rows: list[torch.Tensor] = []  # each parameter as it was when its rows stopped
    # One check costs a device sync; a quarter window apart, an image runs at most that much past its stop.
    check_every = max(1, early_stop.window // 4) if early_stop is not None else 0
    with frozen(network.model), torch.enable_grad():
        for step in range(steps):
            if schedule is not None:
                for group in optimizer.param_groups:
                    group["lr"] = lr * schedule(step)
            images = image_fn()
            if stopped.any():
                rows = _running_rows(stopped)
                keep = ~stopped[rows]  # rows whose objective counts (a lone image runs beside a stopped one)
                images = transform(images[rows.to(device)], [generators[i] for i in rows.tolist()]) \
                    if transform is not None else images[rows.to(device)]
                acts = network(images)
                values = objective(_scatter_rows(acts, rows.to(device), b))[rows.to(device)]
                live = rows[keep].to(device)
                loss = -values[keep.to(device)].sum()
            else:
                rows = live = None
                if transform is not None:
                    images = transform(images, generators)
                values = objective(network(images))
                loss = -values.sum()
            grads = torch.autograd.grad(loss, params)
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            done = values.detach()
            if live is None:
                last = done
                history[step] = done.mean()
                if per_image is not None:
                    per_image[step] = done
            else:
                done = done[keep.to(device)]
                last = last.index_copy(0, live, done)
                history[step] = done.mean()
                per_image[step].index_copy_(0, live, done)
                with torch.no_grad():
                    mask = stopped.to(device)
                    for p, held in zip(params, frozen_rows):  # Adam's momentum would move them on
                        p[mask] = held[mask]
            if on_step is not None:
                on_step(step + 1)
            if early_stop is not None and (step + 1) % check_every == 0 and step + 1 < steps:
                new = early_stop.stalled(per_image[:step + 1].cpu()) & ~stopped
                if new.any():
                    with torch.no_grad():
                        if not frozen_rows:
                            frozen_rows = [p.detach().clone() for p in params]
                        mask = new.to(device)
                        for p, held in zip(params, frozen_rows):
                            held[mask] = p.detach()[mask]
                    stopped |= new
                    ran[new] = step + 1
                    if stopped.all():
                        history = history[:step + 1]
                        if on_step is not None:
                            on_step(steps)
                        break
        with torch.no_grad():
            final = image_fn().detach()
    return Visualization(final, last.float(), history.cpu(), ran)


def _running_rows(stopped: torch.Tensor) -> torch.Tensor:
    """The rows to run this step: those not stopped, plus one stopped row when only one is left, so
    no image runs alone (a batch of one takes other convolution kernels, see `render.render_batch`)."""
    rows = torch.nonzero(~stopped)[:, 0]
    if len(rows) == 1 and len(stopped) > 1:
        other = torch.nonzero(stopped)[:1, 0]
        rows = torch.sort(torch.cat([rows, other])).values
    return rows


def _scatter_rows(acts: Mapping[str, torch.Tensor], rows: torch.Tensor, b: int) -> dict[str, torch.Tensor]:
    """Activations of some rows of the batch, put back at their rows of a zero (b, ...) batch: the
    objective then sees each image at its own row, as its per-image vectors expect."""
    return {name: a.new_zeros((b, *a.shape[1:])).index_copy(0, rows, a) for name, a in acts.items()}


@torch.no_grad()
def evaluate(network: Network, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The network's activations for (B, 3, H, W) [0, 1] images, without transforms or gradients."""
    with frozen(network.model):
        return network(images.to(network.device))
