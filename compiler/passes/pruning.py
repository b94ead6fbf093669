"""Pruning passes: the deploy graph derived from training-only marks."""

from __future__ import annotations

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
    ed.changed = True
    return PassResult(ed.graph, True, {"dropped_outputs": dropped, "removed_nodes": removed,
                                       "removed_parameters": before - ed.graph.param_count()})
