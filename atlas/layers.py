"""Layers by dotted `named_modules()` path: listing, checking, and running a model in pieces.

`LayerTap` splits a model's graph (traced with torch.fx) at the requested layers, so that one
pass returns every layer's activations and stops at the deepest one, and the rest of the network
can be run from any one layer to the logits. Running "from a layer" is what attribution needs:
h · ∂logit/∂h for every class at once is a forward-mode derivative of the rest of the network.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import AtlasError
from .layer_maps import LayerMap, from_map, prefix_of, resolve_maps, to_map
from .tangents import TangentGraph


def layer_names(model: nn.Module) -> list[str]:
    """Returns the dotted path of every submodule, in definition order (the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def check_layers(model: nn.Module, names: Sequence[str], model_name: str = "MODEL") -> None:
    """Raises AtlasError naming the closest valid layers for any name that is not a submodule."""
    known = set(layer_names(model))
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.5)
            hint = f"closest: {', '.join(close)}; " if close else ""
            raise AtlasError(f"unknown layer {name!r} in model {model_name}; {hint}"
                             f"`atlas layers {model_name}` lists every layer")


@torch.no_grad()
def layer_shapes(model: nn.Module, input_shape: Sequence[int],
                 names: Sequence[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Returns the output shape (without batch) of each named layer for one zero input.

    Layers that are not called by the forward pass, or whose output is not a tensor, are left out.
    """
    wanted = set(names) if names is not None else set(layer_names(model))
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and name not in shapes:
                shapes[name] = tuple(output.shape[1:])
        return hook

    try:
        for name, module in model.named_modules():
            if name in wanted:
                handles.append(module.register_forward_hook(make_hook(name)))
        was_training = model.training
        model.eval()
        try:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            model(torch.zeros(1, *input_shape, device=device))
        finally:
            model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    order = {name: i for i, name in enumerate(layer_names(model))}
    return dict(sorted(shapes.items(), key=lambda item: order[item[0]]))


def map_shapes(model: nn.Module, input_shape: Sequence[int], layers: Sequence[str],
               layout: str | Mapping[str, str] = "auto", prefix: int | str = "auto", model_name: str = "MODEL"
               ) -> tuple[dict[str, LayerMap], dict[str, tuple[int, int, int]]]:
    """How each layer's output reads as a map (`layer_maps.resolve_maps`), and the (C, H, W) of
    each map, for one input of `input_shape`.

    Raises:
        AtlasError: an unknown layer (naming the closest), or one line naming the shape of a
            layer whose output is not a map.
    """
    check_layers(model, layers, model_name)
    shapes = layer_shapes(model, input_shape, layers)
    maps = resolve_maps(model, shapes, layers, layout, prefix)
    return maps, {layer: maps[layer].map_shape(shapes[layer]) for layer in layers}


def _compact(module: fx.GraphModule) -> fx.GraphModule:
    """Drops the nodes a split graph no longer needs (a dead branch would still cost time)."""
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def _disable_inplace(model: nn.Module) -> None:
    """Turns off in-place activations (same results): a layer's output must not be overwritten
    by the next module, since it is returned as the layer's activations and reused as the primal
    point of attribution."""
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False


def _trace_through(module: fx.GraphModule) -> fx.GraphModule:
    """The graph with the requested layers deeper than its cut traced through.

    Those layers are single call_module nodes in a rest-of-network graph (so the network can be
    cut at them too), but the tangent rules need the operations inside them. Returns the graph
    unchanged when it cannot be traced again (the tangents then take the vmap(jvp) route).
    """
    try:
        traced = fx.symbolic_trace(module)
    except Exception:  # fx raises many types for untraceable Python control flow
        return module
    for node in traced.graph.nodes:
        if node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
    traced.recompile()
    return traced


class _LeafTracer(fx.Tracer):
    """Traces through containers but keeps the requested layers as single call_module nodes."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


@dataclass
class TapOutput:
    """What one pass of `LayerTap.run` produced for a batch.

    acts: layer -> (B, C, H, W) activations. logits: (B, n_classes) or None.
    saved: values the rest-of-network graphs need besides the layer itself.
    """

    acts: dict[str, torch.Tensor]
    logits: torch.Tensor | None
    saved: list[torch.Tensor]


class LayerTap:
    """Runs a model to a set of layers, and from any of them on to the logits.

    Args:
        model: an nn.Module in eval mode (it is traced as it is; train mode is not restored).
        layers: dotted `named_modules()` paths; each must be called exactly once by forward.
        model_name: how the user named the model, for error messages.
        maps: layer -> LayerMap, how each layer's output reads as a (C, H, W) map (`layer_maps`);
            default channels-first for every layer. The network is cut at the map, so `run`
            returns maps and the rest of the network is run from a map (with any prefix tokens
            passed on as saved values).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], model_name: str = "MODEL",
                 maps: Mapping[str, LayerMap] | None = None):
        self.model = model
        self.layers = tuple(layers)
        self.maps = {layer: (maps or {}).get(layer, LayerMap()) for layer in self.layers}
        check_layers(model, self.layers, model_name)
        _disable_inplace(model)
        try:
            graph = _LeafTracer(set(self.layers)).trace(model)
        except Exception as exc:  # fx raises many types for untraceable Python control flow
            raise AtlasError(f"the model cannot be traced by torch.fx ({type(exc).__name__}: {exc}); "
                             "atlas needs a traceable forward to split the network at a layer") from None
        for node in graph.nodes:  # functional calls too: F.relu(x, inplace=True)
            if node.kwargs.get("inplace"):
                node.kwargs = {**node.kwargs, "inplace": False}
        self._nodes = list(graph.nodes)
        self._pos = {node: i for i, node in enumerate(self._nodes)}
        self._layer_node = {}
        for layer in self.layers:
            calls = [n for n in self._nodes if n.op == "call_module" and n.target == layer]
            if len(calls) != 1:
                why = "is never called" if not calls else f"is called {len(calls)} times"
                raise AtlasError(f"layer {layer!r} {why} by the model's forward pass; pick another layer "
                                 "from `atlas layers`")
            self._layer_node[layer] = _cut_at_map(graph, calls[0], self.maps[layer])
        self._nodes = list(graph.nodes)
        self._pos = {node: i for i, node in enumerate(self._nodes)}
        self.deepest = max(self.layers, key=lambda name: self._pos[self._layer_node[name]])
        self._output = next(n for n in self._nodes if n.op == "output")
        # For each layer, the earlier values the rest of the network reads besides the layer itself.
        self._rest_inputs = {layer: self._inputs_after(self._layer_node[layer]) for layer in self.layers}
        saved: list[fx.Node] = []
        for layer in self.layers:
            saved.extend(n for n in self._rest_inputs[layer] if n not in saved)
        self._saved = saved
        self.front = self._front_module(with_saved=False)
        self.front_saved = self._front_module(with_saved=True)
        self.rest = {layer: self._rest_module(layer) for layer in self.layers}
        self._tangent_graphs: dict[str, TangentGraph] = {}

    def _inputs_after(self, cut: fx.Node) -> list[fx.Node]:
        pos = self._pos[cut]
        needed: list[fx.Node] = []
        for node in self._nodes[pos + 1:]:
            for arg in node.all_input_nodes:
                if self._pos[arg] <= pos and arg is not cut and arg not in needed:
                    needed.append(arg)
        return needed

    def _front_module(self, with_saved: bool) -> fx.GraphModule:
        """The graph up to the deepest layer, returning (layer values..., saved values...)."""
        end = self._pos[self._layer_node[self.deepest]]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in self._nodes[: end + 1]:
            env[node] = graph.node_copy(node, lambda n: env[n])
        outs = [env[self._layer_node[layer]] for layer in self.layers]
        if with_saved:
            outs += [env[n] for n in self._saved]
        graph.output(tuple(outs))
        return _compact(fx.GraphModule(self.model, graph))

    def _rest_module(self, layer: str) -> fx.GraphModule:
        """The graph from `layer` to the model output: inputs (h, *rest_inputs) -> logits."""
        cut = self._layer_node[layer]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {cut: graph.placeholder("h")}
        for i, node in enumerate(self._rest_inputs[layer]):
            env[node] = graph.placeholder(f"saved_{i}")
        for node in self._nodes[self._pos[cut] + 1:]:
            if node.op == "output":
                graph.output(fx.map_arg(node.args[0], lambda n: env[n]))
            else:
                env[node] = graph.node_copy(node, lambda n: env[n])
        return _compact(fx.GraphModule(self.model, graph))

    def run(self, x: torch.Tensor, *, logits: bool) -> TapOutput:
        """One pass over a batch: every layer's activations, and the logits if asked for.

        Without logits the pass stops at the deepest layer.
        """
        if not logits:
            values = self.front(x)
            return TapOutput(dict(zip(self.layers, values)), None, [])
        values = self.front_saved(x)
        acts = dict(zip(self.layers, values[: len(self.layers)]))
        saved = list(values[len(self.layers):])
        out = self._call_rest(self.deepest, acts[self.deepest], saved)
        return TapOutput(acts, out, saved)

    def _call_rest(self, layer: str, h: torch.Tensor, saved: list[torch.Tensor]) -> torch.Tensor:
        index = {node: i for i, node in enumerate(self._saved)}
        args = [saved[index[n]] for n in self._rest_inputs[layer]]
        out = self.rest[layer](h, *args)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise AtlasError("the model's output is not a (batch, classes) tensor of logits; "
                             "set collect.attribution = false and collect.predict = false")
        return out

    def attribute(self, layer: str, tap: TapOutput, yx: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Attribution of sampled positions to every class: h_p · ∂logit_c/∂h_p.

        One forward-mode derivative per position with the tangent equal to h masked to that
        position; the positions of all images run as one batch of tangents over a shared primal
        point, through `TangentGraph` where the graph's layers allow, else through vmap(jvp).

        Args:
            layer: one of `self.layers`.
            tap: the output of `run(x, logits=True)` for the batch.
            yx: (B, k, 2) int64 positions in the layer's activation map, k per image.
            chunk: at most this many (image, position) tangents per vectorised pass.

        Returns:
            (B, k, n_classes) float32.
        """
        h = tap.acts[layer].detach()
        b, k = yx.shape[:2]
        index = {node: i for i, node in enumerate(self._saved)}
        saved = [tap.saved[index[n]] for n in self._rest_inputs[layer]]
        if layer not in self._tangent_graphs:
            self._tangent_graphs[layer] = TangentGraph(_trace_through(self.rest[layer]))
        engine = self._tangent_graphs[layer]
        per_pass = max(1, chunk // max(b, 1))
        if engine.supported:
            outs = []
            with torch.no_grad():
                linear = engine.linearize([h, *saved])
                for j in range(0, k, per_pass):
                    part = yx[:, j:j + per_pass]
                    tangents = _position_tangents(h, part).flatten(0, 1)  # (k'·B, C, H, W)
                    outs.append(linear.push(tangents, part.shape[1]).view(part.shape[1], b, -1))
            out = torch.cat(outs)
        else:  # the general route: slower, but any differentiable graph
            rest = self.rest[layer]

            def tangent_out(t: torch.Tensor) -> torch.Tensor:
                return torch.func.jvp(lambda h_: rest(h_, *saved), (h,), (t,))[1]

            with _forward_mode_attention():
                out = torch.func.vmap(tangent_out, chunk_size=per_pass)(_position_tangents(h, yx))
        return out.permute(1, 0, 2).float().detach()  # (k, B, n) -> (B, k, n)


def _cut_at_map(graph: fx.Graph, node: fx.Node, layer_map: LayerMap) -> fx.Node:
    """The node to cut the graph at for a layer: the layer's own node for a channels-first map,
    else a `to_map` node after it, whose `from_map` inverse feeds everything that read the layer.

    Nodes come in the order layer, prefix, map, inverse, so the prefix tokens are computed before
    the cut and reach the rest of the network as a saved value (with no tangent)."""
    if layer_map.layout == "nchw":
        return node
    users = list(node.users)
    with graph.inserting_after(node):
        prefix = graph.call_function(prefix_of, (node, layer_map.prefix)) \
            if layer_map.layout == "tokens" and layer_map.prefix else None
    with graph.inserting_after(prefix or node):
        as_map = graph.call_function(to_map, (node, layer_map.layout, layer_map.prefix, layer_map.grid))
    with graph.inserting_after(as_map):
        back = graph.call_function(from_map, (as_map, prefix, layer_map.layout))
    for user in users:
        user.replace_input_with(node, back)
    return as_map


@contextlib.contextmanager
def _forward_mode_attention() -> Iterator[None]:
    """Attention through kernels that have forward-mode derivatives: the fused ones
    (nn.MultiheadAttention's fast path, flash and memory-efficient attention) have none."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _position_tangents(h: torch.Tensor, yx: torch.Tensor) -> torch.Tensor:
    """Tangents (k, B, C, H, W): tangent [j, b] is h[b] at position yx[b, j] and zero elsewhere.

    Laid out channels-last within each (B, C, H, W) slice when h is, because convolutions over
    the tangents run several times faster on the CPU in that layout.
    """
    b, c, height, width = h.shape
    k = yx.shape[1]
    if h.dim() == 4 and h.is_contiguous(memory_format=torch.channels_last):
        tangents = torch.zeros((k, b, height, width, c), dtype=h.dtype, device=h.device).permute(0, 1, 4, 2, 3)
    else:
        tangents = torch.zeros((k, b, c, height, width), dtype=h.dtype, device=h.device)
    batch = torch.arange(b, device=h.device)
    for j in range(k):
        ys, xs = yx[:, j, 0], yx[:, j, 1]
        tangents[j, batch, :, ys, xs] = h[batch, :, ys, xs]
    return tangents
