"""Structured pruning: attention heads and MLP hidden neurons physically removed.

An approximate rewrite (it changes the function), so it is not in the -O pipeline: `specc prune`
(specc/pruning.py) chooses what to keep under a FLOP budget and calls `prune_structure` here.

    layers = prunable_layers(graph)                   # every attention / mlp layer, its units and their cost
    result = prune_structure(graph, {"h.0.attention": [0, 2, 3], "h.1.mlp": range(100)})

The rewrite keeps each layer's output type, so nothing downstream changes: an attention layer keeping
heads K gets heads=len(K) and head_dim=d/heads (its old head width), q/k/v projections restricted to
those heads' rows and the output projection to their columns; an mlp keeping neurons N gets
hidden=len(N), fc1's rows N and fc2's columns N. The new parameters are weight expressions
(compiler/weightexpr.py: "rows" / "cols") over the graph's parameters, evaluated by the backend in
float64; so the pruned layer computes exactly what the unpruned one computes with the removed heads'
(neurons') outputs zeroed before the output projection (fc2). Every layer keeps at least one unit: an
attention layer with all heads masked still adds its output bias, so removing the layer whole would not
be that function (and a spec may read the layer's output elsewhere than in a residual sum).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Mapping

from ..dims import evaluate
from ..ir import NODE, Graph, Node
from ..rewrite import Editor
from ..registry import REGISTRY
from ..summary import node_flops, op_call
from ..verify import verify
from ..weightexpr import cols, rows
from . import PassResult
from .fusion import source

#: Ops whose units this rewrite removes: attention heads, mlp hidden neurons.
PRUNABLE_OPS = {"attention": "heads", "mlp": "neurons"}


class PruneError(ValueError):
    """A layer cannot be pruned as asked (`layer`: its parameter path)."""

    def __init__(self, layer: str, message: str):
        super().__init__(message)
        self.layer, self.message = layer, message


@dataclass(frozen=True)
class Layer:
    """A layer whose units pruning may remove (or why not: `reason`)."""

    path: str  # parameter path, e.g. "h.0.attention"
    op: str  # "attention" or "mlp"
    nid: int
    units: int  # heads or hidden neurons
    unit_width: int  # head_dim (attention), 1 (mlp)
    flops: int  # the layer's FLOPs at the example dimensions (or the sizes prunable_layers was given)
    reason: str | None = None  # why it is left whole (None: prunable)

    @property
    def kind(self) -> str:
        return PRUNABLE_OPS[self.op]

    @property
    def flops_per_unit(self) -> int:
        """The FLOPs one unit costs: a layer's FLOPs are a sum of terms each proportional to its heads
        (neurons) at a fixed head width, so this is exact."""
        return self.flops // self.units


def _head_dim(node: Node) -> int:
    inner = next(p for p in node.params if p.name == "o.weight").shape[1]  # heads * head_dim
    return inner // node.attr("heads")


def prunable_layers(graph: Graph, sizes: Mapping[str, int] | None = None) -> list[Layer]:
    """Every attention and mlp layer of `graph` in node order, with its unit count and FLOPs at the
    example dimensions (those in `sizes` replaced); `reason` says why a layer is left whole."""
    ed = Editor(graph)
    bindings = {**graph.example_bindings(), **(sizes or {})}
    out = []
    for nid, node in graph.nodes():
        if node.op not in PRUNABLE_OPS:
            continue
        path = ".".join(node.path)
        reason = None
        if ed.shares(node):
            reason = "its parameters are shared with another layer (tie= or share=)"
        if node.op == "attention":
            units, width = node.attr("heads"), _head_dim(node)
            kv_heads = node.attr("kv_heads")
            if kv_heads is not None and kv_heads != units:
                reason = (f"it has grouped-query attention (kv_heads={kv_heads} < heads={units}): its query heads "
                          f"share key/value heads, and removing heads one at a time is not supported")
            elif node.attr("prefix?"):
                reason = "it has a prefix= input (rows of every head's width)"
            elif node.attr("mask?"):
                x = graph.type_of(node.inputs[0])
                mask = graph.type_of(node.inputs[1 + bool(node.attr("kv?"))])
                if mask.rank == x.rank + 1 and mask.shape[-3] != 1:
                    reason = "its mask has one slice per head"
        else:
            units, width = node.attr("hidden"), 1
        flops = evaluate(node_flops(graph, nid), bindings)
        if units <= 1 and reason is None:
            reason = f"it has a single {PRUNABLE_OPS[node.op][:-1]}"
        out.append(Layer(path, node.op, nid, units, width, flops, reason))
    return out


def _param(node: Node, name: str):
    return next((p for p in node.params if p.name == name), None)


def _sliced(node: Node, name: str, index: tuple[int, ...], axis: int):
    """Parameter `name` of `node` restricted to `index` along `axis` (0: rows, 1: columns)."""
    p = _param(node, name)
    shape = list(p.shape)
    shape[axis] = len(index)
    derive = (rows if axis == 0 else cols)(source(node, name), index)
    return dataclasses.replace(p, shape=tuple(shape), derive=derive)


def _prune_attention(node: Node, heads: tuple[int, ...]) -> Node:
    dh = _head_dim(node)
    inner = node.attr("heads") * dh
    cols_kept = tuple(h * dh + j for h in heads for j in range(dh))
    new = {}
    if node.attr("qkv"):
        fused = tuple(part * inner + i for part in range(3) for i in cols_kept)
        new["qkv.weight"] = _sliced(node, "qkv.weight", fused, 0)
        if _param(node, "qkv.bias") is not None:
            new["qkv.bias"] = _sliced(node, "qkv.bias", fused, 0)
    else:
        for proj in "qkv":
            new[f"{proj}.weight"] = _sliced(node, f"{proj}.weight", cols_kept, 0)
            if _param(node, f"{proj}.bias") is not None:
                new[f"{proj}.bias"] = _sliced(node, f"{proj}.bias", cols_kept, 0)
    new["o.weight"] = _sliced(node, "o.weight", cols_kept, 1)
    params = tuple(new.get(p.name, p) for p in node.params)
    changed = {"heads": len(heads), "head_dim": dh}
    if node.attr("kv_heads") is not None:  # kv_heads = heads (grouped-query attention is left whole)
        changed["kv_heads"] = len(heads)
    attrs = tuple((k, changed.get(k, v)) for k, v in node.attrs)
    if "head_dim" not in dict(attrs):  # a node made without the argument (it defaults to none)
        attrs += (("head_dim", dh),)
    return node.replace(attrs=attrs, params=params)


def _prune_mlp(node: Node, neurons: tuple[int, ...]) -> Node:
    new = {"fc1.weight": _sliced(node, "fc1.weight", neurons, 0), "fc2.weight": _sliced(node, "fc2.weight", neurons, 1)}
    if _param(node, "fc1.bias") is not None:
        new["fc1.bias"] = _sliced(node, "fc1.bias", neurons, 0)
    params = tuple(new.get(p.name, p) for p in node.params)
    attrs = tuple((k, len(neurons) if k == "hidden" else v) for k, v in node.attrs)
    return node.replace(attrs=attrs, params=params)


def prune_structure(graph: Graph, keep: Mapping[str, Iterable[int]]) -> PassResult:
    """`graph` with, for each layer path in `keep`, only the listed heads (attention) or hidden neurons
    (mlp) left, physically removed from its parameters. Raises PruneError for a path that is not a
    prunable layer, an index out of range or repeated, or an empty list (a layer keeps one unit at least).

    notes: {path: {"kind", "before", "after", "removed": [indices]}} for every layer that changed."""
    layers = {layer.path: layer for layer in prunable_layers(graph)}
    ed = Editor(graph)
    notes = {}
    for path, index in keep.items():
        layer = layers.get(path)
        if layer is None:
            raise PruneError(path, f"'{path}' is not an attention or mlp layer"
                             + (f" (layers: {', '.join(layers)})" if layers else ""))
        kept = tuple(int(i) for i in index)
        if not kept:
            raise PruneError(path, f"'{path}' must keep one {layer.kind[:-1]} at least")
        if len(set(kept)) != len(kept) or any(not 0 <= i < layer.units for i in kept):
            raise PruneError(path, f"'{path}': {layer.kind} to keep must be distinct and in range({layer.units}), "
                                   f"got {list(kept)}")
        if len(kept) == layer.units:
            continue
        if layer.reason is not None:
            raise PruneError(path, f"'{path}' cannot be pruned: {layer.reason}")
        kept = tuple(sorted(kept))
        node = ed.node(layer.nid)
        ed.set(layer.nid, _prune_attention(node, kept) if layer.op == "attention" else _prune_mlp(node, kept))
        notes[path] = {"kind": layer.kind, "before": layer.units, "after": len(kept),
                       "removed": [i for i in range(layer.units) if i not in kept]}
    if not notes:
        return PassResult(graph, False)
    verify(ed.graph)
    for path in notes:  # the sliced parameters have the shapes the op's rule gives the new attributes
        nid = layers[path].nid
        node = ed.graph.node(nid)
        rule = {p.name: p for p in REGISTRY[node.op].layer_params(op_call(ed.graph, nid))}
        assert {n: p.shape for n, p in rule.items()} == {p.name: p.shape for p in node.params}, path
        # the rule's initialisers for the new widths (values come from the old parameters, as before)
        old = {p.name: p.init for p in REGISTRY[node.op].layer_params(op_call(graph, nid))}
        params = tuple(dataclasses.replace(p, init=rule[p.name].init) if p.init == old[p.name] else p
                       for p in node.params)
        ed.graph.g.nodes[nid][NODE] = node.replace(params=params)
    return PassResult(ed.graph, True, notes)


__all__ = ["Layer", "PruneError", "PRUNABLE_OPS", "prunable_layers", "prune_structure"]
