"""Pictures of the IR: Graphviz DOT text, and SVG drawn here in pure Python (no graphviz needed).

Each node is a box labelled with its op and output type; the nodes of a block instance sit in a
rounded frame titled with its module path and block name (nested for blocks calling blocks); the
nodes that only training-only outputs need are dashed and grey, so the deploy graph is visible.

The SVG layout is a compound layered layout: inside every frame, its items (nodes and child
frames, laid out first as single boxes) go below everything they read from, and each item takes
the free place nearest the mean position of its inputs. Frames therefore never overlap, chains
line up vertically, and a graph of thousands of nodes is laid out in well under a second.

    dot, svg = render(graph)
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import networkx as nx

from specc.compiler.ir import Frame, Graph, Node

# Geometry, in SVG pixels.
CHAR_W = 6.6  # width of one character of the 11px monospace font
LINE_H = 14
PAD_X, PAD_Y = 8, 6  # inside a node box
H_GAP, V_GAP = 14, 26  # between items
FRAME_PAD = 10
TITLE_H = 18
MARGIN = 16

Scope = tuple[Frame, ...]


def training_only(graph: Graph) -> set[int]:
    """Nodes that only training-only outputs need (nothing a deploy output needs)."""
    keep: set[int] = set()
    train: set[int] = set()
    for name, ref in graph.outputs:
        target = train if name in graph.training_outputs else keep
        target.add(ref.node)
        target |= nx.ancestors(graph.g, ref.node)
    return train - keep


def labels(graph: Graph, nid: int) -> list[str]:
    """The text lines of a node's box: the op (an input's name), its output types, outputs it computes."""
    node = graph.node(nid)
    head = f"input {node.attr('name')}" if node.op == "input" else node.op
    if node.op != "input" and node.name and node.name not in (node.op, "") and "," not in node.name:
        head = f"{node.name} = {head}"
    lines = [head] + [str(t) for t in node.outputs]
    outs = [name for name, ref in graph.outputs if ref.node == nid]
    if outs:
        lines.append("-> " + ", ".join(outs))
    return lines


def frame_title(scope: Scope) -> str:
    path = ".".join(seg for f in scope for seg in f.segments)
    return f"{path} ({scope[-1].block})"


# ---------------------------------------------------------------------------------------------
# DOT
# ---------------------------------------------------------------------------------------------

def _dot_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: Graph) -> str:
    """Graphviz source: boxes, one `cluster_` subgraph per block instance, training-only nodes dashed."""
    grey = training_only(graph)
    tree = _scope_tree(graph)
    lines = [f"digraph {_dot_str(graph.name)} {{",
             "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", fontname="monospace", fontsize=10];',
             "  edge [arrowsize=0.6];"]
    counter = [0]

    def emit(scope: Scope, indent: str) -> None:
        for nid in tree.nodes[scope]:
            node = graph.node(nid)
            attrs = [f"label={_dot_str(chr(10).join(labels(graph, nid)))}"]
            if nid in grey:
                attrs.append('style="rounded,dashed"')
                attrs.append('color="#999999", fontcolor="#777777"')
            elif node.op == "input":
                attrs.append('fillcolor="#fdf3e1"')
            lines.append(f"{indent}n{nid} [{', '.join(attrs)}];")
        for child in tree.children[scope]:
            counter[0] += 1
            lines.append(f"{indent}subgraph cluster_{counter[0]} {{")
            lines.append(f"{indent}  label={_dot_str(frame_title(child))}; style=rounded; color=\"#8899bb\";")
            emit(child, indent + "  ")
            lines.append(f"{indent}}}")

    emit((), "  ")
    for u, v in sorted(graph.g.edges()):
        lines.append(f"  n{u} -> n{v};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------

@dataclass
class _Tree:
    nodes: dict[Scope, list[int]] = field(default_factory=dict)  # direct nodes of each scope
    children: dict[Scope, list[Scope]] = field(default_factory=dict)


def _scope_tree(graph: Graph) -> _Tree:
    tree = _Tree({(): []}, {(): []})
    for nid in sorted(graph.g.nodes()):
        scope = graph.node(nid).scope
        for i in range(1, len(scope) + 1):
            s = scope[:i]
            if s not in tree.nodes:
                tree.nodes[s] = []
                tree.children[s] = []
                tree.children[s[:-1]].append(s)
        tree.nodes[scope].append(nid)
    return tree


@dataclass
class _Box:
    """A laid-out scope: its size and, relative to its top-left corner, its nodes and frames."""

    w: float
    h: float
    nodes: dict[int, tuple[float, float, float, float]]  # nid -> (x, y, w, h)
    frames: list[tuple[Scope, float, float, float, float]]  # (scope, x, y, w, h)


def _node_size(graph: Graph, nid: int) -> tuple[float, float]:
    lines = labels(graph, nid)
    return max(len(s) for s in lines) * CHAR_W + 2 * PAD_X, len(lines) * LINE_H + 2 * PAD_Y


def layout(graph: Graph) -> _Box:
    """Positions of every node and frame of `graph` (the whole drawing, without margins)."""
    tree = _scope_tree(graph)
    owner: dict[int, Scope] = {nid: graph.node(nid).scope for nid in graph.g.nodes()}
    sizes = {nid: _node_size(graph, nid) for nid in graph.g.nodes()}
    order = {nid: i for i, nid in enumerate(graph.order())}

    def lay(scope: Scope) -> _Box:
        depth = len(scope)
        # items: direct nodes ("n", nid) and child frames ("f", scope), with their boxes
        boxes: dict[tuple, _Box] = {}
        for nid in tree.nodes[scope]:
            w, h = sizes[nid]
            boxes[("n", nid)] = _Box(w, h, {nid: (0.0, 0.0, w, h)}, [])
        for child in tree.children[scope]:
            inner = lay(child)
            title_w = len(frame_title(child)) * CHAR_W + 2 * FRAME_PAD
            w = max(inner.w + 2 * FRAME_PAD, title_w)
            h = inner.h + TITLE_H + 2 * FRAME_PAD
            dx, dy = (w - inner.w) / 2, TITLE_H + FRAME_PAD
            nodes = {n: (x + dx, y + dy, bw, bh) for n, (x, y, bw, bh) in inner.nodes.items()}
            frames = [(child, 0.0, 0.0, w, h)] + [(s, x + dx, y + dy, fw, fh) for s, x, y, fw, fh in inner.frames]
            boxes[("f", child)] = _Box(w, h, nodes, frames)

        def item_of(nid: int) -> tuple | None:
            s = owner[nid]
            if s[:depth] != scope:
                return None
            return ("n", nid) if len(s) == depth else ("f", s[:depth + 1])

        first = {key: min(order[n] for n in box.nodes) for key, box in boxes.items()}
        dag = nx.DiGraph()
        dag.add_nodes_from(boxes)
        for key, box in boxes.items():
            for nid in box.nodes:
                for pred in graph.g.predecessors(nid):
                    src = item_of(pred)
                    if src is not None and src != key:
                        dag.add_edge(src, key)
        if nx.is_directed_acyclic_graph(dag):
            items = list(nx.lexicographical_topological_sort(dag, key=lambda k: first[k]))
        else:  # cannot happen for elaborated graphs; keep going with edges that point forward
            items = sorted(boxes, key=lambda k: first[k])
        rank = {k: i for i, k in enumerate(items)}
        placed: dict[tuple, tuple[float, float]] = {}
        for key in items:
            box = boxes[key]
            preds = [p for p in dag.predecessors(key) if rank[p] < rank[key]]
            y = max((placed[p][1] + boxes[p].h + V_GAP for p in preds), default=0.0)
            if preds:
                centre = sum(placed[p][0] + boxes[p].w / 2 for p in preds) / len(preds)
                want = max(0.0, centre - box.w / 2)
            else:
                want = 0.0
            blockers = sorted((placed[k][0], placed[k][0] + boxes[k].w) for k in placed
                              if placed[k][1] < y + box.h + V_GAP / 2 and y < placed[k][1] + boxes[k].h + V_GAP / 2)
            placed[key] = (_free_x(want, box.w, blockers), y)
        width = max((x + boxes[k].w for k, (x, _) in placed.items()), default=0.0)
        height = max((y + boxes[k].h for k, (_, y) in placed.items()), default=0.0)
        nodes: dict[int, tuple[float, float, float, float]] = {}
        frames: list[tuple[Scope, float, float, float, float]] = []
        for key, (x, y) in placed.items():
            box = boxes[key]
            nodes.update({n: (bx + x, by + y, bw, bh) for n, (bx, by, bw, bh) in box.nodes.items()})
            frames.extend((s, fx + x, fy + y, fw, fh) for s, fx, fy, fw, fh in box.frames)
        return _Box(width, height, nodes, frames)

    return lay(())


def _free_x(want: float, w: float, blockers: list[tuple[float, float]]) -> float:
    """The x >= 0 nearest `want` where [x, x + w] keeps H_GAP from every blocker interval."""
    if not blockers:
        return want
    candidates = [want, 0.0]
    for lo, hi in blockers:
        candidates += [hi + H_GAP, lo - H_GAP - w]
    best = None
    for x in candidates:
        if x < 0:
            continue
        if all(x + w + H_GAP <= lo or x >= hi + H_GAP for lo, hi in blockers):
            if best is None or abs(x - want) < abs(best - want) or (abs(x - want) == abs(best - want) and x < best):
                best = x
    return best if best is not None else max(hi for _, hi in blockers) + H_GAP


# ---------------------------------------------------------------------------------------------
# SVG
# ---------------------------------------------------------------------------------------------

_STYLE = """
rect.node { fill: #eef3fb; stroke: #4a6391; stroke-width: 1; }
rect.node.input { fill: #fdf3e1; stroke: #a07a2c; }
rect.node.output { stroke-width: 2; }
rect.node.training { fill: #f4f4f4; stroke: #9a9a9a; stroke-dasharray: 4 3; }
g.training text { fill: #808080; }
rect.cluster { fill: #f8f9fc; fill-opacity: 0.6; stroke: #8899bb; stroke-width: 1; }
text.cluster-title { fill: #40507a; font-weight: bold; }
path.edge { fill: none; stroke: #5a6b8c; stroke-width: 1; }
path.edge.training { stroke: #aaaaaa; stroke-dasharray: 4 3; }
"""


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def to_svg(graph: Graph) -> str:
    """The graph as a standalone SVG document (pure Python layout)."""
    box = layout(graph)
    grey = training_only(graph)
    edges = [(u, v, _edge_path(box, u, v)) for u, v in sorted(graph.g.edges())]
    right = max([box.w] + [r for _, _, (_, r) in edges])
    W, H = right + 2 * MARGIN, box.h + 2 * MARGIN
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W:.0f}" height="{H:.0f}" '
           f'viewBox="0 0 {W:.0f} {H:.0f}" font-family="monospace" font-size="11">',
           f"<title>{_e(graph.name)}</title>",
           "<defs><marker id=\"arrow\" viewBox=\"0 0 8 8\" refX=\"8\" refY=\"4\" markerWidth=\"7\" markerHeight=\"7\" "
           "orient=\"auto\"><path d=\"M0,0 L8,4 L0,8 z\" fill=\"#5a6b8c\"/></marker></defs>",
           f"<style>{_STYLE}</style>",
           f'<g transform="translate({MARGIN},{MARGIN})">']
    for scope, x, y, w, h in sorted(box.frames, key=lambda f: len(f[0])):
        out.append(f'<g class="cluster"><rect class="cluster" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" '
                   f'height="{h:.1f}" rx="8" ry="8"/><text class="cluster-title" x="{x + FRAME_PAD:.1f}" '
                   f'y="{y + TITLE_H - 4:.1f}">{_e(frame_title(scope))}</text></g>')
    out.append('<g class="edges">')
    for u, v, (d, _) in edges:
        cls = "edge training" if v in grey else "edge"
        out.append(f'<path class="{cls}" d="{d}" marker-end="url(#arrow)"/>')
    out.append("</g>")
    outputs = {ref.node for _, ref in graph.outputs}
    for nid in sorted(box.nodes):
        node: Node = graph.node(nid)
        x, y, w, h = box.nodes[nid]
        classes = ["node"] + (["input"] if node.op == "input" else []) + (["output"] if nid in outputs else []) \
            + (["training"] if nid in grey else [])
        tip = f"%{nid} {node.op}  {node.span}"
        if node.path:
            tip += f"  @{'.'.join(node.path)}"
        g_cls = "node training" if nid in grey else "node"
        out.append(f'<g class="{g_cls}" id="n{nid}"><title>{_e(tip)}</title>'
                   f'<rect class="{" ".join(classes)}" x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" '
                   f'rx="3" ry="3"/>')
        for i, line in enumerate(labels(graph, nid)):
            weight = ' font-weight="bold"' if i == 0 else ""
            ty = y + PAD_Y + (i + 1) * LINE_H - 3
            out.append(f'<text x="{x + PAD_X:.1f}" y="{ty:.1f}"{weight}>{_e(line)}</text>')
        out.append("</g>")
    out.append("</g></svg>")
    return "\n".join(out) + "\n"


def _edge_path(box: _Box, u: int, v: int) -> tuple[str, float]:
    """SVG path data of the edge u -> v, and the rightmost x it reaches. A straight-down curve,
    unless boxes stand in its way: then it detours to the right of them."""
    x1, y1, w1, h1 = box.nodes[u]
    x2, y2, w2, _ = box.nodes[v]
    sx, sy, tx, ty = x1 + w1 / 2, y1 + h1, x2 + w2 / 2, y2
    lo_x, hi_x = min(sx, tx), max(sx, tx)
    blockers = [bx + bw for n, (bx, by, bw, bh) in box.nodes.items()
                if n != u and n != v and by < ty and by + bh > sy and bx < hi_x + 2 and bx + bw > lo_x - 2]
    if not blockers or ty - sy < 2 * V_GAP:
        dy = max(12.0, (ty - sy) / 2)
        return (f"M{sx:.1f},{sy:.1f} C{sx:.1f},{sy + dy:.1f} {tx:.1f},{ty - dy:.1f} {tx:.1f},{ty:.1f}",
                max(sx, tx))
    r = max(blockers) + H_GAP / 2 + (u % 3) * 4  # a little apart, so parallel detours stay visible
    k = V_GAP / 2
    return (f"M{sx:.1f},{sy:.1f} C{sx:.1f},{sy + k:.1f} {r:.1f},{sy:.1f} {r:.1f},{sy + k:.1f} "
            f"L{r:.1f},{ty - k:.1f} C{r:.1f},{ty:.1f} {tx:.1f},{ty - k:.1f} {tx:.1f},{ty:.1f}", r)


def render(graph: Graph) -> tuple[str, str]:
    """(DOT source, SVG document) of `graph`."""
    return to_dot(graph), to_svg(graph)


__all__ = ["render", "to_dot", "to_svg", "layout", "training_only"]
