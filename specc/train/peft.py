"""Adapters and prefixes as a training transform on an existing spec: the spec's IR with every
parameter frozen and new, trained layers inserted at named layers, before the model is built.

Unlike LoRA (`lora.py`), neither can fold into the base weights, so they are part of the graph that
is trained and of the `specc build` output RUN/model/, and the generated model.py names them:

- a Houlsby adapter after layer L (`kind: houlsby`): L's output h becomes h + s * up(relu(down(h)));
- a scaled parallel adapter beside L (`kind: parallel`): L's output becomes L(x) + s * up(relu(down(x))),
  reading L's input x;
- a prefix of attention layer L: a learned [2, l, w] parameter fed to L's `prefix=` input (l key rows
  and l value rows before the projected keys and values), w the width of those keys and values:
  heads * head_dim (the model width d unless L has head_dim=; kv_heads * head_dim for grouped-query
  attention, kv_heads=). Rotary embeddings (rope=) leave the
  prefix rows unrotated.

An adapter is a block instance `L_adapter` (the sibling of L: `h.0.attention_adapter.down.weight`,
`self.attention_adapter(...)` in model.py) whose `up` projection starts at zero, so the transformed
model starts out computing what the spec's model computes. A prefix is a parameter node `L_prefix`
(`h.0.attention_prefix.weight`) drawn from N(0, 1) like `parameter(...)`'s, so attention over [P_k; K]
is (1 - lambda) Attn(K, V) + lambda Attn(P_k, P_v) from the start.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from specc.compiler.ir import FLOAT_DTYPES, Frame, Graph, Init, Node, Ref
from specc.compiler.ops import attention_kv_inner
from specc.compiler.registry import REGISTRY, OpCall, OpError
from specc.compiler.rewrite import Editor
from specc.compiler.summary import op_call

#: Layers an adapter may follow or sit beside: they map the last axis (features) to the last axis.
ADAPTER_OPS = frozenset({"linear", "attention", "mlp"})
#: Layers that take a prefix.
PREFIX_OPS = frozenset({"attention"})
#: The default factor of an adapter's output, by kind (He et al.'s s = 4 for the parallel adapter).
DEFAULT_SCALE = {"houlsby": 1.0, "parallel": 4.0}


class PeftError(Exception):
    """A layer that cannot take the adapter or prefix asked for; `layer` names it, `key` says which
    ("adapters" or "prefix")."""

    def __init__(self, layer: str, message: str, key: str = "adapters"):
        super().__init__(message)
        self.layer, self.message, self.key = layer, message, key


def layers(graph: Graph, ops: frozenset[str]) -> dict[str, int]:
    """Paths of the layers of `graph` made by one of `ops` (as `specc ir -O0` names them) -> node id."""
    return {".".join(node.path): nid for nid, node in graph.nodes() if node.op in ops and node.path}


def transform(graph: Graph, adapters: list[str] = (), bottleneck: int = 16, kind: str = "houlsby",
              scale: float | None = None, prefixes: list[str] = (), length: int = 8) -> Graph:
    """`graph` with every parameter frozen, an adapter at each layer of `adapters` and a prefix for each
    attention layer of `prefixes` (layer paths). Raises PeftError for a layer that cannot take one."""
    ed = Editor(graph)
    for nid, node in list(ed.graph.nodes()):
        if node.params:
            ed.set(nid, node.replace(params=tuple(dataclasses.replace(p, frozen=True) for p in node.params)))
    by_path = layers(ed.graph, ADAPTER_OPS | PREFIX_OPS)
    s = DEFAULT_SCALE[kind] if scale is None else float(scale)
    for path in prefixes:
        _prefix(ed, by_path[path], path, length)
    for path in adapters:
        _adapter(ed, by_path[path], path, bottleneck, kind, s)
    return ed.graph


# -- building nodes ---------------------------------------------------------------------------

def _node(graph: Graph, op: str, inputs: dict[str, Ref], attrs: dict[str, Any], like: Node, name: str,
          scope: tuple[Frame, ...], path: tuple[str, ...] = (), init: dict[str, Init] | None = None) -> Node:
    """A node of `op` as the elaborator makes it: types and parameters from the op's own rules."""
    opdef = REGISTRY[op]
    tensors = {a.name: graph.type_of(inputs[a.name]) if a.name in inputs else None for a in opdef.tensor_args}
    values = {a.name: attrs.get(a.name, a.default) for a in opdef.args if not a.is_tensor}
    call = OpCall(op, tensors, values, {k: (lo, hi) for k, (_, lo, hi) in graph.dims.items()})
    outs = opdef.infer(call)
    params = opdef.layer_params(call)
    params = tuple(dataclasses.replace(p, init=(init or {}).get(p.name, p.init)) for p in params)
    stored = []
    for a in opdef.args:
        if a.kind == "tensor?":
            stored.append((f"{a.name}?", a.name in inputs))
        elif not a.is_tensor:
            stored.append((a.name, values[a.name]))
    return Node(op, tuple(inputs[a.name] for a in opdef.tensor_args if a.name in inputs), tuple(stored),
                outs if isinstance(outs, tuple) else (outs,), like.span, name=name, scope=scope,
                params=params, path=path)


def _add(ed: Editor, *args, **kwargs) -> Ref:
    return Ref(ed.add(_node(ed.graph, *args, **kwargs)))


