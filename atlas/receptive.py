"""Receptive fields of a layer's map positions, measured on the model rather than guessed.

Method: the model is copied and *linearised with positive weights*: every conv and linear layer
gets weights 1 / fan_in and zero bias, BatchNorm and elementwise activations become identities,
max pooling becomes average pooling with the same window. Every path from an input pixel to a
map position then carries a strictly positive weight, so no path can cancel or be switched off
(ReLU at 0, the argmax of a max pool, a negative weight), and the gradient of one map position's
activation (summed over channels) with respect to a positive input is nonzero exactly on the
pixels that position sees. The copy runs in float64, so the products of 1 / fan_in over a deep
network stay far from underflow. Functional ops in `forward` (F.pad, additions, F.relu on the
positive values) keep that property.

The gradients of a few map positions (consecutive pairs at both ends and in the middle) are taken in one backward pass (one
batch element per position). From their supports [lo, hi) the stride is the step of lo between
positions not clipped at the top (or of hi not clipped at the bottom), the offset is lo - y *
stride, and the size is hi - (offset + y * stride) for a position not clipped at the bottom. When
every position is clipped at both ends (a field larger than the whole input), the measurement is
repeated on a larger input of the same parity (so TF-'same' padding stays the same).

Attention mixes every token with every other, so every position of a transformer block sees the
whole input, at any input size. When every measured position sees the whole input and the model
refuses larger inputs (a vision transformer's fixed size), or still does at 8x the size, the
field is the whole image (`whole`): a patch then shows the whole input with the position's own
stride cell outlined.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .errors import AtlasError
from .layer_maps import NCHW, LayerMap, to_map
from .layers import check_layers

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Mish, nn.Softplus,
                nn.Dropout, nn.Dropout2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm,
                nn.InstanceNorm2d, nn.LocalResponseNorm)


MASKED_FRACTION = 1e-30  # gradient below this fraction of a position's largest is not support


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """Map position (y, x) sees input rows [offset_y + y * stride_y, ... + size_y) (clipped to the
    image), and columns likewise; offsets may be negative (the field starts in the padding)."""

    stride_y: int
    stride_x: int
    size_y: int
    size_x: int
    offset_y: int
    offset_x: int
    whole: bool = False  # every position sees the whole input (attention); size and offset then span it
    centred: bool = False  # the field differs by position (windowed attention): the largest one, centred


def _size2(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    h, w = (int(v) for v in value)
    return h, w


def positive_linear_copy(model: nn.Module) -> nn.Module:
    """A float64 copy of `model` in which every input-to-output path has a positive weight (see the
    module docstring)."""
    model = copy.deepcopy(model).double().eval()

    def convert(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, _ELEMENTWISE):
                setattr(parent, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                   ceil_mode=child.ceil_mode))
            elif isinstance(child, nn.AdaptiveMaxPool2d):
                setattr(parent, name, nn.AdaptiveAvgPool2d(child.output_size))
            else:
                if isinstance(child, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                    with torch.no_grad():
                        w = child.weight
                        w.fill_(1.0 / max(1, w[0].numel()))
                        if child.bias is not None:
                            child.bias.zero_()
                convert(child)

    convert(model)
    model.requires_grad_(False)
    return model


class _Stop(Exception):
    pass


class _Irregular(Exception):
    """The positions' supports are not one box moved by a stride."""


def _layer_output(model: nn.Module, layer: str, x: torch.Tensor, layer_map: LayerMap) -> torch.Tensor:
    """Runs `model` on x up to `layer` and returns that layer's output as a (B, C, H, W) map (the
    rest is not run)."""
    module = dict(model.named_modules())[layer]
    captured: list[torch.Tensor] = []

    def hook(_m, _i, output):
        captured.append(output)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    out = captured[0] if captured and isinstance(captured[0], torch.Tensor) else None
    if out is None or out.dim() != (3 if layer_map.layout == "tokens" else 4):
        raise AtlasError(f"layer {layer!r} does not give a (C, H, W) map, so it has no receptive field")
    return to_map(out, layer_map.layout, layer_map.prefix, layer_map.grid)


