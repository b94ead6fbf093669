"""Pruning passes: the deploy graph derived from training-only marks."""

from __future__ import annotations

from ..dims import symbols
from ..ir import Graph
from ..rewrite import Editor
from . import PassContext, PassResult, register_pass


@register_pass("drop_training_outputs", opt_level=0)
def drop_training_outputs(graph: Graph, ctx: PassContext) -> PassResult:
    """Deploy builds: drop training-only outputs and every node and parameter only they need."""
    if not ctx.deploy or not graph.training_outputs:
        return PassResult(graph, False)
    ed = Editor(graph)
    dropped = [name for name, _ in ed.graph.outputs if name in graph.training_outputs]
    ed.graph.outputs = tuple((name, ref) for name, ref in ed.graph.outputs if name not in graph.training_outputs)
    ed.graph.training_outputs = frozenset()
    before = ed.graph.param_count()
    removed = ed.remove_dead()
    unused = _unused_inputs(ed.graph)
    if unused:
        ed.graph.g.remove_nodes_from(nid for name, nid in ed.graph.inputs if name in unused)
        ed.graph.inputs = tuple((name, nid) for name, nid in ed.graph.inputs if name not in unused)
    ed.changed = True
    notes = {"dropped_outputs": dropped, "removed_nodes": removed,
             "removed_parameters": before - ed.graph.param_count()}
    if unused:
        notes["dropped_inputs"] = unused
    return PassResult(ed.graph, True, notes)


def _unused_inputs(graph: Graph) -> list[str]:
    """Inputs only the dropped outputs read (e.g. DANN's reversal strength): the deploy model does not
    take them, unless one is the only input that carries a symbolic size the graph still uses."""
    def syms(nid: int) -> set[str]:
        return {s for d in graph.node(nid).outputs[0].shape for s in symbols(d)}

    inputs = {nid for _, nid in graph.inputs}
    unused = [(name, nid) for name, nid in graph.inputs if not graph.users(nid)]
    kept = set().union(*(syms(nid) for name, nid in graph.inputs if graph.users(nid)))
    used = set().union(*(symbols(d) for nid, node in graph.nodes() if nid not in inputs
                         for t in node.outputs for d in t.shape))
    return [name for name, nid in unused if syms(nid) & used <= kept]
