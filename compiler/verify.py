"""The IR verifier: structural and type invariants every graph must keep, before and after any pass.

A failure is a compiler bug, not a user error: `IRError` names the node and the broken invariant
(and, when run by the pass manager, the pass that broke it).
"""

from __future__ import annotations

import networkx as nx

from .ir import NODE, SLOTS, Graph, Ref
from .printer import format_node
from .registry import REGISTRY, OpError
from .summary import op_call


class IRError(Exception):
    pass


def verify(graph: Graph) -> None:
    """Raise IRError if `graph` breaks an invariant; return None otherwise."""
    g = graph.g
    if not nx.is_directed_acyclic_graph(g):
        raise IRError(f"graph {graph.name} has a cycle: {nx.find_cycle(g)}")
    seen_params: dict[str, int] = {}
    for nid in g.nodes:
        data = g.nodes[nid]
        if NODE not in data:
            raise IRError(f"node {nid} has no payload")
        node = data[NODE]
        where = f"%{nid} ({format_node(nid, node)})"
        if node.op not in REGISTRY:
            raise IRError(f"{where}: unknown op '{node.op}'")
        expected: dict[int, list[int]] = {}
        for slot, ref in enumerate(node.inputs):
            if ref.node not in g.nodes:
                raise IRError(f"{where}: input {slot} refers to missing node %{ref.node}")
            if not 0 <= ref.index < len(g.nodes[ref.node][NODE].outputs):
                raise IRError(f"{where}: input {slot} refers to output {ref.index} of %{ref.node}, which has "
                              f"{len(g.nodes[ref.node][NODE].outputs)}")
            expected.setdefault(ref.node, []).append(slot)
        actual = {u: sorted(g.edges[u, nid][SLOTS]) for u in g.predecessors(nid)}
        if actual != expected:
            raise IRError(f"{where}: edges {actual} do not mirror inputs {expected}")
        if node.op == "input":
            continue
        try:
            outs = REGISTRY[node.op].infer(op_call(graph, nid))
        except OpError as e:
            raise IRError(f"{where}: shape rule fails: {e.message}") from None
        outs = outs if isinstance(outs, tuple) else (outs,)
        if tuple(outs) != node.outputs:
            raise IRError(f"{where}: recorded types {[str(t) for t in node.outputs]} differ from inferred "
                          f"{[str(t) for t in outs]}")
        for name in node.param_names():
            if name in seen_params:
                raise IRError(f"{where}: parameter {name} also owned by %{seen_params[name]}")
            seen_params[name] = nid
    names = set()
    for name, nid in graph.inputs:
        if nid not in g.nodes or g.nodes[nid][NODE].op != "input":
            raise IRError(f"input {name} is not an input node")
        names.add(name)
    for name, ref in graph.outputs:
        if not isinstance(ref, Ref) or ref.node not in g.nodes:
            raise IRError(f"output {name} refers to a missing node")