def _supports(model: nn.Module, layer: str, h_in: int, w_in: int, layer_map: LayerMap
              ) -> tuple[dict, dict, tuple[int, int]]:
    """Row supports [lo, hi) of a few map rows and column supports of a few map columns ({position:
    span}), from one batched backward pass."""
    with torch.no_grad():
        shape = _layer_output(model, layer, torch.ones(1, 3, h_in, w_in, dtype=torch.float64), layer_map).shape
    _, _, hm, wm = shape
    def picks(n: int) -> list[int]:
        # consecutive pairs at both ends and in the middle: enough for stride, offset and size
        return sorted({min(max(p, 0), n - 1) for p in (0, 1, n // 2 - 1, n // 2, n - 2, n - 1)})

    ys_, xs_ = picks(hm), picks(wm)
    k = max(len(ys_), len(xs_))
    ys_ += [ys_[-1]] * (k - len(ys_))
    xs_ += [xs_[-1]] * (k - len(xs_))
    positions = list(zip(ys_, xs_))  # each position gives its row span and its column span
    gen = torch.Generator().manual_seed(0)
    x = (0.5 + 0.5 * torch.rand(len(positions), 3, h_in, w_in, generator=gen, dtype=torch.float64))
    x.requires_grad_(True)
    with torch.enable_grad():
        out = _layer_output(model, layer, x, layer_map)
        ys = torch.tensor([p[0] for p in positions])
        xs = torch.tensor([p[1] for p in positions])
        picked = out[torch.arange(len(positions)), :, ys, xs]  # (B, C)
        (grad,) = torch.autograd.grad(picked.sum(), x)
    grad = grad.abs().sum(dim=1)  # (B, H, W)
    # Masked attention adds -100 to the logits it masks (Swin's shifted windows): their exp(-100)
    # weights are no path the network uses. Real paths stay far above this fraction of the largest.
    support = (grad > grad.flatten(1).amax(1)[:, None, None] * MASKED_FRACTION).numpy()

    def span(mask: np.ndarray) -> tuple[int, int]:
        idx = np.flatnonzero(mask)
        if len(idx) == 0:
            raise AtlasError(f"no input pixel reaches layer {layer!r}; cannot measure its receptive field")
        return int(idx[0]), int(idx[-1]) + 1

    rows = {y: span(support[i].any(axis=1)) for i, (y, _) in enumerate(positions)}
    cols = {x: span(support[i].any(axis=0)) for i, (_, x) in enumerate(positions)}
    return rows, cols, (hm, wm)


def _solve(spans: dict[int, tuple[int, int]], n_map: int, n_in: int) -> tuple[int, int, int] | None:
    """(stride, size, offset) from some positions' supports along one axis, or None if undetermined."""
    free_lo = [(p, lo) for p, (lo, _) in sorted(spans.items()) if lo > 0]
    free_hi = [(p, hi) for p, (_, hi) in sorted(spans.items()) if hi < n_in]
    stride = None
    for free in (free_lo, free_hi):
        steps = {b[1] - a[1] for a, b in zip(free, free[1:]) if b[0] == a[0] + 1}
        if steps:
            stride = max(steps)  # all equal for a regular grid
            break
    if stride is None:
        if n_map == 1:
            stride = n_in  # a 1-position map: one stride per image
        else:
            return None
    if not free_lo or not free_hi:
        return None
    p, lo = free_lo[0]
    offset = lo - p * stride
    q, hi = free_hi[-1]
    size = hi - (offset + q * stride)
    for p, span in spans.items():  # a field that differs by position (windows) fits no single grid
        if (max(0, offset + p * stride), min(n_in, offset + p * stride + size)) != span:
            raise _Irregular
    return stride, size, offset


def receptive_field(model: nn.Module, layer: str, input_size: int | Sequence[int],
                    layer_map: LayerMap = NCHW) -> ReceptiveField:
    """Measures the receptive field of `layer`'s map positions for inputs of `input_size`.

    Args:
        model: the network (or a `LoadedModel`); its weights are not used or changed.
        layer: dotted `named_modules()` path of a layer whose output reads as a map.
        input_size: side of the square input, or (H, W).
        layer_map: how the layer's output reads as a (C, H, W) map; default channels-first.

    Returns:
        The ReceptiveField (strides, sizes and offsets in input pixels).

    Raises:
        AtlasError: unknown layer, or a layer without a spatial map.
    """
    module = getattr(model, "module", model)
    check_layers(module, [layer])
    h_in, w_in = _size2(input_size)
    linear = positive_linear_copy(module)
    result: list[tuple[int, int, int] | None] = [None, None]
    scale, whole = 1, False
    while True:
        try:
            rows, cols, (hm, wm) = _supports(linear, layer, h_in * scale, w_in * scale, layer_map)
        except AtlasError:
            raise
        except Exception:  # a model that takes one input size refuses the larger one
            if scale == 1:
                raise
            break
        if scale == 1:
            map_hw, first = (hm, wm), (rows, cols)
        whole_here = all(span == (0, n * scale) for spans, n in ((rows, h_in), (cols, w_in)) for span in spans.values())
        whole = whole_here if scale == 1 else whole and whole_here
        try:
            for axis, (spans, n_map, n) in enumerate(((rows, hm, h_in * scale), (cols, wm, w_in * scale))):
                if result[axis] is None:
                    result[axis] = _solve(spans, n_map, n)
        except _Irregular:
            return _centred(first, map_hw, (h_in, w_in))
        if all(r is not None for r in result) or scale >= 8:
            break
        if whole and (layer_map.layout == "tokens" or scale == 2):
            break  # attention: whole at two sizes (and a larger input costs its square in memory)
        scale *= 2  # same parity as input_size, so TF-'same' padding is unchanged
    if any(r is None for r in result):
        if whole:  # every position saw the whole input at every size tried
            sy, sx = h_in // map_hw[0], w_in // map_hw[1]
            return ReceptiveField(sy, sx, h_in, w_in, 0, 0, whole=True)
        raise AtlasError(f"cannot measure the receptive field of layer {layer!r} (even on {scale}x larger inputs)")
    (sy, zy, oy), (sx, zx, ox) = result  # type: ignore[misc]
    return ReceptiveField(sy, sx, zy, zx, oy, ox)


def _centred(spans: tuple[dict, dict], map_hw: tuple[int, int], input_hw: tuple[int, int]) -> ReceptiveField:
    """A field for positions that see different boxes: the largest measured extent, centred on
    each position's stride cell."""
    values = []
    for axis_spans, n_map, n_in in zip(spans, map_hw, input_hw):
        stride = n_in // n_map
        size = max(hi - lo for lo, hi in axis_spans.values())
        values.append((stride, size, int(round(stride / 2 - size / 2))))
    (sy, zy, oy), (sx, zx, ox) = values
    return ReceptiveField(sy, sx, zy, zx, oy, ox, centred=True)


def box_for(rf: ReceptiveField, yx: np.ndarray, input_size: int | Sequence[int], clip: bool = True) -> np.ndarray:
    """The receptive fields of map positions as boxes clipped to the input.

    Args:
        rf: the layer's receptive field.
        yx: (n, 2) int (row, column) map positions.
        input_size: side of the square input, or (H, W).
        clip: clip the boxes to the input (False: the whole field, which may reach into the padding).

    Returns:
        (n, 4) int64 (left, top, right, bottom) in input pixels; right and bottom exclusive.
    """
    h_in, w_in = _size2(input_size)
    yx = np.asarray(yx, dtype=np.int64).reshape(-1, 2)
    if rf.whole:
        return np.tile(np.array([0, 0, w_in, h_in], np.int64), (len(yx), 1))
    top = rf.offset_y + yx[:, 0] * rf.stride_y
    left = rf.offset_x + yx[:, 1] * rf.stride_x
    box = np.stack([left, top, left + rf.size_x, top + rf.size_y], axis=1)
    if not clip:
        return box
    box[:, [0, 2]] = np.clip(box[:, [0, 2]], 0, w_in)
    box[:, [1, 3]] = np.clip(box[:, [1, 3]], 0, h_in)
    return box
