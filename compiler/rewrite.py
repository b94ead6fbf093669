"""Editing a graph without mutating it: an `Editor` copies a graph, then rewires, replaces and
removes nodes, keeping networkx's edges in step with each node's ordered inputs."""

from __future__ import annotations

import dataclasses

from .ir import NODE, SLOTS, Graph, Node, Ref


class Editor:
    def __init__(self, graph: Graph):
        self.graph = graph.copy()
        self.changed = False
        #: parameters other layers share (tie=, share=): a rewrite must leave their owners alone
        self.shared = graph.shared_params()

    def shares(self, node: Node) -> bool:
        """Whether `node` owns or borrows a parameter that another layer shares."""
        return any(p.tied_to is not None or ".".join(node.path + (p.name,)) in self.shared for p in node.params)

    # -- reading -----------------------------------------------------------------------------
    def node(self, nid: int) -> Node:
        return self.graph.node(nid)

    def users(self, ref: Ref) -> list[int]:
        """Nodes that read `ref` (each once, in id order)."""
        return [u for u in sorted(self.graph.g.successors(ref.node)) if ref in self.node(u).inputs]

    def uses(self, ref: Ref) -> int:
        """How many input slots and graph outputs read `ref`."""
        n = sum(self.node(u).inputs.count(ref) for u in self.graph.g.successors(ref.node))
        return n + sum(1 for _, r in self.graph.outputs if r == ref)

    def is_output(self, ref: Ref) -> bool:
        return any(r == ref for _, r in self.graph.outputs)

    # -- writing -----------------------------------------------------------------------------
    def add(self, node: Node) -> int:
        self.changed = True
        return self.graph.add(node)

    def set(self, nid: int, node: Node) -> None:
        """Replace node `nid`'s payload, rewiring its input edges."""
        old = self.node(nid)
        if node == old:
            return
        self.changed = True
        g = self.graph.g
        for u in list(g.predecessors(nid)):
            g.remove_edge(u, nid)
        g.nodes[nid][NODE] = node
        for slot, ref in enumerate(node.inputs):
            if g.has_edge(ref.node, nid):
                g.edges[ref.node, nid][SLOTS].append(slot)
            else:
                g.add_edge(ref.node, nid, **{SLOTS: [slot]})

    def replace_uses(self, old: Ref, new: Ref) -> None:
        """Every reader of `old` (and every graph output) reads `new` instead."""
        if old == new:
            return
        for u in self.users(old):
            n = self.node(u)
            self.set(u, n.replace(inputs=tuple(new if r == old else r for r in n.inputs)))
        if self.is_output(old):
            self.changed = True
            self.graph.outputs = tuple((name, new if r == old else r) for name, r in self.graph.outputs)

    def remove(self, nid: int) -> None:
        """Remove a node nobody reads."""
        for i in range(len(self.node(nid).outputs)):
            assert self.uses(Ref(nid, i)) == 0, f"%{nid} is still used"
        self.changed = True
        self.graph.g.remove_node(nid)

    def drop_if_dead(self, nid: int) -> None:
        """Remove `nid` if nothing reads it, then its inputs that this leaves unread (not graph inputs)."""
        stack = [nid]
        inputs = {n for _, n in self.graph.inputs}
        while stack:
            n = stack.pop()
            if n not in self.graph.g or n in inputs:
                continue
            if any(self.uses(Ref(n, i)) for i in range(len(self.node(n).outputs))):
                continue
            preds = list(self.graph.g.predecessors(n))
            self.changed = True
            self.graph.g.remove_node(n)
            stack.extend(preds)

    def remove_dead(self) -> int:
        """Remove every node that no graph output depends on (inputs stay). Returns how many."""
        g = self.graph.g
        live: set[int] = set()
        stack = [r.node for _, r in self.graph.outputs]
        while stack:
            n = stack.pop()
            if n in live:
                continue
            live.add(n)
            stack.extend(g.predecessors(n))
        inputs = {nid for _, nid in self.graph.inputs}
        dead = [n for n in g.nodes if n not in live and n not in inputs]
        if dead:
            self.changed = True
            g.remove_nodes_from(dead)
        return len(dead)


def rehome_ties(before: Graph, after: Graph) -> Graph:
    """Keep shared parameters owned after a pass removed their owner (a deploy build dropping the
    training-only layer whose weights a kept layer shares, dead code, ...): the first remaining layer
    that shares the parameter becomes its owner, with the old owner's initialiser, frozen mark and
    value (a weight expression reading it), and the other sharers are tied to the new owner."""
    def full(node: Node, p) -> str:
        return ".".join(node.path + (p.name,))

    owned = {full(n, p) for _, n in after.nodes() for p in n.params if p.tied_to is None}
    dangling = {p.tied_to for _, n in after.nodes() for p in n.params if p.tied_to and p.tied_to not in owned}
    if not dangling:
        return after
    old = {full(n, p): p for _, n in before.nodes() for p in n.params if p.tied_to is None}
    new_owner: dict[str, str] = {}
    for nid, node in after.nodes():
        params = list(node.params)
        for i, p in enumerate(params):
            if p.tied_to not in dangling:
                continue
            if p.tied_to in new_owner:
                params[i] = dataclasses.replace(p, tied_to=new_owner[p.tied_to])
            else:
                o = old[p.tied_to]
                new_owner[p.tied_to] = full(node, p)
                params[i] = dataclasses.replace(p, tied_to=None, init=o.init, frozen=o.frozen,
                                                derive=o.derive if o.derive is not None else ("param", p.tied_to))
        if params != list(node.params):
            after.g.nodes[nid][NODE] = node.replace(params=tuple(params))
    return after
