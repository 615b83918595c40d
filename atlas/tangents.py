"""Forward-mode derivatives of a traced graph for many tangents that share one primal.

Attribution needs J·t for k tangents per image, all at the same point h. torch.func's
`vmap(jvp)` does this generally, but its batching rules copy tensors out of channels-last layout
and fall back to slow per-example loops for some ops. For the layers classifiers are made of,
the derivative is simple enough to write down: convolutions and linear maps without their bias,
BatchNorm (eval) as a per-channel scale, elementwise activations as a multiplication by their
derivative at the primal, pooling, padding and concatenation as themselves, max pooling as a
gather at the primal's argmax. `TangentGraph` runs those rules over a (k·B, ...) batch of
tangents as plain batched tensor ops, and says up front (`supported`) whether every node of the
graph has a rule; callers fall back to `vmap(jvp)` when it does not.

Tangent batches are laid out tangent-major: row j·B + b is tangent j of image b.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

# Modules that are linear and act on each example alone: the tangent goes through the module itself.
_LINEAR_MODULES = (nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                   nn.AlphaDropout, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                   nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.ZeroPad2d, nn.Upsample,
                   nn.PixelShuffle, nn.PixelUnshuffle)
# Elementwise nonlinearities: the tangent is multiplied by the derivative at the primal input.
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU,
                        nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Mish)
_LINEAR_FUNCTIONS = {torch.flatten, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                     F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.dropout, F.dropout2d, torch.mean,
                     F.interpolate}
_ELEMENTWISE_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.gelu, F.silu,
                          torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid,
                          F.softplus, F.mish}
_LINEAR_METHODS = {"flatten", "mean", "contiguous"}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh"}


def _per_image(t: torch.Tensor, m: torch.Tensor, k: int) -> torch.Tensor:
    """Multiplies tangents (k·B, ...) by a per-image tensor (B, ...) without copying it k times."""
    if m.dim() != t.dim() or m.shape[0] != t.shape[0] // k:
        return t * m  # a scalar or a constant that broadcasts over the batch
    return (t.view(k, m.shape[0], *t.shape[1:]) * m).flatten(0, 1)


class TangentGraph:
    """Pushes a batch of tangents through an fx graph whose first input carries them.

    Args:
        module: a GraphModule (for instance `LayerTap.rest[layer]`) in eval mode.
    """

    def __init__(self, module: fx.GraphModule):
        self.module = module
        self.modules = dict(module.named_modules())
        self.unsupported = [n for n in module.graph.nodes if not self._has_rule(n)]
        self.supported = not self.unsupported

    def _has_rule(self, node: fx.Node) -> bool:
        if node.op in ("placeholder", "get_attr", "output"):
            return True
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                return not m.training and m.track_running_stats and m.running_var is not None
            if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
                return not m.training
            if isinstance(m, nn.Upsample):
                return m.mode in ("nearest", "linear", "bilinear", "bicubic", "trilinear")
            return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.MaxPool2d,
                                  nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
                              + _LINEAR_MODULES + _ELEMENTWISE_MODULES)
        if node.op == "call_function":
            return node.target in _LINEAR_FUNCTIONS | _ELEMENTWISE_FUNCTIONS | {
                operator.add, torch.add, operator.sub, torch.sub, operator.mul, torch.mul,
                operator.truediv, operator.neg, torch.cat, F.pad, getattr, operator.getitem,
                operator.floordiv, operator.mod, F.max_pool2d}
        if node.op == "call_method":
            return node.target in _LINEAR_METHODS | _ELEMENTWISE_METHODS | {"size", "dim"}
        return False

    def __call__(self, inputs: Sequence[Any], tangents: torch.Tensor, k: int) -> torch.Tensor:
        """Returns the output's tangents (k·B, ...) for tangents (k·B, ...) of the first input.

        Args:
            inputs: the graph's inputs at the primal point, batch B (the first is h).
            tangents: (k·B, *h.shape[1:]).
            k: tangents per image.
        """
        return self.linearize(inputs).push(tangents, k)

    def linearize(self, inputs: Sequence[Any]) -> "Linearized":
        """Runs the primal pass once; the result pushes any number of tangent batches."""
        if not self.supported:
            raise ValueError(f"no tangent rule for {[n.format_node() for n in self.unsupported]}")
        primal: dict[fx.Node, Any] = {}
        inputs = list(inputs)
        for node in self.module.graph.nodes:
            if node.op == "placeholder":
                primal[node] = inputs.pop(0)
            elif node.op != "output":
                args = fx.map_arg(node.args, lambda n: primal[n])
                kwargs = fx.map_arg(node.kwargs, lambda n: primal[n])
                primal[node] = self._primal(node, args, kwargs)
        return Linearized(self, primal)

    def _primal(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "get_attr":
            value: Any = self.module
            for part in node.target.split("."):
                value = getattr(value, part)
            return value
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)

    def _tangent(self, node: fx.Node, args: tuple, kwargs: dict, primal: dict, tangent: dict,
                 k: int, cache: dict) -> torch.Tensor | None:
        """The derivative rule of one node, given the tangents of its inputs.

        `cache` keeps what depends on the primal only (derivatives, argmax indices) per node.
        """
        def derivative(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            if node not in cache:
                cache[node] = _derivative(fn, x)
            return cache[node]

        def t_of(arg: Any) -> torch.Tensor | None:
            return tangent.get(arg) if isinstance(arg, fx.Node) else None

        first = node.args[0] if node.args else None
        t0 = t_of(first)
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                return m._conv_forward(t0, m.weight, None)
            if isinstance(m, nn.Linear):
                return F.linear(t0, m.weight)
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                scale = torch.rsqrt(m.running_var + m.eps)
                if m.weight is not None:
                    scale = scale * m.weight
                return t0 * scale.view(1, -1, *([1] * (t0.dim() - 2)))
            if isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)):
                return F.pad(t0, m.padding, value=0.0)
            if isinstance(m, nn.MaxPool2d):
                return _max_pool(t0, args[0], k, cache, node, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
            if isinstance(m, _LINEAR_MODULES):
                return m(t0)
            return _per_image(t0, derivative(m, args[0]), k)
        if node.op == "call_method":
            if node.target in _LINEAR_METHODS:
                return getattr(t0, node.target)(*args[1:], **kwargs)
            return _per_image(t0, derivative(lambda x: getattr(x, node.target)(), args[0]), k)
        target = node.target
        if target in (getattr, operator.getitem) and t0 is not None:
            if target is getattr:
                return None  # .shape and the like: read from the primal
            index = args[1]
            if isinstance(index, tuple) and index and index[0] == slice(None):
                return t0[index]
            raise ValueError(f"cannot index tangents with {index!r}")
        if target in (operator.add, torch.add, operator.sub, torch.sub):
            a, b = (t_of(x) for x in node.args[:2])
            sign = -1.0 if target in (operator.sub, torch.sub) else 1.0
            if a is None:
                return sign * b
            return a if b is None else a + sign * b
        if target in (operator.mul, torch.mul):
            (x, y), (tx, ty) = args[:2], (t_of(node.args[0]), t_of(node.args[1]))
            out = None if tx is None else _per_image(tx, y, k) if isinstance(y, torch.Tensor) else tx * y
            if ty is not None:
                other = _per_image(ty, x, k) if isinstance(x, torch.Tensor) else ty * x
                out = other if out is None else out + other
            return out
        if target is operator.truediv:
            if t_of(node.args[1]) is not None:
                raise ValueError("division by a tensor that depends on the layer")
            return t0 / args[1]
        if target is operator.neg:
            return -t0
        if target is torch.cat:
            tensors = node.args[0]
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim == 0:
                raise ValueError("concatenation along the batch")
            parts = []
            for n in tensors:
                t = t_of(n)
                if t is None:
                    p = primal[n]
                    t = p.new_zeros(k * p.shape[0], *p.shape[1:])
                parts.append(t)
            return torch.cat(parts, dim=dim)
        if target is F.pad:
            kw = dict(kwargs)
            kw.pop("value", None)
            rest = list(args[1:])
            if len(rest) >= 3:
                rest = rest[:2]  # drop a positional fill value: tangents pad with zero
            return F.pad(t0, *rest, **kw)
        if target is F.max_pool2d:
            kernel = args[1] if len(args) > 1 else kwargs["kernel_size"]
            stride = args[2] if len(args) > 2 else kwargs.get("stride")
            padding = args[3] if len(args) > 3 else kwargs.get("padding", 0)
            dilation = args[4] if len(args) > 4 else kwargs.get("dilation", 1)
            ceil = args[5] if len(args) > 5 else kwargs.get("ceil_mode", False)
            return _max_pool(t0, args[0], k, cache, node, kernel, stride, padding, dilation, ceil)
        if target in _LINEAR_FUNCTIONS:
            return target(t0, *args[1:], **kwargs)
        if target in _ELEMENTWISE_FUNCTIONS:
            return _per_image(t0, derivative(lambda x: target(x, *args[1:], **kwargs), args[0]), k)
        raise ValueError(f"no tangent rule for {node.format_node()}")



class Linearized:
    """A graph at one primal point: pushes batches of tangents through its derivative."""

    def __init__(self, graph: TangentGraph, primal: dict[fx.Node, Any]):
        self.graph = graph
        self.primal = primal
        self.cache: dict[fx.Node, Any] = {}

    def push(self, tangents: torch.Tensor, k: int) -> torch.Tensor:
        """Returns the output's tangents (k·B, ...) for tangents (k·B, ...) of the first input."""
        primal = self.primal
        tangent: dict[fx.Node, torch.Tensor | None] = {}
        for node in self.graph.module.graph.nodes:
            if node.op == "placeholder":
                tangent[node] = tangents if not tangent else None  # the first input carries them
            elif node.op == "output":
                out = node.args[0]
                out = out[0] if isinstance(out, (tuple, list)) else out
                t = tangent.get(out)
                p = primal[out]
                return t if t is not None else p.new_zeros(k * p.shape[0], *p.shape[1:])
            elif any(tangent.get(n) is not None for n in node.all_input_nodes):
                args = fx.map_arg(node.args, lambda n: primal[n])
                kwargs = fx.map_arg(node.kwargs, lambda n: primal[n])
                tangent[node] = self.graph._tangent(node, args, kwargs, primal, tangent, k, self.cache)
            else:
                tangent[node] = None
        raise RuntimeError("graph has no output")


def _max_pool(t: torch.Tensor, x: torch.Tensor, k: int, cache: dict, node: fx.Node, kernel, stride,
              padding, dilation, ceil_mode) -> torch.Tensor:
    """Max pooling passes on the tangent at each window's argmax in the primal."""
    if node not in cache:
        pooled, index = F.max_pool2d(x, kernel, stride or kernel, padding, dilation, ceil_mode,
                                     return_indices=True)
        # Indices address each (image, channel)'s flattened unpadded map.
        cache[node] = (index.reshape(index.shape[0], index.shape[1], -1), pooled.shape[2:])
    index, spatial = cache[node]
    flat_t = t.reshape(t.shape[0], t.shape[1], -1)
    return flat_t.gather(2, index.repeat(k, 1, 1)).view(t.shape[0], t.shape[1], *spatial)


def _derivative(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The elementwise derivative of an elementwise `fn` at `x` (the gradient of its sum)."""
    with torch.enable_grad():
        # On a copy: the primal must stay untouched even if fn works in place.
        x_ = x.detach().clone().requires_grad_(True)
        y = fn(x_)
        (grad,) = torch.autograd.grad(y, x_, torch.ones_like(y))
    return grad
