"""A text form of the IR that people can read: one node per line with its type and source location.

    %3: f32[B, T, 64] = linear(%2, out=64, bias=true)  @h.0.q {weight: f32[64, 64], bias: f32[64]}  # gpt.yaml:12:5
"""

from __future__ import annotations

from typing import Any

from .dims import fmt
from .ir import Graph, Node, Ref, slice_step
from .registry import REGISTRY


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    return fmt(v) if not isinstance(v, int) else str(v)


def format_node(nid: int, node: Node, show_span: bool = True, relative_to: str | None = None,
                defaults: dict[str, Any] | None = None) -> str:
    """One node as text. defaults: the op's own initialiser of each parameter, by name; a parameter
    whose initialiser differs (an explicit init=) shows it."""
    if len(node.outputs) == 1:
        lhs = f"%{nid}: {node.outputs[0]}"
    else:
        lhs = ", ".join(f"{Ref(nid, i)}: {t}" for i, t in enumerate(node.outputs))
    args = [str(r) for r in node.inputs]
    opdef = REGISTRY.get(node.op)
    for k, v in node.attrs:
        if k.endswith("#") or k.endswith("?"):
            continue
        arg = opdef.arg(k) if opdef is not None else None
        if arg is not None and not arg.shown and v == arg.default:
            continue
        if k == "tie" and v is not None:
            args.append(f"tie=@{v[0]}")
            continue
        if node.op == "getitem" and k == "index":
            v = _format_index(v)
            args.append(f"index=[{v}]")
            continue
        args.append(f"{k}={format_value(v)}")
    line = f"{lhs} = {node.op}({', '.join(args)})"
    if node.params:
        ps = ", ".join(f"{p.name}: {p.dtype}[{', '.join(map(str, p.shape))}]"
                       + (" buffer" if p.buffer else " frozen" if p.frozen else "")
                       + (f" init={_init_text(p.init)}" if defaults is not None and p.name in defaults
                          and p.init != defaults[p.name] and p.derive is None and not p.tied_to else "")
                       + (f" = @{p.tied_to}" if p.tied_to else "") for p in node.params)
        line += f"  @{'.'.join(node.path)} {{{ps}}}"
    if show_span:
        line += f"  # {node.span}"
    return line


def _format_index(items) -> str:
    out = []
    for it in items:
        if it[0] == "int":
            out.append(str(it[1]))
        else:
            s = "" if it[1] is None else fmt(it[1])
            e = "" if it[2] is None else fmt(it[2])
            step = slice_step(it)
            out.append(f"{s}:{e}" + (f":{step}" if step != 1 else ""))
    return ", ".join(out)


def _init_text(init) -> str:
    """An initialiser as a spec would write it: zeros, normal(0.02, 0)."""
    return init.kind if not init.args else str(init)


def _default_inits(graph: Graph, nid: int) -> dict[str, Any] | None:
    """The initialisers the op itself gives a node's parameters (None if it owns none)."""
    from .registry import REGISTRY
    from .summary import op_call

    node = graph.node(nid)
    opdef = REGISTRY.get(node.op)
    if not node.params or opdef is None or opdef.params is None:
        return None
    try:
        return {p.name: p.init for p in opdef.params(op_call(graph, nid))}
    except Exception:  # a node rewritten by a pass may no longer match its op's parameter rule
        return None


def print_graph(graph: Graph, show_span: bool = True) -> str:
    """The whole graph as text: header, dims, one line per node, outputs."""
    lines = [f"graph {graph.name}"]
    if graph.params:
        lines.append("  params " + ", ".join(f"{k}={format_value(v)}" for k, v in graph.params.items()))
    if graph.dims:
        parts = []
        for s, (ex, lo, hi) in graph.dims.items():
            bound = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo != 1 else "")
            parts.append(f"{s}={ex}{bound}")
        lines.append("  dims " + ", ".join(parts))
    for nid, node in graph.nodes():
        lines.append("  " + format_node(nid, node, show_span, defaults=_default_inits(graph, nid)))
    lines.append("  return " + ", ".join(f"{name}={ref}" for name, ref in graph.outputs))
    return "\n".join(lines) + "\n"