def _free_name(ed: Editor, parent: tuple[str, ...], base: str) -> str:
    """`base`, or base_2, base_3...: a name no module of the instance at `parent` has."""
    taken = {n.path[len(parent)] for _, n in ed.graph.nodes() if n.path[:len(parent)] == parent
             and len(n.path) > len(parent)}
    taken |= {f.name for _, n in ed.graph.nodes() for i, f in enumerate(n.scope)
              if tuple(seg for g in n.scope[:i] for seg in g.segments) == parent}
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def _place(ed: Editor, nid: int, path: str) -> tuple[Node, tuple[str, ...]]:
    node = ed.node(nid)
    parent = tuple(seg for f in node.scope for seg in f.segments)
    if node.path[:-1] != parent:  # pragma: no cover - the elaborator names layers after their instance
        raise PeftError(path, f"'{path}' does not sit in its block's module")
    return node, parent


def _reroute(ed: Editor, old: Ref, new: Ref, readers: list[int], output: bool) -> None:
    """The readers of `old` (taken before new nodes read it) and the graph outputs read `new` instead."""
    for u in readers:
        n = ed.node(u)
        ed.set(u, n.replace(inputs=tuple(new if r == old else r for r in n.inputs)))
    if output:
        ed.graph.outputs = tuple((name, new if r == old else r) for name, r in ed.graph.outputs)


def _adapter(ed: Editor, nid: int, path: str, bottleneck: int, kind: str, s: float) -> None:
    node, parent = _place(ed, nid, path)
    if len(node.outputs) != 1:
        raise PeftError(path, f"'{path}' has {len(node.outputs)} results; an adapter needs a layer with one")
    out = Ref(nid)
    x = out if kind == "houlsby" else node.inputs[0]
    ty, x_ty = ed.graph.type_of(out), ed.graph.type_of(x)
    if ty.dtype not in FLOAT_DTYPES or x_ty.dtype not in FLOAT_DTYPES or ty.rank < 1 \
            or not isinstance(ty.shape[-1], int) or not isinstance(x_ty.shape[-1], int):
        raise PeftError(path, f"'{path}' ({node.op}) maps {x_ty} to {ty}; an adapter needs float tensors of "
                              f"fixed width")
    readers, output = ed.users(out), ed.is_output(out)
    attr = _free_name(ed, parent, f"{node.path[-1]}_adapter")
    scope = node.scope + (Frame("adapter", attr),)
    here = parent + (attr,)
    try:
        down = _add(ed, "linear", {"x": x}, {"out": bottleneck}, node, "down", scope, here + ("down",))
        act = _add(ed, "relu", {"x": down}, {}, node, "relu", scope)
        zeros = {"weight": Init("zeros"), "bias": Init("zeros")}
        y = _add(ed, "linear", {"x": act}, {"out": ty.shape[-1]}, node, "up", scope, here + ("up",), init=zeros)
        if s != 1.0:
            k = _add(ed, "scalar", {}, {"value": s, "dtype": ty.dtype}, node, "scalar", scope)
            y = _add(ed, "mul", {"x": k, "y": y}, {}, node, "mul", scope)
        total = _add(ed, "add", {"x": out, "y": y}, {}, node, node.name or node.path[-1], node.scope)
    except OpError as e:
        raise PeftError(path, f"'{path}' cannot take an adapter: {e.message}") from None
    ed.graph.block_args[scope] = (("x" if kind == "parallel" else node.name or "h", x),)
    _reroute(ed, out, total, readers, output)


def _prefix(ed: Editor, nid: int, path: str, length: int) -> None:
    node, parent = _place(ed, nid, path)
    if node.attr("prefix?"):
        raise PeftError(path, f"'{path}' has a prefix already (prefix= in the spec)", "prefix")
    width = attention_kv_inner(op_call(ed.graph, nid))  # (kv_)heads * head_dim: the model width unless head_dim= says
    attr = _free_name(ed, parent, f"{node.path[-1]}_prefix")
    p = _add(ed, "parameter", {}, {"shape": (2, length, width)}, node, attr, node.scope, parent + (attr,))
    if ed.graph.type_of(p).dtype != ed.graph.type_of(node.inputs[0]).dtype:
        raise PeftError(path, f"'{path}' attends over {ed.graph.type_of(node.inputs[0])}; a prefix is f32", "prefix")
    attrs = tuple((k, True if k == "prefix?" else v) for k, v in node.attrs)
    ed.set(nid, node.replace(inputs=node.inputs + (p,), attrs=attrs))


def of_recipe(graph: Graph, recipe) -> Graph:
    """The graph a recipe trains: `graph` transformed by its adapters and prefixes (itself without)."""
    if not recipe.adapter_layers and not recipe.prefix_layers:
        return graph
    a, p = recipe.section.adapters, recipe.section.prefix
    return transform(graph, list(recipe.adapter_layers), a.bottleneck if a else 16, a.kind if a else "houlsby",
                     a.scale if a else None, list(recipe.prefix_layers), p.length if p else 8)


def initial_weights(base: Graph, graph: Graph, seed: int) -> dict:
    """The parameters of the transformed `graph`: the base's as the spec's seed makes them (so the
    transformed model starts from the spec's model), the new ones drawn from `seed` (the recipe's)."""
    from specc.backends.pytorch.weights import init_weights

    return init_weights(graph, seed=seed, given=init_weights(base))
